"""LoRA adapters (PEFT format) merged into a model's weights before export.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`, a pickle, read
only when the recipe sets `allow_pickle: true`). For every
target module, PEFT stores `...<module>.lora_A.weight` [r, in] and `...<module>.lora_B.weight` [out, r];
merging adds `B @ A * scale` to the module's weight (scale = alpha / r, or alpha / sqrt(r) with rsLoRA),
computed in the weight's dtype in the same order PEFT's `merge_and_unload` uses, so the merged weights
equal PEFT's. Everything PEFT can put in an adapter that is not a plain weight delta (DoRA, trained
biases, embedding LoRA, `modules_to_save`) is refused with a message naming it.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from inferneo_runtime.manifest import AdapterInfo, sha256_file

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")  # PEFT may keep the adapter name


class AdapterError(ValueError):
    """An adapter cannot be read or merged into this checkpoint."""

    exit_code = 2


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict
    weights_file: Path
    info: AdapterInfo

    def scale(self, module: str) -> float:
        rank = _pattern_value(self.config.get("rank_pattern") or {}, module, self.info.rank)
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.info.alpha)
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank


def _pattern_value(patterns: dict, module: str, default):
    # PEFT matches rank_pattern/alpha_pattern keys against the end of the module name
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: Path, allow_pickle: bool = False) -> Adapter:
    path = Path(path)
    config_path = path / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{config_path}: cannot read the adapter config: {e}") from None
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type {peft_type} is not supported; only LoRA adapters can be merged")
    unsupported = {
        "use_dora": "DoRA adapters", "modules_to_save": "modules_to_save (fully trained extra modules)",
        "layers_to_transform": "layers_to_transform", "megatron_config": "megatron_config",
        # LoRA variants whose effect is not `B @ A * scale` on the base weights (PEFT's own merge refuses aLoRA,
        # Arrow and QALoRA, and merges BD-LoRA / KaSA / VeLoRA otherwise)
        "alora_invocation_tokens": "aLoRA adapters (active only after their invocation tokens)",
        "layer_replication": "layer_replication (the adapted model repeats base layers)",
        "use_qalora": "QALoRA adapters", "use_bdlora": "block-diagonal LoRA (BD-LoRA) adapters",
        "kasa_config": "KaSA adapters", "velora_config": "VeLoRA adapters", "arrow_config": "Arrow routing adapters",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise AdapterError(f"{path}: {what} cannot be merged; supported: plain LoRA on Linear/Conv1D weights")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={config['bias']!r} (trained biases) cannot be merged; supported: bias='none'")
    weights_file = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
    if weights_file is None:
        raise AdapterError(f"{path}: no adapter weights ({' or '.join(WEIGHT_NAMES)})")
    if weights_file.suffix != ".safetensors" and not allow_pickle:
        from .source import pickle_refused

        raise AdapterError(pickle_refused(str(path), [weights_file.name]))
    digest = hashlib.sha256()
    digest.update(sha256_file(config_path).encode() + b"\0" + sha256_file(weights_file).encode())
    targets = config.get("target_modules") or []
    # a key the config leaves out takes PEFT's LoraConfig default, as PEFT's own loading does (r 8, lora_alpha 8)
    info = AdapterInfo(path=str(path.resolve()), sha256=digest.hexdigest(), rank=int(config.get("r", 8)),
                       alpha=float(config.get("lora_alpha", 8)),
                       target_modules=[targets] if isinstance(targets, str) else sorted(targets),
                       base_model=config.get("base_model_name_or_path"))
    return Adapter(path=path, config=config, weights_file=weights_file, info=info)


def _load_tensors(adapter: Adapter) -> dict:
    import torch

    if adapter.weights_file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(adapter.weights_file))
    return torch.load(str(adapter.weights_file), map_location="cpu", weights_only=True)


def adapter_pairs(adapter: Adapter) -> dict[str, tuple]:
    """module name in the base model -> (lora_A [r, in], lora_B [out, r]) tensors."""
    pairs: dict[str, dict] = {}
    for key, tensor in _load_tensors(adapter).items():
        if "lora_embedding_" in key or "lora_magnitude_vector" in key:
            raise AdapterError(f"{adapter.path}: {key}: embedding LoRA / DoRA weights cannot be merged")
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"{adapter.path}: unexpected tensor {key!r} in a LoRA adapter")
        module = match["module"]
        module = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
        pairs.setdefault(module, {})[match["part"]] = tensor
    incomplete = sorted(m for m, p in pairs.items() if set(p) != {"A", "B"})
    if incomplete:
        raise AdapterError(f"{adapter.path}: lora_A/lora_B pairs incomplete for {', '.join(incomplete[:3])}")
    if not pairs:
        raise AdapterError(f"{adapter.path}: the adapter holds no LoRA weights")
    return {m: (p["A"], p["B"]) for m, p in pairs.items()}


def merge_adapters(model, adapters: list[Adapter]) -> list[str]:
    """Add each adapter's weight deltas to `model` in place (in order); returns the merged module names."""
    import torch
    from transformers.pytorch_utils import Conv1D

    merged = []
    for adapter in adapters:
        for name, (a, b) in sorted(adapter_pairs(adapter).items()):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise AdapterError(f"{adapter.path}: module {name!r} is not in this checkpoint (the adapter was made "
                                   f"for {adapter.info.base_model or 'another model'})") from None
            weight = module.weight
            if isinstance(module, Conv1D):
                transpose = True  # Conv1D keeps [in, out]
            elif isinstance(module, torch.nn.Linear):
                transpose = False  # PEFT overrides fan_in_fan_out=True to False on a Linear (it warns)
            else:
                raise AdapterError(f"{adapter.path}: {name} is a {type(module).__name__}; LoRA merges into Linear "
                                   "and Conv1D weights only")
            with torch.no_grad():
                delta = b.to(weight.dtype) @ a.to(weight.dtype)
                delta = (delta.T if transpose else delta) * adapter.scale(name)
                if delta.shape != weight.shape:
                    raise AdapterError(f"{adapter.path}: {name}: delta {tuple(delta.shape)} does not fit the weight "
                                       f"{tuple(weight.shape)}; was the adapter made for this model?")
                weight.data += delta
            merged.append(name)
    return merged
