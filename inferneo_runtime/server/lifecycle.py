"""`inferneo serve`: build the registry, open the port at once, load and warm up the models on a thread, and on
SIGTERM drain (DrainingServer): /ready and new requests get 503, running requests and streams finish (for up to
`graceful_timeout_s`, --drain-timeout; then they end with a 503), the port closes, the engines stop, exit 0."""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import uvicorn

from ..drivers import DriverStopped
from .admin_guard import binds_loopback
from .app import create_app
from .config import ConfigError, ServerConfig, artifacts_to_serve
from .state import ServerState

logger = logging.getLogger("inferneo.server")


def _setup_logging(level: str) -> None:
    log = logging.getLogger("inferneo")
    log.setLevel(logging.DEBUG if level == "trace" else level.upper())
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def _cuda_budget(config: ServerConfig) -> Optional[int]:
    """--gpu-memory-utilization on a CUDA device: that share of the device's memory, as the memory budget."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = int(config.device.partition(":")[2] or 0)
    return int(torch.cuda.get_device_properties(index).total_memory * config.gpu_memory_utilization)


def build_registry(config: ServerConfig):
    """The ModelManager `inferneo serve` runs: the configured models (and those saved in `registry_path`)."""
    from ..manager import ModelManager

    config.check_parallelism()
    budget, notes = config.memory_budget_bytes, []
    util = config.gpu_memory_utilization
    if util is not None:
        if config.device.startswith("cuda"):
            cuda = _cuda_budget(config) if budget is None else None
            if cuda is not None:
                budget = cuda
                notes.append(f"--gpu-memory-utilization {util}: memory budget {cuda / 1e9:.2f} GB of "
                             f"{config.device} for weights + KV caches")
            elif budget is not None:
                notes.append(f"--gpu-memory-utilization {util}: not applied, --memory-budget-gb "
                             f"{config.memory_budget_gb} sets the budget")
        else:
            notes.append(f"--gpu-memory-utilization {util} has no effect on {config.device}: it sets the CUDA "
                         f"memory budget (weights + KV caches); use --memory-budget-gb for a CPU budget")
            logger.warning(notes[-1])
    manager = ModelManager(max_models=config.max_models, memory_budget_bytes=budget, lazy_loading=True,
                           registry_path=config.registry_path, device=config.device, threads=config.threads,
                           wait_s=config.load_wait_s, trusted_keys=config.trusted_keys or None,
                           max_model_len=config.max_model_len, max_batch_size=config.max_batch_size,
                           engine_options=config.engine_options())
    try:
        manager.notes.extend(notes)
        configured = artifacts_to_serve(config)
        for spec in configured:
            manager.add_configured(spec)
        if not manager.entries:
            raise ConfigError(f"no model to serve: the registry {config.registry_path} restored none"
                              + (f" ({'; '.join(manager.restore_errors.values())})" if manager.restore_errors else ""))
    except BaseException:
        manager.close(timeout=0)
        raise
    return manager


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with a drain before its shutdown. On the first SIGTERM (or SIGINT) /ready turns 503 at
    once and new requests get 503 while the port stays open and in-flight requests (streams too) run to their end,
    so a load balancer takes the replica out before connections are refused. When no request is left, or
    `drain_timeout` seconds have passed (generation requests still running then end with a 503), uvicorn's
    shutdown runs: the port closes, the engines stop, and `run()` returns (exit status 0). A second signal
    stops the server at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self.drain_deadline: Optional[float] = None
        self._announced = False

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is None and not self.should_exit:
            self.state.shutting_down = True  # here, in the handler: the very next probe sees it
            self.drain_deadline = time.monotonic() + self.drain_timeout
            return  # not recorded as uvicorn's captured signal, which it re-raises after shutdown (exit -15, not 0)
        super().handle_exit(sig, frame)
        self.force_exit = True

    async def on_tick(self, counter: int) -> bool:  # uvicorn calls it every 0.1 s
        if self.drain_deadline is not None and not self.should_exit:
            running, left = len(self.server_state.tasks), self.drain_deadline - time.monotonic()
            if not self._announced:
                self._announced = True
                logger.warning("draining: /ready is 503, new requests get 503; waiting up to %.0fs for %d running "
                               "request(s)", self.drain_timeout, running)
            if not running or left <= 0:
                if running:
                    # generation requests end with a 503 (a stream: an error event and [DONE]) rather than a cut
                    # connection; uvicorn cancels whatever else still runs after a second more
                    jobs = list(self.state.jobs)
                    for job in jobs:
                        job.abort(DriverStopped("the server shut down (drain timeout) before this request finished"))
                    self.state.drain_expired.set()  # and those still waiting for a model (not jobs yet) get a 503
                    logger.warning("drain timeout (%.0fs): ending %d running generation request(s) with a 503",
                                   self.drain_timeout, len(jobs))
                self.config.timeout_graceful_shutdown = max(left, 1.0)  # uvicorn's own wait for what is left
                self.should_exit = True
        return await super().on_tick(counter)


def run_server(config: ServerConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain (DrainingServer) and return. The port opens at once (/health
    answers, /ready is 503) while the models load and warm up on a thread; a model that fails to load stops the
    server and its error is raised here."""
    _setup_logging(config.log_level)
    registry = build_registry(config)
    app = create_app(registry, config)
    state: ServerState = app.state.inferneo
    if config.admin_api and not config.admin_token and not binds_loopback(config.host):
        logger.warning("binding %s without an admin token: the management API is off (set INFERNEO_ADMIN_TOKEN)",
                       config.host)
    # proxy_headers off: the client address (admin loopback check, per-client caps) is the socket peer, never a
    # header such as X-Forwarded-For
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                           proxy_headers=False,
                                           timeout_graceful_shutdown=config.graceful_timeout_s),
                            state, drain_timeout=config.graceful_timeout_s)
    failed: list[BaseException] = []

    def start() -> None:
        try:
            state.start_models()
        except BaseException as e:  # noqa: BLE001 - a server should not run on a model that cannot load
            if not state.shutting_down:
                failed.append(e)
                server.should_exit = True
            return
        loaded = registry.loaded()
        lazy = [n for n in registry.names if n not in loaded]
        logger.info("serving %s on http://%s:%d%s", ", ".join(registry.names), config.host, config.port,
                    f" ({', '.join(lazy)} load on first use)" if lazy else "")

    state.starting = True  # before the thread runs: /ready must not answer 200 while nothing has started loading
    threading.Thread(target=start, name="inferneo-startup", daemon=True).start()
    server.run()
    if failed:
        raise failed[0]
