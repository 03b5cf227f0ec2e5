"""Content-addressed build cache.

The build key hashes everything that determines an artifact: the normalized recipe (without its output
path), the source's weights and config/tokenizer files, the toolchain versions and Inferneo's own code. A build whose key
matches the output's manifest (and whose files still verify) is skipped; with `--cache s3://…` finished
builds are pushed under `<cache>/<key>/` and later builds anywhere pull them instead of compiling.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

from inferneo_runtime.artifact import verify_artifact
from inferneo_runtime.errors import InferneoError, IntegrityError, ManifestError
from inferneo_runtime.manifest import Manifest, read_manifest, sha256_file

from .encoder import ST_TRANSFORMER_CONFIGS
from .fingerprint import code_sha256
from .publish import staged
from .source import ROOT_FILES


# sentence-transformers files an encoder build reads (its pooling, normalization, max length, lowercasing and
# prompt), besides each module's `<path>/config.json` that modules.json names
ST_FILES = ("modules.json", "config_sentence_transformers.json", *ST_TRANSFORMER_CONFIGS)


def _source_file_names(directory: Path) -> list[str]:
    names = [*ROOT_FILES, *ST_FILES]
    try:
        modules = json.loads((directory / "modules.json").read_text(encoding="utf-8"))
        names += [f"{m['path']}/config.json" for m in modules if m.get("path")]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass  # none (a decoder), or unreadable: the encoder build names that itself
    return names


def build_key(recipe, checkpoint, toolchain: dict[str, str]) -> str:
    source_files = {name: sha256_file(checkpoint.directory / name)
                    for name in _source_file_names(checkpoint.directory) if (checkpoint.directory / name).is_file()}
    payload = {
        "recipe": recipe.sha256(),
        "weights": checkpoint.info.weights_sha256,
        "source_files": source_files,
        "toolchain": {k: v for k, v in toolchain.items() if k != "python"} | {"python": toolchain["python"].rsplit(".", 1)[0]},
        "code": code_sha256(),  # changed exporters or validation under the same version string build again
    }
    files = recipe.validation.evaluation_files  # the recipe names them; their text decides reduced precisions
    if files:
        payload["evaluation_files"] = [sha256_file(Path(f)) if Path(f).is_file() else None for f in files]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _up_to_date(output: Path, key: str) -> Optional[Manifest]:
    try:
        manifest = read_manifest(output)
        if manifest.build_key != key:
            return None
        verify_artifact(output, manifest, manifest.valid_targets())
        return manifest
    except InferneoError:
        return None  # missing, damaged or different: rebuild


def reuse(key: str, output: Path, cache: Optional[str], progress) -> Optional[tuple[Manifest, str]]:
    """The manifest and where it came from when this build can be skipped, else None."""
    manifest = _up_to_date(output, key)
    if manifest is not None:
        progress.log(f"{output} is up to date (build key {key[:12]}); nothing to rebuild (use --force to rebuild)")
        return manifest, "output"
    if cache is None:
        return None
    from inferneo_runtime import s3

    uri = f"{cache.rstrip('/')}/{key}"
    for attempt in (1, 2):
        try:
            fetched = s3.fetch(uri, progress=False)
        except s3.NotPublished:
            return None  # a miss; other S3 errors (no bucket, access denied) are the user's to see
        except IntegrityError as e:  # damaged or incomplete in S3: never served, built again as on a miss
            progress.log(f"build cache entry {uri} is damaged ({e}); rebuilding")
            return None
        try:
            with staged(output) as staging:
                shutil.copytree(fetched, staging, dirs_exist_ok=True)
                manifest = read_manifest(staging)
                verify_artifact(staging, manifest, manifest.valid_targets())
        except (IntegrityError, ManifestError) as e:  # the local copy was damaged: fetch it once more
            s3.drop_entry(fetched)
            if attempt == 2:
                progress.log(f"build cache entry {uri} does not verify ({e}); rebuilding")
                return None
            continue
        progress.log(f"build cache hit: {uri} → {output}")
        return manifest, uri
    return None  # pragma: no cover - the loop returns


def store(key: str, output: Path, cache: str) -> None:
    from .push import push

    push(output, f"{cache.rstrip('/')}/{key}", progress=False)
