"""What Inferneo's own code contributes to cache keys: an artifact or a conversion made by other code is another
one, even under the same version string (a git checkout, an editable install, a patched wheel)."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path


@functools.lru_cache(maxsize=None)
def code_sha256() -> str:
    """sha256 over the source of `inferneo_build` and `inferneo_runtime` (the exporters, the validating runtime
    and everything around them) and of the data it ships (the evaluation text), by relative path and content."""
    import inferneo_build
    import inferneo_runtime

    h = hashlib.sha256()
    for package in (inferneo_build, inferneo_runtime):
        root = Path(package.__file__).resolve().parent
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".txt") and p.is_file()):
            h.update(path.relative_to(root.parent).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
