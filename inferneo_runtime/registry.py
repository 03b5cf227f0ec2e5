"""Several models behind one server: versions side by side, lazy loading, a model budget, LRU eviction.

Each model is registered under a name and a version; `name@version` addresses one version and `name` the
newest (versions compare numerically part by part: 1 < 2 < 10, 1.2 < 1.10). A model is anything
`model_sources.resolve` accepts: an artifact directory or s3:// URI, a checkpoint compiled on demand, a bare
model file, or a custom model class. Registration reads the manifest and picks the target, so the budget
knows each model's weight bytes before it is loaded; s3:// artifacts are fetched into the verified cache then.

`acquire(name)` returns a Lease on a loaded model and its driver, loading it first if needed. The budget is a
count (`max_models`) and/or bytes (`memory_budget_bytes`: weights + each engine's KV-cache bytes + the draft
models it loaded for speculation). When loading would exceed it, idle models (no lease) are evicted, least
recently used first; a load that brings more than its weights (a draft model, a mixed-step session) evicts the
idle models that no longer fit beside it. A model with leases is never evicted under its requests: the acquirer
waits (up to `wait_s`) for leases to be released and then gives up with CapacityError. A model that cannot fit
even alone fails at once. Loading happens outside the lock, so requests to models already loaded are not held up
by it; requests for a model being loaded wait for that one load, and get its error if it fails.
`register`, `unregister`, `load` and `unload` change the set at run time; ModelManager (manager.py) adds
persistence on top.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

from .errors import InferneoError, first_problem
from .model_config import ModelConfig

if TYPE_CHECKING:
    from .drivers import Driver
    from .model_sources import Resolved

logger = logging.getLogger("inferneo.server")

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int4": 0.5}


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
    """The models given to the registry cannot be served together (e.g. two share a name and version), or a
    change asked of it cannot be made (unregistering a busy model)."""

    exit_code = 2


class ModelBusy(RegistryError):
    """The model has requests in flight; it cannot be unloaded or unregistered now."""


@dataclass(frozen=True)
class ArtifactSource:
    path: str  # a directory or an s3:// URI
    target: Optional[str] = None  # None: the runtime's preferred valid target


def version_key(version: str) -> tuple:
    """Order versions part by part, numbers numerically: 1 < 2 < 10, 1.2 < 1.10, and numbers before words."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[._+-]", version))


@dataclass
class Entry:
    """One registered model version and, while loaded, its model and driver. What the model is (its name,
    source, manifest, target, notes) is the resolved source's; the entry adds the version and the serving state."""

    resolved: Resolved  # what the model is and how to load it
    version: str = "1"
    spec: object = None  # the ModelConfig it was registered from (what persistence saves)
    explicit_version: bool = False
    registered_at: float = field(default_factory=time.time)
    state: str = "unloaded"  # unloaded | loading | loaded
    model: object = None
    driver: object = None
    leases: int = 0
    last_used: float = 0.0
    loads: int = 0
    evictions: int = 0
    error: Optional[str] = None  # the last load failure, if any
    failures: int = 0  # loads that failed
    failure: Optional[BaseException] = None  # the last one's error, for the requests that waited on that load

    @property
    def name(self) -> str:
        return self.resolved.name

    @property
    def source(self) -> str:
        return self.resolved.source

    @property
    def weight_bytes(self) -> int:
        return self.resolved.weight_bytes

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def cache_bytes(self) -> int:
        return self.driver.cache_bytes if self.driver is not None else 0

    @property
    def draft_bytes(self) -> int:
        """Weights of the draft models this model loaded for speculation (0 for other model kinds); their KV caches
        are in cache_bytes."""
        measure = getattr(self.model, "draft_bytes", None)
        return measure() if callable(measure) else 0

    @property
    def mixed_step_bytes(self) -> int:
        """The weights once more, held by the mixed-step session an engine with a prefill budget loads (onnx)."""
        measure = getattr(self.model, "mixed_step_bytes", None)
        return measure() if callable(measure) else 0

    @property
    def memory_bytes(self) -> int:
        if self.state == "unloaded":
            return 0
        return self.weight_bytes + self.cache_bytes + self.draft_bytes + self.mixed_step_bytes

    @property
    def max_batch(self) -> Optional[int]:
        return self.resolved.max_batch

    @property
    def max_sequence(self) -> Optional[int]:
        return self.resolved.max_sequence


