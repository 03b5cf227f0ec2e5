"""Ed25519 signatures over `inferneo.json`.

A sha256 per file catches corruption; a signature over the manifest (which holds those sha256s) catches
tampering: whoever can write the bucket cannot produce a valid signature without the private key.
The signature lives beside the manifest in `inferneo.sig`:

    {"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}

When trusted keys are configured (argument, `--trusted-key`, or INFERNEO_TRUSTED_KEYS), an artifact that is
unsigned, signed by another key, or whose manifest changed after signing is refused before any file is used.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from .errors import InferneoError, MissingExtraError
from .manifest import MANIFEST_NAME

SIGNATURE_NAME = "inferneo.sig"
TRUSTED_KEYS_ENV = "INFERNEO_TRUSTED_KEYS"


class SignatureError(InferneoError):
    """Signature missing, from an untrusted key, or not matching the manifest."""

    exit_code = 9


class KeyExistsError(InferneoError):
    """`keygen` was pointed at a key pair that already exists (bad input: it never overwrites a key)."""

    exit_code = 2


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingExtraError("signed artifacts", "sign", "cryptography") from None
    return serialization, ed25519


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(path: Union[str, Path]) -> tuple[Path, Path, str]:
    """Write a private key (PEM, mode 0600) to `path` and its public key to `path.pub`."""
    serialization, ed25519 = _crypto()
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    for existing in (path, pub_path):
        if existing.exists():
            raise KeyExistsError(f"{existing} already exists; refusing to overwrite a key")
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub_path, key_id(private.public_key())


def load_private_key(path: Union[str, Path]):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not a readable Ed25519 private key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(spec: Union[str, Path]):
    """A public key from a PEM file (or a private key file, whose public half is used)."""
    serialization, ed25519 = _crypto()
    path = Path(spec)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SignatureError(f"trusted key {spec}: cannot read ({e.strerror})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as e:
            raise SignatureError(f"trusted key {spec}: not a PEM Ed25519 key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"trusted key {spec}: not an Ed25519 key")
    return key


def sign_artifact(root: Union[str, Path], private_key_path: Union[str, Path]) -> str:
    """Sign `root/inferneo.json`, writing `root/inferneo.sig`; returns the key id."""
    root = Path(root)
    key = load_private_key(private_key_path)
    signature = key.sign((root / MANIFEST_NAME).read_bytes())
    kid = key_id(key.public_key())
    payload = {"algorithm": "ed25519", "key_id": kid, "signature": base64.b64encode(signature).decode()}
    tmp = root / (SIGNATURE_NAME + ".tmp")
    tmp.write_text(json.dumps(payload) + "\n")
    os.replace(tmp, root / SIGNATURE_NAME)
    return kid


def trusted_keys_from_env() -> list[str]:
    value = os.environ.get(TRUSTED_KEYS_ENV, "")
    return [p for p in value.replace(",", os.pathsep).split(os.pathsep) if p.strip()]


def resolve_trusted_keys(trusted_keys: Optional[Sequence[Union[str, Path]]]) -> list[Union[str, Path]]:
    return list(trusted_keys) if trusted_keys is not None else trusted_keys_from_env()


def verify_signature(root: Union[str, Path], trusted_keys: Iterable[Union[str, Path]]) -> str:
    """Check `inferneo.sig` against the manifest bytes and the trusted keys; returns the signing key id."""
    root = Path(root)
    keys = {key_id(k): k for k in (load_public_key(s) for s in trusted_keys)}
    if not keys:
        raise SignatureError("no trusted keys given")
    sig_path = root / SIGNATURE_NAME
    if not sig_path.is_file():
        raise SignatureError(f"{root}: artifact is not signed (no {SIGNATURE_NAME}) and trusted keys are configured")
    try:
        sig = json.loads(sig_path.read_text())
        kid, algorithm = sig["key_id"], sig["algorithm"]
        signature = base64.b64decode(sig["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"{sig_path}: malformed signature file ({e})") from None
    if algorithm != "ed25519":
        raise SignatureError(f"{sig_path}: unsupported algorithm {algorithm!r}")
    key = keys.get(kid)
    if key is None:
        raise SignatureError(f"{sig_path}: signed by key {kid}, which is not among the trusted keys "
                             f"({', '.join(sorted(keys))})")
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, (root / MANIFEST_NAME).read_bytes())
    except InvalidSignature:
        raise SignatureError(f"{sig_path}: signature by key {kid} does not match {MANIFEST_NAME} "
                             "(the manifest was changed after signing)") from None
    return kid
