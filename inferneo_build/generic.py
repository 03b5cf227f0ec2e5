"""The generic path: a causal LM whose `model_type` has no fused table entry (or uses a setting the fused
exporters lack) is exported from transformers' own modeling code, traced into the TorchScript target's IO
contract (`exporters.torchscript`: stacked KV cache owned by the runtime, written in place at `position_ids`,
logits at `logit_positions`), and validated by the same fail-closed harness as every fused target.

How HF's module meets the contract: its attention layers call `past_key_values.update(k, v, layer)`; a cache
object over the runtime's tensor scatters the new keys/values into their positions and hands back the first
T = attention_mask.shape[1] positions; the causal / padding (/ sliding-window) mask is passed as a 4-D additive
mask, which transformers uses as given. The artifact is labelled generic: `model.family` in the manifest and
`path: generic` in the target's toolchain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .exporters import ExportResult, TargetUnavailable

FAMILY = "generic"


@dataclass(frozen=True)
class GenericSpec:
    """What the build needs of a generic decoder: the manifest's dims (read off a probe forward) and the model."""

    model_type: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    reason: str  # why the fused path did not take it
    model: Any = field(default=None, repr=False, compare=False)
    family: str = FAMILY
    sliding_window: Optional[int] = None
    tied: bool = False  # the output head is the embedding table
    # the model masks each layer by its `layer_types` entry (a {layer type: mask} dict): the window applies to the
    # sliding layers only; otherwise one mask, windowed when `sliding_window` is set, serves every layer
    per_layer_type: bool = False


def generic_spec(model, reason: str) -> GenericSpec:
    """Dims from the config and from one probe forward (the cache's real [batch, kv_heads, seq, head_dim])."""
    import torch
    from transformers import DynamicCache

    from .architectures import ARCHITECTURES, UnsupportedArchitecture

    config = model.config
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([[1, 2]]), past_key_values=DynamicCache(), use_cache=True)
            changed = model(input_ids=torch.tensor([[1, 3]]), past_key_values=DynamicCache(), use_cache=True)
    except MemoryError:
        raise
    except Exception as e:  # hybrid models (Mamba / linear-attention / convolution layers) want a cache of their own
        raise UnsupportedArchitecture(
            f"model_type {config.model_type!r} does not run on a key/value cache alone (transformers: "
            f"{type(e).__name__}: {e}); the generic path exports decoders whose only state is attention keys and "
            f"values, not recurrent, state-space or convolution state; fused: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    _check_experts_trace(model)  # after the probe: a hybrid MoE (Jamba, Qwen3-Next) is refused for its state first
    # a later token moved an earlier logit: by far more than the float rounding a batch of another size can cause
    # (a mixture of experts' grouped matmuls sum in another order; logits of hundreds move by ~1e-5 of them)
    first = out.logits[:, 0]
    if (first - changed.logits[:, 0]).abs().max() > 1e-4 * max(1.0, float(first.abs().max())):
        raise UnsupportedArchitecture(
            f"model_type {config.model_type!r} is not causal (its first position's logits depend on the next token): "
            f"neither the generic path nor a fused entry takes it; fused: {', '.join(sorted(ARCHITECTURES))}")
    layers = _cache_layers(out.past_key_values)
    keys, values = layers[0]
    if keys.dim() != 4:
        raise TargetUnavailable(f"model_type {config.model_type!r}: its cache holds {keys.dim()}-D keys, not the "
                                "[batch, kv_heads, seq, head_dim] the generic path runs")
    if tuple(values.shape) != tuple(keys.shape):  # multi-head latent attention (DeepSeek) caches unequal K and V
        raise UnsupportedArchitecture(
            f"model_type {config.model_type!r} caches keys {list(keys.shape)} and values {list(values.shape)} of "
            "different shapes; the generic path's cache holds keys and values of one [kv_heads, head_dim] shape")
    max_positions = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                     or getattr(config, "max_sequence_length", None) or 2048)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    per_layer_type = (isinstance(layer_types, (list, tuple)) and bool(layer_types)
                      and set(layer_types) <= {"full_attention", "sliding_attention"} and _takes_mask_mapping(model))
    return GenericSpec(
        model_type=config.model_type, num_layers=len(layers), hidden=int(config.hidden_size),
        heads=int(config.num_attention_heads), kv_heads=int(keys.shape[1]), head_dim=int(keys.shape[3]),
        vocab=int(out.logits.shape[-1]), max_positions=int(max_positions), reason=reason, model=model,
        sliding_window=int(window) if isinstance(window, int) and window > 0 else None,
        tied=_tied(model), per_layer_type=per_layer_type)


# Expert implementations of transformers 5 (`config._experts_implementation`) that route with tensor ops only
# (sort, histc, index, grouped / batched matmuls), so a trace keeps the routing for every input
TRACEABLE_EXPERTS = ("grouped_mm", "batched_mm")


