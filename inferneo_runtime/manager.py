"""ModelManager: the model registry as a Python API, saved to disk and restored on restart.

    from inferneo_runtime import ModelManager

    manager = ModelManager(max_models=2, max_memory_gb=8, lazy_loading=True, registry_path="registry.json")
    manager.register("chat", "artifacts/smollm2-135m", version="1")
    manager.register("chat", "s3://models/smollm2-135m", version="2")    # side by side with version 1
    manager.register("exported", "exports/model.onnx", format="onnx", tokenizer="artifacts/smollm2-135m")
    manager.generate("chat", "Hello", max_new_tokens=8).text             # the newest version: chat@2
    manager.generate("chat@1", "Hello", max_new_tokens=8).text           # the old one
    manager.list()                                                       # every version, with its info
    manager.unload("chat@1"); manager.unregister("chat@1")

The registry file (JSON) lists each registered model's settings (path, name, version, format, target, ...),
rewritten atomically after every register/unregister; a new ModelManager (or `inferneo serve --registry`) over
the same file registers them again. A saved model that cannot be restored (its path is gone) is logged, kept
in the file, and listed in `restore_errors`. `inferneo serve` uses this class, so what the server's
management API registers is saved the same way.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from .errors import InferneoError
from .model_config import ModelConfig
from .registry import Entry, ModelRegistry

logger = logging.getLogger("inferneo.server")

REGISTRY_SCHEMA = 1


class ModelManager(ModelRegistry):
    """A ModelRegistry you can register models into at run time, persisted to `registry_path` when given."""

    def __init__(self, sources: Sequence = (), *, max_models: Optional[int] = None,
                 max_memory_gb: Optional[float] = None, lazy_loading: bool = True,
                 registry_path: Optional[Union[str, Path]] = None, device: str = "cpu", threads: Optional[int] = None,
                 wait_s: float = 30.0, trusted_keys: Optional[Sequence[str]] = None,
                 max_model_len: Optional[int] = None, max_batch_size: Optional[int] = None,
                 memory_budget_bytes: Optional[int] = None, **kwargs):
        budget = memory_budget_bytes if memory_budget_bytes is not None else (
            int(max_memory_gb * 1e9) if max_memory_gb is not None else None)
        self.lazy_loading = lazy_loading
        self.registry_path = Path(registry_path) if registry_path else None
        self.restore_errors: dict[str, str] = {}
        self._unrestored: list[dict] = []
        self._save_lock = threading.Lock()
        super().__init__((), max_models=max_models, memory_budget_bytes=budget, device=device, threads=threads,
                         wait_s=wait_s, trusted_keys=trusted_keys, max_model_len=max_model_len,
                         max_batch_size=max_batch_size, allow_empty=True, **kwargs)
        self._restore()
        for src in sources:
            self.add_configured(src)

    # -- registration (persisted) ------------------------------------------------------------------
    def register(self, name_or_path=None, path=None, *, version: Optional[str] = None, format: Optional[str] = None,
                 spec=None, **fields) -> Entry:
        """register(name, path, version=..., format=...) or register(path) (the manifest's name).
        Without a version: the next integer after the name's versions. Loads it unless lazy_loading."""
        if spec is None and path is None:
            name_or_path, path = None, name_or_path
        entry = super().register(path, name=name_or_path if spec is None else None, version=version, format=format,
                                 spec=spec, **fields)
        self._save()
        if not self.lazy_loading:
            self.load(entry.key)
        return entry

    def add_configured(self, src) -> Optional[Entry]:
        """Register a model given on the command line or in the config file. The same model already restored
        from the registry file (same name, version and path) is kept as is."""
        from .registry import _as_spec

        spec = _as_spec(src)
        resolved = self.resolve(spec)
        for e in list(self.entries.values()):
            same_version = spec.version is None or spec.version == e.version
            if e.name == resolved.name and same_version and e.source == str(resolved.source):
                return e  # restored from the registry file
        if spec.version is None and any(e.name == resolved.name for e in self.entries.values()):
            other = next(e for e in self.entries.values() if e.name == resolved.name)
            from .registry import RegistryError

            raise RegistryError(f"two artifacts are named {resolved.name!r}: {other.source} and {spec.path}; each "
                                f"model needs its own name (or give each a version to serve them side by side)")
        entry = self._add(spec, resolved)
        self._save()
        return entry

    def unregister(self, name: str) -> Entry:
        entry = super().unregister(name)
        self._save()
        return entry

    def list(self) -> list[dict]:
        """Every registered version with its info (format, parameters, dtype, version, memory, validation)."""
        return [self.describe(e) for e in list(self.entries.values())]

    def get(self, name: str) -> dict:
        return self.describe(self.entry(name))

    # -- generation through the model's driver (safe beside a server using the same registry) ----------
    def stream(self, name: str, prompt: Union[str, list[dict]], **params) -> Iterator[str]:
        """Text pieces of a completion (a list of messages is rendered with the chat template)."""
        from .sampling import SamplingParams

        sp = SamplingParams(**params)
        with self.acquire(name) as lease:
            tok = lease.model.tokenizer
            ids = tok.encode_chat(prompt) if isinstance(prompt, list) else tok.encode(prompt)
            lease.driver.check(ids, sp)
            events: queue.Queue = queue.Queue()
            ticket = lease.driver.submit(ids, sp, events.put)
            try:
                while True:
                    item = events.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item.text:
                        yield item.text
                    if item.finish_reason is not None:
                        return
            finally:
                lease.driver.cancel(ticket)

    def generate(self, name: str, prompt: Union[str, list[dict]], **params):
        """A Completion-like result: .text, .finish_reason (runs on the model's driver, batched with others)."""
        from types import SimpleNamespace

        return SimpleNamespace(text="".join(self.stream(name, prompt, **params)))

    # -- persistence ----------------------------------------------------------------------------------
    def _record(self, e: Entry) -> dict:
        spec = e.spec.model_dump(exclude_none=True) if e.spec is not None else {"path": e.source}
        spec["name"], spec["version"] = e.name, e.version
        return {**spec, "registered_at": e.registered_at}

    def _save(self) -> None:
        if self.registry_path is None:
            return
        with self._save_lock:
            records = [self._record(e) for e in list(self.entries.values())] + self._unrestored
            payload = {"schema_version": REGISTRY_SCHEMA, "models": records}
            self.registry_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.registry_path.with_name(self.registry_path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, self.registry_path)

    def _restore(self) -> None:
        if self.registry_path is None or not self.registry_path.is_file():
            return
        try:
            data = json.loads(self.registry_path.read_text(encoding="utf-8"))
            records = data["models"] if data.get("schema_version") == REGISTRY_SCHEMA else None
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise InferneoError(f"{self.registry_path}: unreadable model registry ({e}); fix or remove it") from None
        if not isinstance(records, list):
            raise InferneoError(f"{self.registry_path}: not a registry of schema_version {REGISTRY_SCHEMA}")
        for record in records:
            fields = {k: v for k, v in record.items() if k in ModelConfig.model_fields}
            label = f"{record.get('name')}@{record.get('version')}"
            try:
                spec = ModelConfig.model_validate(fields)
                entry = self._add(spec, self.resolve(spec))
                entry.explicit_version = True
                if "registered_at" in record:
                    entry.registered_at = float(record["registered_at"])
            except Exception as e:  # noqa: BLE001 - one bad record must not take the others down
                logger.error("model %s: not restored from %s: %s", label, self.registry_path, e)
                self.restore_errors[label] = str(e)
                self._unrestored.append(record)
        if records:
            logger.info("restored %d model(s) from %s", len(records) - len(self.restore_errors), self.registry_path)
