"""What `POST /v1/models` may register: the operator's choice, not the caller's.

Loading a model can run code: `torch.jit.load` and pickle run a file's own `__setstate__`. So a model registered
over the API must be
- under one of `model_roots` (local directories, or `s3://bucket/prefix` prefixes); with none configured the
  API registers nothing (models come from the command line or config file);
- an artifact directory, an s3:// artifact, a checkpoint directory without pickle weights, or a bare `.onnx`
  file; never a bare TorchScript / pickle / TensorRT file (`.pt`, `.pth`, `.bin`, `.ckpt`, `.plan`, ...);
- signed by a trusted key, unless the operator set `allow_unsigned_registration`.
The messages never say what a directory holds or whether a path outside the roots exists.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import RequestError

PICKLE_OR_CODE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".ts", ".plan", ".engine", ".trt")


class RegistrationRefused(RequestError):
    """POST /v1/models asked for something the server's registration policy does not allow (400)."""

    code = "registration_refused"

    def __init__(self, message: str, param: str = "path"):
        super().__init__(message)
        self.param = param


def _under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _s3_under(uri: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return uri == prefix or uri.startswith(prefix + "/")


def check_registration(path: str, config, signed: bool, field: str = "path") -> None:
    """Raise RegistrationRefused unless `path` may be registered over the API under `config`'s settings.
    `signed`: trusted keys are configured, so the artifact's signature is verified when it is resolved.
    `field`: the request field that named it (path, tokenizer, adapters)."""
    try:
        _check(path, config, signed, field)
    except RegistrationRefused as e:
        e.param = field
        raise


def _check(path: str, config, signed: bool, field: str) -> None:
    roots = list(config.model_roots)
    if not roots:
        raise RegistrationRefused(f"{field}: this server registers no models over the API (model_roots is empty); "
                                  f"set model_roots (INFERNEO_MODEL_ROOTS) to the directories or s3:// prefixes "
                                  f"models may be registered from, or list the model in the server's config")
    where = ", ".join(roots)
    if path.startswith("s3://"):
        if not any(_s3_under(path, r) for r in roots if r.startswith("s3://")):
            raise RegistrationRefused(f"{field}: {path} is not under a configured model root ({where})")
    else:
        if not os.path.isabs(path):
            raise RegistrationRefused(f"{field}: give an absolute path under a configured model root ({where})")
        real = Path(os.path.realpath(path))  # symlinks and `..` resolved before the check
        local = [Path(os.path.realpath(r)) for r in roots if not r.startswith("s3://")]
        if not any(_under(real, r) for r in local):
            raise RegistrationRefused(f"{field}: {path} is not under a configured model root ({where})")
        if real.is_file() and real.suffix.lower() != ".onnx":
            raise RegistrationRefused(f"{field}: {path}: bare {real.suffix or 'extensionless'} files cannot be "
                                      f"registered over the API (TorchScript, pickle and engine files run code "
                                      f"when loaded); build an artifact with `inferneo build --sign` and register "
                                      f"its directory")
        if real.is_dir() and not (real / "inferneo.json").is_file():
            pickled = next((p.name for p in real.iterdir() if p.suffix.lower() in PICKLE_OR_CODE_SUFFIXES), None)
            if pickled is not None:
                raise RegistrationRefused(f"{field}: {path}: a checkpoint with pickle weights cannot be registered "
                                          f"over the API (loading pickle runs code); convert it to safetensors or "
                                          f"build an artifact")
    if field == "path" and not signed and not config.allow_unsigned_registration:
        raise RegistrationRefused(f"{field}: {path}: this server registers only signed artifacts over the API "
                                  f"(set trusted_keys), unless allow_unsigned_registration is set")