class Lease:
    """A hold on a loaded model; while any lease is held the model is not evicted. Release exactly once."""

    def __init__(self, registry: "ModelRegistry", entry: Entry):
        self._registry = registry
        self.entry = entry
        self.name = registry.display_id(entry)
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


def _as_spec(src):
    if isinstance(src, ModelConfig):
        return src
    if isinstance(src, ArtifactSource):
        return ModelConfig(path=src.path, target=src.target)
    return ModelConfig(path=str(src))


def _default_driver(name: str, model, entry: Entry, engine_options: Optional[dict] = None) -> Driver:
    from .embedding import EmbeddingDriver, EmbeddingModel
    from .models import CustomDriver, CustomHost

    if isinstance(model, CustomHost):
        return CustomDriver(name, model)
    if isinstance(model, EmbeddingModel):  # encoder artifacts: served by /v1/embeddings, no decode loop
        return EmbeddingDriver(name, model)
    from .drivers import EngineDriver

    return EngineDriver(name, model, max_batch=entry.max_batch, max_sequence=entry.max_sequence,
                        **(engine_options or {}))


class ModelRegistry:
    def __init__(self, sources: Sequence[Union[str, ArtifactSource, object]] = (), *, max_models: Optional[int] = None,
                 memory_budget_bytes: Optional[int] = None, device: str = "cpu", threads: Optional[int] = None,
                 wait_s: float = 30.0, loader: Optional[Callable] = None, driver_factory: Optional[Callable] = None,
                 trusted_keys: Optional[Sequence[str]] = None, max_model_len: Optional[int] = None,
                 max_batch_size: Optional[int] = None, allow_empty: bool = False,
                 engine_options: Optional[dict] = None):
        if max_models is not None and max_models < 1:
            raise RegistryError(f"max_models={max_models} must be >= 1")
        if memory_budget_bytes is not None and memory_budget_bytes <= 0:
            raise RegistryError(f"memory budget {memory_budget_bytes} bytes must be > 0")
        self.max_models = max_models
        self.memory_budget_bytes = memory_budget_bytes
        self.device = device
        self.threads = threads
        self.wait_s = wait_s
        self.trusted_keys = list(trusted_keys) if trusted_keys else None
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.engine_options = engine_options  # EngineDriver keywords: speculative, prefix_cache_bytes, prefill_chunk
        self.notes: list[str] = []  # said of every model (e.g. a flag that has no effect on this device)
        self._loader = loader
        self._driver_factory = driver_factory
        self._cond = threading.Condition()
        self._closed = False
        self.entries: dict[str, Entry] = {}  # name@version -> Entry, in registration order
        for src in sources:
            spec = _as_spec(src)
            resolved = self.resolve(spec)
            if spec.version is None and any(e.name == resolved.name for e in self.entries.values()):
                other = next(e for e in self.entries.values() if e.name == resolved.name)
                raise RegistryError(f"two artifacts are named {resolved.name!r}: {other.source} and {spec.path}; each "
                                    f"model needs its own name (or give each a version to serve them side by side)")
            self._add(spec, resolved)
        if not self.entries and not allow_empty:
            raise RegistryError("no artifacts to serve")

    # -- registration -----------------------------------------------------------------------------
    def resolve(self, spec):
        from .model_sources import resolve

        return resolve(spec, max_model_len=self.max_model_len, max_batch_size=self.max_batch_size,
                       trusted_keys=self.trusted_keys, device=self.device)

    def register(self, path=None, *, name: Optional[str] = None, version: Optional[str] = None,
                 format: Optional[str] = None, target: Optional[str] = None, spec=None, **fields) -> Entry:
        """Register a model (artifact, s3:// URI, checkpoint, model file, or `model_class=`); returns its Entry.
        Without a version it gets the next integer after the name's versions ("1" for a new name)."""
        if spec is None:
            values = {"path": str(path) if path is not None else ".", "name": name, "version": version,
                      "format": format, "target": target, **fields}
            try:
                spec = ModelConfig.model_validate({k: v for k, v in values.items() if v is not None})
            except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, in one line
                from .model_sources import ModelSourceError

                raise ModelSourceError(f"cannot register {path}: {first_problem(e)}") from None
        resolved = self.resolve(spec)
        return self._add(spec, resolved)

    def _add(self, spec, resolved) -> Entry:
        with self._cond:
            if self._closed:
                raise RegistryError("the registry is closed")
            version = spec.version
            if version is None:
                numbers = [int(e.version) for e in self.entries.values() if e.name == resolved.name
                           and e.version.isdigit()]
                version = str(max(numbers, default=0) + 1)
            key = f"{resolved.name}@{version}"
            if key in self.entries:
                raise RegistryError(f"model {key} is already registered (from {self.entries[key].source}); "
                                    f"give another version, or unregister it first")
            e = Entry(resolved, version=version, spec=spec.model_copy(update={"version": version}),
                      explicit_version=spec.version is not None)
            self.entries[key] = e
            self._cond.notify_all()
        for note in resolved.notes:
            logger.warning("model %s: %s", key, note)
        return e

    def unregister(self, name: str) -> Entry:
        """Remove a model version (unloading it). Refused while it has requests in flight."""
        with self._cond:
            e = self.entry(name)
            if e.leases:
                raise ModelBusy(f"model {e.key} has {e.leases} request(s) in flight; retry when they finish")
            if e.state == "loading":
                raise ModelBusy(f"model {e.key} is loading; retry when it is loaded")
            del self.entries[e.key]
            if e.state == "loaded":
                self._unload(e, timeout=None)
            self._cond.notify_all()
        logger.info("model %s: unregistered", e.key)
        return e

    # -- lookups ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [self.display_id(e) for e in list(self.entries.values())]

    def versions(self, name: str) -> list[Entry]:
        """The versions of `name`, oldest first."""
        return sorted((e for e in list(self.entries.values()) if e.name == name), key=lambda e: version_key(e.version))

    def newest(self, name: str) -> Optional[Entry]:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def display_id(self, e: Entry) -> str:
        """How a model is addressed and listed: its name for the newest version, name@version for older ones."""
        newest = self.newest(e.name)
        return e.name if newest is None or newest is e else e.key

    def entry(self, name: str) -> Entry:
        e = self.entries.get(name)
        if e is not None:
            return e
        if name is not None and "@" not in name:
            e = self.newest(name)
            if e is not None:
                return e
        raise ModelNotFound(name, self.names)

    def memory_used(self) -> int:
        return sum(e.memory_bytes for e in list(self.entries.values()))

    def loaded(self) -> list[str]:
        return [self.display_id(e) for e in list(self.entries.values()) if e.state == "loaded"]

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
            waited_on = None  # e.failures when this request began waiting for another request's load of `e`
            while True:
                if self._closed:
                    raise CapacityError("the server is shutting down")
                if e.key not in self.entries:
                    raise ModelNotFound(name, self.names)
                if e.state == "loaded":
                    e.leases += 1
                    e.last_used = time.monotonic()
                    return Lease(self, e)
                if e.state == "loading" and waited_on is None:
                    waited_on = e.failures
                if e.state == "unloaded":
                    if waited_on is not None and e.failures != waited_on:
                        # the load this request waited on failed: its error, rather than every waiter loading again
                        raise e.failure
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

    def load(self, name: str) -> Entry:
        """Load a model now (evicting idle ones if the budget needs it); a no-op if it is loaded."""
        with self.acquire(name) as lease:
            return lease.entry

    def unload(self, name: str) -> Entry:
        """Unload an idle model; it stays registered and loads again on its next use."""
        with self._cond:
            e = self.entry(name)
            if e.leases:
                raise ModelBusy(f"model {e.key} has {e.leases} request(s) in flight; retry when they finish")
            if e.state == "loaded":
                self._unload(e, timeout=None)
                logger.info("model %s: unloaded", e.key)
            self._cond.notify_all()
        return e

    def _release(self, e: Entry) -> None:
        with self._cond:
            e.leases -= 1
            e.last_used = time.monotonic()
            self._cond.notify_all()

    def preload(self) -> list[str]:
        """Load every model, in order, while it fits without evicting another; returns the names loaded.
        Load errors propagate (a server should not start on a broken artifact)."""
        done = []
        for e in list(self.entries.values()):
            with self._cond:
                if e.state != "unloaded" or self._plan_room(e, evict=False) is None:
                    if e.state == "unloaded":
                        logger.info("model %s: not loaded at startup (budget full); it loads on first use", e.key)
                    continue
                e.state = "loading"
            self._load(e).release()
            done.append(self.display_id(e))
        return done

    # -- budget -----------------------------------------------------------------------------------
    def _fits(self, e: Entry, resident: list[Entry]) -> bool:
        if self.max_models is not None and len(resident) + 1 > self.max_models:
            return False
        if self.memory_budget_bytes is not None:
            if sum(r.memory_bytes for r in resident) + e.weight_bytes > self.memory_budget_bytes:
                return False
        return True

    def _idle_by_age(self, e: Entry) -> list[Entry]:
        """Eviction's candidates: the loaded models other than `e` that no request holds, least recently used first."""
        return sorted((r for r in self.entries.values() if r is not e and r.state == "loaded" and r.leases == 0),
                      key=lambda r: r.last_used)

    def _plan_room(self, e: Entry, evict: bool = True) -> Optional[list[Entry]]:
        """Idle models to evict (least recently used first) so that `e` fits; None if it cannot fit now.
        Raises CapacityError if it cannot fit even with every other model gone."""
        if self.memory_budget_bytes is not None and e.weight_bytes > self.memory_budget_bytes:
            raise CapacityError(self._no_room_message(e, waited=False))
        resident = [r for r in self.entries.values() if r is not e and r.state != "unloaded"]
        victims: list[Entry] = []
        idle = self._idle_by_age(e)
        while not self._fits(e, resident):
            if not evict or not idle:
                return None
            victim = idle.pop(0)
            victims.append(victim)
            resident.remove(victim)
        return victims

    def _over_budget(self, e: Entry) -> list[Entry]:
        """Idle models to evict (least recently used first) to bring the memory in use back within the budget,
        with `e` loaded."""
        if self.memory_budget_bytes is None:
            return []
        used = self.memory_used()
        idle = self._idle_by_age(e)
        victims = []
        while used > self.memory_budget_bytes and idle:
            victims.append(idle.pop(0))
            used -= victims[-1].memory_bytes
        return victims

    def _no_room_message(self, e: Entry, waited: bool) -> str:
        budget = []
        if self.max_models is not None:
            budget.append(f"max_models {self.max_models}")
        if self.memory_budget_bytes is not None:
            budget.append(f"memory budget {self.memory_budget_bytes / 1e9:.3f} GB")
        if not waited:
            return (f"out of memory: model {e.key!r} needs {e.weight_bytes / 1e9:.3f} GB of weights, more than the "
                    f"{' and '.join(budget)}")
        busy = [f"{r.key} ({r.leases} request(s))" for r in self.entries.values() if r.leases]
        return (f"out of memory: model {e.key!r} ({e.weight_bytes / 1e9:.3f} GB) does not fit in the "
                f"{' and '.join(budget)} (in use: {self.memory_used() / 1e9:.3f} GB) and the models holding it are "
                f"busy: {', '.join(busy) or 'none'}; retry later")

    # -- load / evict -----------------------------------------------------------------------------
    def _load_model(self, e: Entry):
        if self._loader is not None:
            return self._loader(e.resolved.root, target=e.resolved.target, device=self.device, threads=self.threads)
        return e.resolved.load(self.device, self.threads)

    def _load(self, e: Entry) -> Lease:
        """Load `e` (its state is already 'loading', so its weights count against the budget)."""
        t0 = time.perf_counter()
        e.failure = None  # the last failure is for the requests that waited on it; it holds that load's frames
        try:
            model = self._load_model(e)
            name = self.display_id(e)
            try:
                driver = (self._driver_factory(name, model) if self._driver_factory is not None
                          else _default_driver(name, model, e, self.engine_options))
            except BaseException:
                model.close()
                raise
        except BaseException as exc:
            with self._cond:
                e.state = "unloaded"
                e.error = str(exc) or type(exc).__name__
                e.failures, e.failure = e.failures + 1, exc
                self._cond.notify_all()
            raise
        with self._cond:
            closed = self._closed
            if not closed:
                e.model, e.driver, e.state, e.error = model, driver, "loaded", None
                e.loads += 1
                e.leases += 1
                e.last_used = time.monotonic()
                # a load can hold more than the weights the budget made room for (a draft model, a mixed-step
                # session): idle models that no longer fit beside it go now
                for victim in self._over_budget(e):
                    self._evict(victim)
            else:
                e.state = "unloaded"
            self._cond.notify_all()
        if closed:  # close() ran during the load and unloaded only what was loaded then
            self._unload_parts(e, driver, model, timeout=None)
            raise CapacityError("the server is shutting down")
        logger.info("model %s: loaded %s in %.2fs (%.1f MB of weights)", e.key, e.resolved.target or e.resolved.kind,
                    time.perf_counter() - t0, e.weight_bytes / 1e6)
        return Lease(self, e)

    def _evict(self, e: Entry) -> None:
        """Unload an idle model (called under the lock; its driver has no work, so stopping is immediate)."""
        logger.info("model %s: evicted (least recently used) to make room", e.key)
        self._unload(e, timeout=None)
        e.evictions += 1

    def _unload(self, e: Entry, timeout: Optional[float]) -> None:
        driver, model = e.driver, e.model
        e.state, e.driver, e.model = "unloaded", None, None
        self._unload_parts(e, driver, model, timeout)

    @staticmethod
    def _unload_parts(e: Entry, driver, model, timeout: Optional[float]) -> None:
        if driver is not None and not driver.stop(timeout):
            logger.warning("model %s: requests still running after %.0fs; closing anyway", e.key, timeout or 0)
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

    # -- what a model is ------------------------------------------------------------------------
    def describe(self, e: Entry) -> dict:
        """A model's info: OpenAI's model object fields plus what Inferneo knows of it (the manifest's target,
        version, memory, validation status, and notes on how the flags applied)."""
        from datetime import datetime

        r = e.resolved
        info = {"id": self.display_id(e), "name": e.name, "version": e.version, "key": e.key,
                "versions": [v.version for v in self.versions(e.name)], "loaded": e.state == "loaded",
                "state": e.state, "kind": r.kind, "source": r.source, "validated": r.validated,
                "notes": list(r.notes) + list(self.notes), "error": e.error, "weight_bytes": e.weight_bytes}
        memory = {"weights_bytes": e.weight_bytes}
        model = e.model
        if model is not None and hasattr(model, "memory"):
            try:
                memory.update(model.memory())
            except Exception:  # noqa: BLE001 - memory figures are informative; never fail a listing on them
                pass
        # the KV-cache bytes the budget and /metrics count (the model's own figure leaves out the prefix cache and
        # the draft-model caches of its requests)
        memory.update(kv_cache_bytes=e.cache_bytes, mixed_step_weights_bytes=e.mixed_step_bytes,
                      resident_bytes=e.memory_bytes)
        info["memory"] = memory
        if r.manifest is None:  # a custom model class
            impl = getattr(getattr(e, "model", None), "impl", None)
            info.update(created=int(e.registered_at), format="custom", target=None, dtype=None,
                        model_class=getattr(r, "model_class", None),
                        validation={"status": "skipped", "reason": "custom model class"},
                        **(impl.info() if impl is not None else {}))
            return info
        m, t = r.manifest, r.manifest.targets[r.target]
        try:
            created = int(datetime.fromisoformat(m.built_at.replace("Z", "+00:00")).timestamp())
        except ValueError:
            created = int(e.registered_at)
        size = DTYPE_BYTES.get(t.dtype)
        from .model_sources import precision_of

        info.update(
            created=created, architecture=m.architecture, format=t.format, target=r.target, dtype=t.dtype,
            precision=precision_of(t), parameters=int(e.weight_bytes / size) if size else None,
            max_context=e.max_sequence or (t.shapes.max_sequence if t.shapes else m.model.max_positions),
            max_batch=e.max_batch or (t.shapes.max_batch if t.shapes else None),
            validation=t.validation.model_dump(exclude_none=True),
            adapters=[{"path": a.path, "sha256": a.sha256, "rank": a.rank} for a in m.source.adapters],
            targets={name: {"format": x.format, "status": x.status, "dtype": x.dtype, "precision": precision_of(x),
                            "validation": x.validation.status} for name, x in m.targets.items()})
        return info
