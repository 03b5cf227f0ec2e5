"""Several artifacts behind one server: lazy loading, a model budget, least-recently-used eviction.

Each artifact is registered under its manifest name (the `model` a request asks for). Registration reads
the manifest and picks the target, so the budget knows each model's weight bytes (the sum of the target's
file sizes) before it is loaded; s3:// artifacts are fetched into the verified cache at registration.

`acquire(name)` returns a Lease on a loaded model and its EngineDriver, loading it first if needed. The
budget is a count (`max_models`) and/or bytes (`memory_budget_bytes`: weights + each engine's KV-cache
bytes). When loading would exceed it, idle models (no lease) are evicted, least recently used first. A
model with leases is never evicted under its requests: the acquirer waits (up to `wait_s`) for leases to
be released and then gives up with CapacityError. A model that cannot fit even alone fails at once.
Loading happens outside the lock, so requests to models already loaded are not held up by it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .errors import InferneoError
from .manifest import Manifest, read_manifest

logger = logging.getLogger("inferneo.server")


class ModelNotFound(InferneoError):
    """A request named a model this server does not have."""

    exit_code = 2

    def __init__(self, name: str, known: Sequence[str]):
        super().__init__(f"model {name!r} does not exist; this server has: {', '.join(known) or 'none'}")
        self.name = name


class CapacityError(InferneoError):
    """A model cannot be loaded within the budget (now, or at all)."""

    exit_code = 2


class RegistryError(InferneoError):
    """The artifacts given to the registry cannot be served together (e.g. two share a name)."""

    exit_code = 2


@dataclass(frozen=True)
class ArtifactSource:
    path: str  # a directory or an s3:// URI
    target: Optional[str] = None  # None: the runtime's preferred valid target


@dataclass
class Entry:
    """One registered artifact and, while loaded, its Model and EngineDriver."""

    name: str
    source: str
    root: Path
    manifest: Manifest
    target: str
    weight_bytes: int
    state: str = "unloaded"  # unloaded | loading | loaded
    model: object = None
    driver: object = None
    leases: int = 0
    last_used: float = 0.0
    loads: int = 0
    evictions: int = 0
    error: Optional[str] = None  # the last load failure, if any

    @property
    def cache_bytes(self) -> int:
        return self.driver.cache_bytes if self.driver is not None else 0

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes if self.state != "unloaded" else 0


class Lease:
    """A hold on a loaded model; while any lease is held the model is not evicted. Release exactly once."""

    def __init__(self, registry: "ModelRegistry", entry: Entry):
        self._registry = registry
        self.entry = entry
        self.name = entry.name
        self.model = entry.model
        self.driver = entry.driver
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._registry._release(self.entry)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _resolve(source: ArtifactSource) -> tuple[Path, Manifest, str]:
    from . import s3
    from .artifact import choose_target

    root = Path(s3.fetch(source.path)) if s3.is_s3_uri(source.path) else Path(source.path)
    manifest = read_manifest(root)
    return root, manifest, choose_target(manifest, source.target)


class ModelRegistry:
    def __init__(self, sources: Sequence[Union[str, ArtifactSource]], *, max_models: Optional[int] = None,
                 memory_budget_bytes: Optional[int] = None, device: str = "cpu", threads: Optional[int] = None,
                 wait_s: float = 30.0, loader: Optional[Callable] = None, driver_factory: Optional[Callable] = None):
        if max_models is not None and max_models < 1:
            raise RegistryError(f"max_models={max_models} must be >= 1")
        if memory_budget_bytes is not None and memory_budget_bytes <= 0:
            raise RegistryError(f"memory budget {memory_budget_bytes} bytes must be > 0")
        self.max_models = max_models
        self.memory_budget_bytes = memory_budget_bytes
        self.device = device
        self.threads = threads
        self.wait_s = wait_s
        self._loader = loader
        self._driver_factory = driver_factory
        self._cond = threading.Condition()
        self._closed = False
        self.entries: dict[str, Entry] = {}
        for src in sources:
            src = src if isinstance(src, ArtifactSource) else ArtifactSource(str(src))
            root, manifest, target = _resolve(src)
            if manifest.name in self.entries:
                raise RegistryError(f"two artifacts are named {manifest.name!r}: {self.entries[manifest.name].source} "
                                    f"and {src.path}; each model needs its own name")
            weights = sum(f.size for f in manifest.targets[target].files)
            self.entries[manifest.name] = Entry(manifest.name, src.path, root, manifest, target, weights)
        if not self.entries:
            raise RegistryError("no artifacts to serve")

    # -- lookups ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> Entry:
        e = self.entries.get(name)
        if e is None:
            raise ModelNotFound(name, self.names)
        return e

    def memory_used(self) -> int:
        return sum(e.memory_bytes for e in self.entries.values())

    def loaded(self) -> list[str]:
        return [e.name for e in self.entries.values() if e.state == "loaded"]

    # -- leases -----------------------------------------------------------------------------------
    def try_acquire(self, name: str) -> Optional[Lease]:
        """Lease model `name` if it is loaded; None otherwise. Never blocks beyond the registry lock."""
        with self._cond:
            e = self.entry(name)
            if e.state != "loaded" or self._closed:
                return None
            e.leases += 1
            e.last_used = time.monotonic()
            return Lease(self, e)

    def acquire(self, name: str, wait_s: Optional[float] = None) -> Lease:
        """Lease model `name`, loading it (and evicting idle models) if needed. Blocks while loading or
        while busy models hold the budget, up to `wait_s` (default: the registry's)."""
        deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
        with self._cond:
            e = self.entry(name)
            while True:
                if self._closed:
                    raise CapacityError("the server is shutting down")
                if e.state == "loaded":
                    e.leases += 1
                    e.last_used = time.monotonic()
                    return Lease(self, e)
                if e.state == "unloaded":
                    victims = self._plan_room(e)
                    if victims is not None:
                        for v in victims:
                            self._evict(v)
                        e.state = "loading"
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CapacityError(self._no_room_message(e, waited=True))
                self._cond.wait(remaining)
        return self._load(e)

    def _release(self, e: Entry) -> None:
        with self._cond:
            e.leases -= 1
            e.last_used = time.monotonic()
            self._cond.notify_all()

    def preload(self) -> list[str]:
        """Load every artifact, in order, while it fits without evicting another; returns the names loaded.
        Load errors propagate (a server should not start on a broken artifact)."""
        done = []
        for e in self.entries.values():
            with self._cond:
                if e.state != "unloaded" or self._plan_room(e, evict=False) is None:
                    if e.state == "unloaded":
                        logger.info("model %s: not loaded at startup (budget full); it loads on first use", e.name)
                    continue
                e.state = "loading"
            self._load(e).release()
            done.append(e.name)
        return done

    # -- budget -----------------------------------------------------------------------------------
    def _fits(self, e: Entry, resident: list[Entry]) -> bool:
        if self.max_models is not None and len(resident) + 1 > self.max_models:
            return False
        if self.memory_budget_bytes is not None:
            if sum(r.memory_bytes for r in resident) + e.weight_bytes > self.memory_budget_bytes:
                return False
        return True

    def _plan_room(self, e: Entry, evict: bool = True) -> Optional[list[Entry]]:
        """Idle models to evict (least recently used first) so that `e` fits; None if it cannot fit now.
        Raises CapacityError if it cannot fit even with every other model gone."""
        if self.memory_budget_bytes is not None and e.weight_bytes > self.memory_budget_bytes:
            raise CapacityError(self._no_room_message(e, waited=False))
        resident = [r for r in self.entries.values() if r is not e and r.state != "unloaded"]
        victims: list[Entry] = []
        idle = sorted((r for r in resident if r.state == "loaded" and r.leases == 0), key=lambda r: r.last_used)
        while not self._fits(e, resident):
            if not evict or not idle:
                return None
            victim = idle.pop(0)
            victims.append(victim)
            resident.remove(victim)
        return victims

    def _no_room_message(self, e: Entry, waited: bool) -> str:
        budget = []
        if self.max_models is not None:
            budget.append(f"max_models {self.max_models}")
        if self.memory_budget_bytes is not None:
            budget.append(f"memory budget {self.memory_budget_bytes / 1e9:.3f} GB")
        if not waited:
            return (f"out of memory: model {e.name!r} needs {e.weight_bytes / 1e9:.3f} GB of weights, more than the "
                    f"{' and '.join(budget)}")
        busy = [f"{r.name} ({r.leases} request(s))" for r in self.entries.values() if r.leases]
        return (f"out of memory: model {e.name!r} ({e.weight_bytes / 1e9:.3f} GB) does not fit in the "
                f"{' and '.join(budget)} (in use: {self.memory_used() / 1e9:.3f} GB) and the models holding it are "
                f"busy: {', '.join(busy) or 'none'}; retry later")

    # -- load / evict -----------------------------------------------------------------------------
    def _load(self, e: Entry) -> Lease:
        """Load `e` (its state is already 'loading', so its weights count against the budget)."""
        t0 = time.perf_counter()
        try:
            loader = self._loader
            if loader is None:
                from .artifact import load as loader
            model = loader(e.root, target=e.target, device=self.device, threads=self.threads)
            if self._driver_factory is None:
                from .server.driver import EngineDriver
                driver = EngineDriver(e.name, model)
            else:
                driver = self._driver_factory(e.name, model)
        except BaseException as exc:
            with self._cond:
                e.state = "unloaded"
                e.error = str(exc) or type(exc).__name__
                self._cond.notify_all()
            raise
        with self._cond:
            e.model, e.driver, e.state, e.error = model, driver, "loaded", None
            e.loads += 1
            e.leases += 1
            e.last_used = time.monotonic()
            self._cond.notify_all()
        logger.info("model %s: loaded %s target in %.2fs (%.1f MB of weights)", e.name, e.target,
                    time.perf_counter() - t0, e.weight_bytes / 1e6)
        return Lease(self, e)

    def _evict(self, e: Entry) -> None:
        """Unload an idle model (called under the lock; its driver has no work, so stopping is immediate)."""
        logger.info("model %s: evicted (least recently used) to make room", e.name)
        self._unload(e, timeout=None)
        e.evictions += 1

    def _unload(self, e: Entry, timeout: Optional[float]) -> None:
        driver, model = e.driver, e.model
        e.state, e.driver, e.model = "unloaded", None, None
        if driver is not None and not driver.stop(timeout):
            logger.warning("model %s: requests still running after %.0fs; closing anyway", e.name, timeout or 0)
        if model is not None:
            model.close()

    def close(self, timeout: Optional[float] = 30.0) -> None:
        """Stop taking leases, let every driver finish its requests (up to `timeout` each), unload all."""
        with self._cond:
            self._closed = True
            loaded = [e for e in self.entries.values() if e.state == "loaded"]
            self._cond.notify_all()
        for e in loaded:
            self._unload(e, timeout)