def _check_experts_trace(model) -> None:
    """Refuse a mixture-of-experts model whose experts run in a Python loop over the experts one input reaches
    (transformers 4's MoE blocks, and a 5.x model on its "eager" experts): a trace would freeze that input's
    experts into the graph. transformers 5's grouped_mm experts trace exactly."""
    from .architectures import UnsupportedArchitecture

    experts = [m for name, m in model.named_modules()
               if name.rsplit(".", 1)[-1] == "experts" or type(m).__name__.endswith("Experts")]
    if not experts:
        return
    implementation = getattr(model.config, "_experts_implementation", None)
    if implementation in TRACEABLE_EXPERTS and all(hasattr(m, "_is_expert_parallel") for m in experts):
        return  # every experts module dispatches on the config (transformers 5's use_experts_implementation)
    import transformers

    raise UnsupportedArchitecture(
        f"model_type {model.config.model_type!r} is a mixture of experts whose experts run in a Python loop over "
        f"the experts an input reaches (transformers {transformers.__version__}, experts implementation "
        f"{implementation or 'eager'}); a traced graph would keep only the example's experts. The generic path "
        f"traces MoE models through transformers 5's {' / '.join(TRACEABLE_EXPERTS)} experts: build with "
        "transformers>=5")


def _takes_mask_mapping(model) -> bool:
    """Whether the model's forward takes a {layer type: 4-D mask} dict, as transformers' models with per-layer
    attention types (Ministral, OLMo 3, Cohere 2, ...) do: one 4-D mask would window their full-attention layers."""
    import inspect

    try:
        source = inspect.getsource(type(model.base_model).forward)
    except (OSError, TypeError):
        return False
    return "causal_mask_mapping" in source


def _tied(model) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def _cache_layers(cache) -> list[tuple]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]


def _runtime_cache_class():
    from transformers.cache_utils import Cache

    class RuntimeCache(Cache):
        """transformers' Cache interface over the runtime's stacked cache [layers, 2, n, kv_heads, capacity, head_dim]."""

        def __init__(self, kv_cache, write_index, total):
            self.kv_cache, self.write_index, self.total = kv_cache, write_index, total
            self.layers = []

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # 5.x passes kwargs=, 4.x cache_kwargs
            layer = self.kv_cache[layer_idx]
            layer[0].scatter_(2, self.write_index, key_states.to(layer.dtype))
            layer[1].scatter_(2, self.write_index, value_states.to(layer.dtype))
            return layer[0, :, :, :self.total], layer[1, :, :, :self.total]

        def get_seq_length(self, layer_idx=0):
            return 0  # positions come from position_ids / cache_position, never from here

        def get_mask_sizes(self, cache_position, layer_idx=0):
            return self.total, 0

        @property
        def is_compileable(self):
            return False

        def __len__(self):
            return self.kv_cache.shape[0]

    return RuntimeCache


def _wrapper(spec: GenericSpec):
    import torch
    from torch import nn

    runtime_cache = _runtime_cache_class()

    class GenericDecoder(nn.Module):
        """HF's causal LM behind the TorchScript target's signature."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, attention_mask, kv_cache, logit_positions):
            n, steps = input_ids.shape[0], input_ids.shape[1]
            key_pos = (torch.ones_like(attention_mask).cumsum(1) - 1).unsqueeze(1)  # [n, 1, T]
            query_pos = position_ids.unsqueeze(2)  # [n, S, 1]
            visible = (key_pos <= query_pos) & (attention_mask.unsqueeze(1) == 1)
            windowed = visible
            if spec.sliding_window is not None:
                windowed = visible & (query_pos - key_pos < spec.sliding_window)
            dtype = kv_cache.dtype

            def additive(keep):
                return torch.zeros_like(keep, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min).unsqueeze(1)

            if spec.per_layer_type:
                mask = {"full_attention": additive(visible), "sliding_attention": additive(windowed)}
            else:
                mask = additive(windowed)
            write_index = position_ids.view(n, 1, steps, 1).expand(n, spec.kv_heads, steps, spec.head_dim)
            cache = runtime_cache(kv_cache, write_index, attention_mask.shape[1])
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             past_key_values=cache, cache_position=position_ids[0], use_cache=True,
                             logits_to_keep=logit_positions, return_dict=True)
            return out.logits.float(), kv_cache

    return GenericDecoder


def export_generic_torchscript(spec: GenericSpec, weights, target, shapes, out_dir: Path) -> ExportResult:
    """Trace HF's module (eager attention) into `out_dir/model.pt` with the TorchScript target's IO signature."""
    import torch

    from inferneo_runtime.backends.torchscript import quiet_jit

    from .exporters.torch_decoder import example_inputs
    from .exporters.torchscript import FILE_NAME, io_signature

    if target.format != "torchscript" or getattr(target, "precision", "fp32") != "fp32":
        raise TargetUnavailable(
            f"model_type {spec.model_type!r} takes the generic path ({spec.reason}); it exports the float32 "
            f"torchscript target only, not {target.format} {getattr(target, 'precision', 'fp32')} "
            "(mark the target optional or drop it)")
    model = spec.model
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # plain matmul/softmax: traces without data-dependent kernels
    path = Path(out_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.inference_mode(False), torch.no_grad(), quiet_jit():
            wrapper = _wrapper(spec)(model).eval()
            traced = torch.jit.trace(wrapper, example_inputs(spec), check_trace=False, strict=False)
            torch.jit.save(traced, str(path))
    finally:
        model.config._attn_implementation = previous
    return ExportResult(files=[path.resolve()], io=io_signature(spec), dtype="float32",
                        toolchain={"torch": torch.__version__, "path": FAMILY,
                                   "transformers_modeling": f"{type(model).__module__}.{type(model).__name__}"})
