"""A load-ready copy of an ONNX target for this host: onnxruntime's optimized graph with its pre-packed weights.

When a session is created, onnxruntime re-arranges ("pre-packs") every MatMul weight into its kernels' layout.
That is about half the load time of a decoder, and the packed copies live on the heap of every process that
serves the model. With `session.save_external_prepacked_constant_initializers`, onnxruntime writes the optimized
graph and the packed weights to files once. Later sessions memory-map them, so they load faster and the
weights become page cache that every process on the host shares.

The packed layout belongs to one onnxruntime version on one CPU, so the copy is a cache entry of this host,
never part of the artifact: `$INFERNEO_CACHE_DIR/onnx-prepacked/<key>`. The key hashes:
- the target's files (their sha256 in the manifest, which `load` verifies first);
- the onnxruntime version;
- the CPU's instruction-set flags;
- the graph optimization level.

The first load of a target writes the entry while it creates its session: into a temporary directory, renamed
under a file lock, so a reader never sees half of one. If the entry cannot be written or read, the target
loads from the artifact as before.

The copy is opt-in (INFERNEO_ONNX_CACHE=1). It saves about 0.2 s of a SmolLM2 load and lets processes share the
weights, but decoding from the memory-mapped packed weights can be slower than from the heap copy a plain
load makes: on an AVX-512 Xeon host, float32 SmolLM2 decoded 10-17% slower from the copy on ext4 (int4 alike,
float32 from tmpfs alike), which no load-time saving pays back.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import onnxruntime as ort

log = logging.getLogger(__name__)

ENV = "INFERNEO_ONNX_CACHE"
MODEL, DATA, DONE = "model.onnx", "model.onnx.data", "entry.json"  # DONE is written last: its presence = complete


def enabled() -> bool:
    return os.environ.get(ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    from ..local_cache import cache_root

    return cache_root() / "onnx-prepacked"


def cpu_flags() -> str:
    """The CPU's instruction-set flags (the packed layout depends on them), or the platform's name for them."""
    from ..cpu_kernels import cpu_flags as flags

    return " ".join(sorted(flags())) or platform.processor()


def entry_key(files: Sequence[str], level: ort.GraphOptimizationLevel) -> str:
    parts = {"files": sorted(files), "onnxruntime": ort.__version__, "machine": platform.machine(),
             "cpu": cpu_flags(), "level": int(level)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def open_session(model: Path, files: Sequence[str], make_options: Callable[[], ort.SessionOptions],
                 providers: list[str], target_bytes: int = 0,
                 use_cache: bool = True) -> tuple[ort.InferenceSession, str]:
    """A session for `model`, and where it came from.

    `files` are the target's files as "path sha256" strings; `target_bytes` is their total size. The source is
    "cache" (the host's packed copy), "created" (loaded from the artifact while writing that copy) or
    "artifact" (no copy: turned off, too little disk, or it failed with a warning)."""
    def from_artifact():
        return ort.InferenceSession(str(model), sess_options=make_options(), providers=providers), "artifact"

    if not (use_cache and enabled()):
        return from_artifact()
    level = make_options().graph_optimization_level
    root = cache_dir()
    entry = root / entry_key(files, level)
    session = _open_entry(entry, make_options, providers)
    if session is not None:
        return session, "cache"
    if not _room_for(root, target_bytes):
        return from_artifact()
    try:
        from ..local_cache import file_lock

        with file_lock(root / f"{entry.name}.lock"):
            session = _open_entry(entry, make_options, providers)  # another process may have written it meanwhile
            if session is not None:
                return session, "cache"
            session = _create_entry(model, files, entry, make_options, providers)
            _drop_superseded(entry, model, files)
            return session, "created"
    except Exception as e:  # a cache that cannot be written (read-only, disk full) must not stop serving
        log.warning("could not write the packed onnx copy of %s into %s (%s); loading from the artifact",
                    model, entry, e)
        return from_artifact()


def _room_for(root: Path, target_bytes: int) -> bool:
    """The copy holds the original weights and the packed ones (about twice the target). It is skipped, with a
    warning, when writing it would leave less than 1 GiB free on the cache's disk."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return True  # let the write itself fail, with its own message
    if free - 2 * target_bytes >= 1 << 30:
        return True
    log.warning("not writing the packed onnx copy into %s: %.1f GB free, it needs %.1f GB and 1 GB spare; "
                "loading from the artifact", root, free / 1e9, 2 * target_bytes / 1e9)
    return False


def _open_entry(entry: Path, make_options, providers) -> ort.InferenceSession | None:
    if not (entry / DONE).is_file():
        return None
    options = make_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # saved already optimized
    try:
        return ort.InferenceSession(str(entry / MODEL), sess_options=options, providers=providers)
    except Exception as e:  # damaged (files removed or truncated by hand): drop it; the caller writes it again
        log.warning("dropping the unreadable packed onnx copy %s: %s", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _create_entry(model: Path, files: Sequence[str], entry: Path, make_options, providers) -> ort.InferenceSession:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        options = make_options()
        options.optimized_model_filepath = str(tmp / MODEL)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        session = ort.InferenceSession(str(model), sess_options=options, providers=providers)
        for name in (MODEL, DATA):
            if (tmp / name).is_file():
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
        (tmp / DONE).write_text(json.dumps({"source": str(Path(model).resolve()), "files": sorted(files),
                                            "onnxruntime": ort.__version__}))
        if entry.exists():  # an incomplete leftover (its marker removed by hand)
            shutil.rmtree(entry)
        tmp.rename(entry)
        return session
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename


def _drop_superseded(entry: Path, model: Path, files: Sequence[str]) -> None:
    """Remove the copies of earlier versions of the artifact at this path (a rebuild in place changes its files),
    so the cache does not keep a dead copy of every version. A process still serving one keeps its mapping."""
    source = str(Path(model).resolve())
    for other in entry.parent.glob(f"*/{DONE}"):
        if other.parent == entry:
            continue
        try:
            recorded = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        if recorded.get("source") == source and recorded.get("files") != sorted(files):
            shutil.rmtree(other.parent, ignore_errors=True)
