"""Ray Serve: `inferneo serve`'s app on many replicas of a Ray cluster (needs `inferneo[ray]`).

Each replica opens the artifacts (directories, or s3:// URIs fetched into that node's verified cache),
loads and warms them up, then serves the *same* FastAPI app as `inferneo serve` (`create_app`, wrapped
with `@serve.ingress`): /v1/completions, /v1/chat/completions (streaming too), /v1/models, /health,
/ready, /metrics. Ray routes to a replica only once its constructor returned, i.e. after load + warm-up;
`check_health` lets Ray replace a replica whose models are gone; on scale-down or shutdown Ray stops
routing to the replica, waits for its in-flight requests (`graceful_shutdown_timeout_s`), and the app's
lifespan then drains the engines.

    from inferneo_runtime.integrations.ray_serve import deployment
    from ray import serve

    serve.run(deployment(["s3://models/smollm2"], num_replicas=2), route_prefix="/")

    # or: inferneo serve s3://models/smollm2 --ray --replicas 2       (RAY_ADDRESS: an existing cluster)
    # or: serve run inferneo_runtime.integrations.ray_serve:app_builder artifacts=s3://models/smollm2 replicas=2

Replicas: a number, or autoscaling (`--replicas 1-4`, or `autoscaling_config=` with Ray's fields).
GPUs: `device="cuda"` reserves one GPU per replica unless `ray_actor_options` says otherwise.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, Mapping, Optional, Sequence, Union

from ..errors import InferneoError, MissingExtraError, RequestError

logger = logging.getLogger("inferneo.integrations")

APP_NAME = "inferneo"
FORWARDED_ENV = ("AWS_", "INFERNEO_", "HF_")
DEFAULT_MAX_ONGOING_REQUESTS = 64  # per replica; the engine batches them (Ray's own default, 5, starves it)

_replica: dict[str, Any] = {}  # this replica process's app, handed from the constructor to Ray's ASGI wrapper


class ReplicaError(InferneoError):
    """A replica cannot serve (its models are not loaded)."""


def _serve_module():
    try:
        from ray import serve
    except ImportError:
        raise MissingExtraError("Ray Serve deployment", "ray", "ray[serve]") from None
    return serve


class InferneoReplica:
    """One replica: a registry over the configured artifacts, loaded and warmed before Ray routes to it."""

    def __init__(self, settings: Mapping[str, Any]):
        from ..server.app import create_app
        from ..server.lifecycle import build_registry
        from ..server.config import ServerConfig

        config = ServerConfig.model_validate(dict(settings))
        registry = build_registry(config)
        try:
            app = create_app(registry, config)
            app.state.inferneo.start_models()  # load + warm up, as `inferneo serve` does, before Ray routes here
        except BaseException:
            registry.close(timeout=0)
            raise
        self._registry = registry
        self._lazy = config.lazy
        _replica["app"] = app
        logger.info("replica ready: %s", ", ".join(registry.loaded()) or "(lazy)")

    def check_health(self) -> None:
        """Called by Ray Serve every `health_check_period_s`; raising makes Ray replace this replica."""
        if self._lazy:
            return
        missing = [n for n in self._registry.names if n not in self._registry.loaded()]
        if missing and not self._registry.loaded():
            errors = {e.name: e.error for e in self._registry.entries.values() if e.error}
            raise ReplicaError(f"no model is loaded (missing: {', '.join(missing)}; errors: {errors or 'none'})")


def _replica_app():
    """Ray's ingress builder: called in the replica, after InferneoReplica.__init__ made the app."""
    return _replica["app"]


def parse_replicas(replicas: Union[int, str, None]) -> tuple[Optional[int], Optional[dict]]:
    """`2` → fixed 2 replicas; `"1-4"` → autoscaling between 1 and 4; `"auto"` → autoscaling in 1-4."""
    if replicas is None:
        return 1, None
    text = str(replicas).strip()
    if text == "auto":
        return None, {"min_replicas": 1, "max_replicas": 4}
    try:
        if "-" in text:
            lo, hi = (int(p) for p in text.split("-", 1))
            if not 0 <= lo <= hi or hi < 1:
                raise ValueError
            return None, {"min_replicas": lo, "max_replicas": hi}
        n = int(text)
        if n < 1:
            raise ValueError
        return n, None
    except ValueError:
        raise RequestError(f"--replicas {text!r}: give a count (2), a range to autoscale in (1-4), or auto") from None


def deployment(artifacts: Sequence[str] = (), *, settings: Optional[Mapping[str, Any]] = None,
               num_replicas: Union[int, str, None] = 1, autoscaling_config: Optional[Mapping[str, Any]] = None,
               ray_actor_options: Optional[Mapping[str, Any]] = None, num_cpus: Optional[float] = None,
               num_gpus: Optional[float] = None, max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
               graceful_shutdown_timeout_s: Optional[float] = None, health_check_period_s: float = 10.0,
               name: str = "Inferneo", forward_env: bool = True, **deployment_options):
    """A bound Ray Serve application serving `artifacts` (directories or s3:// URIs) on each replica.

    settings: ServerConfig fields for every replica (target per artifact, max_queue, threads, device, ...);
    `artifacts` is merged into it. num_replicas: a count, "1-4" or "auto" (autoscaling), or use
    `autoscaling_config` (Ray's fields: min_replicas, max_replicas, target_ongoing_requests, ...).
    ray_actor_options: Ray's per-replica resources; by default 1 CPU, plus 1 GPU when device is cuda.
    forward_env: give replicas this process's AWS_*, INFERNEO_* and HF_* variables (S3 endpoint and
    credentials, caches), since Ray workers do not inherit the driver's environment.
    Extra keyword arguments go to `serve.deployment` unchanged.
    """
    from ..server.config import ServerConfig

    serve = _serve_module()
    merged = dict(settings or {})
    if artifacts:
        merged["artifacts"] = [a if isinstance(a, Mapping) else {"path": str(a)} for a in artifacts]
    for key in ("artifacts", "models"):  # replicas do not share the driver's working directory
        if merged.get(key):
            merged[key] = [_absolute(m) for m in merged[key]]
    config = ServerConfig.model_validate(merged)  # fail here, on the driver, rather than in every replica
    if not (merged.get("artifacts") or merged.get("models")):
        raise InferneoError("no artifact to serve: pass artifact directories or s3:// URIs")
    count, autoscale = (num_replicas, None) if isinstance(num_replicas, int) else parse_replicas(num_replicas)
    actor = dict(ray_actor_options or {})
    if forward_env:  # replicas run in workers that do not see this process's environment
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        runtime_env = dict(actor.get("runtime_env") or {})
        runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
        actor["runtime_env"] = runtime_env
    if num_cpus is not None:
        actor["num_cpus"] = num_cpus
    if num_gpus is not None:
        actor["num_gpus"] = num_gpus
    elif config.device.startswith("cuda") and "num_gpus" not in actor:
        actor["num_gpus"] = 1
    options: dict[str, Any] = dict(name=name, ray_actor_options=actor, max_ongoing_requests=max_ongoing_requests,
                                   health_check_period_s=health_check_period_s,
                                   graceful_shutdown_timeout_s=(config.graceful_timeout_s
                                                                if graceful_shutdown_timeout_s is None
                                                                else graceful_shutdown_timeout_s))
    if autoscaling_config or autoscale:
        options["autoscaling_config"] = dict(autoscaling_config or autoscale)
    else:
        options["num_replicas"] = count
    options.update(deployment_options)
    cls = serve.ingress(_replica_app)(InferneoReplica)
    return serve.deployment(cls, **options).bind(config.model_dump(mode="json", exclude_none=True))


def _absolute(model) -> Any:
    """A model entry (a path string or a mapping with `path`) with a local path made absolute; URIs and hub
    ids (nothing at that path here) are left alone."""
    entry = dict(model) if isinstance(model, Mapping) else {"path": str(model)}
    path = str(entry.get("path", ""))
    if path and "://" not in path and os.path.exists(path):
        entry["path"] = os.path.abspath(path)
    return entry


def app_builder(args: Mapping[str, str]):
    """For `serve run inferneo_runtime.integrations.ray_serve:app_builder artifacts=a,b replicas=2 ...` and
    Serve config files (import_path). Keys: artifacts (comma-separated), replicas, num_cpus, num_gpus, and
    any ServerConfig field (device, threads, max_queue, default_max_tokens, ...)."""
    args = dict(args)
    artifacts = [a.strip() for a in str(args.pop("artifacts", "")).split(",") if a.strip()]
    replicas = args.pop("replicas", 1)
    num_cpus = float(args.pop("num_cpus")) if "num_cpus" in args else None
    num_gpus = float(args.pop("num_gpus")) if "num_gpus" in args else None
    args.pop("host", None), args.pop("port", None)  # Ray's proxy owns the HTTP address
    return deployment(artifacts, settings=args, num_replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _loopback_cluster() -> None:
    """Make a local Ray cluster bind to 127.0.0.1 like `inferneo serve` does. Ray otherwise takes the host's
    routable address as the node address even when asked for 127.0.0.1 (it 'resolves' localhost); with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read when ray is imported) it keeps the loopback address."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray was imported already
        constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false", "False")


def serve_on_ray(config, replicas: Union[int, str, None] = None, *, wait: bool = True,
                 stop_event: Optional[threading.Event] = None) -> str:
    """`inferneo serve --ray`: deploy `config` (a ServerConfig) on Ray and serve until SIGINT/SIGTERM.

    Connects to RAY_ADDRESS when set (an existing cluster: `ray start --head` or a KubeRay cluster),
    otherwise starts a local one. Ray's HTTP proxy listens on config.host:config.port. On a signal the
    application is deleted (Ray drains each replica) and a cluster this command started is shut down.
    Returns the base URL (with wait=False it returns once every replica is up, leaving it running).
    """
    if not isinstance(replicas, int):
        parse_replicas(replicas)  # a bad value is refused before a cluster starts
    local = not os.environ.get("RAY_ADDRESS")
    if local and config.host in LOOPBACK:
        _loopback_cluster()
    serve = _serve_module()  # without ray[serve]: the extra to install (exit 5)
    import ray
    started_cluster = False
    if not ray.is_initialized():
        options: dict[str, Any] = {"logging_level": logging.WARNING}
        if local:
            started_cluster = True
            if config.host in LOOPBACK:
                options["_node_ip_address"] = "127.0.0.1"
            options["include_dashboard"] = False
        ray.init(**options)
    from ..server.config import artifacts_to_serve

    settings = config.model_dump(mode="json", exclude_none=True)
    settings["artifacts"] = [m.model_dump(mode="json", exclude_none=True) for m in artifacts_to_serve(config)]
    settings.pop("models", None)  # artifacts_to_serve merged them (and the default artifact) in
    app = deployment(settings=settings, num_replicas=replicas)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{config.host}:{config.port}"
    logger.warning("serving %s on %s with Ray Serve (%s replica(s))",
                   ", ".join(a["path"] for a in settings["artifacts"]), url, replicas or 1)
    print(f"Inferneo on Ray Serve: {url}  (Ray {'local cluster' if started_cluster else os.environ['RAY_ADDRESS']})",
          flush=True)
    if not wait:
        return url
    stop = stop_event or threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        logger.warning("stopping: draining the replicas of %s", APP_NAME)
        serve.delete(APP_NAME)  # Ray stops routing, waits for in-flight requests, then stops replicas
        if started_cluster:
            serve.shutdown()
            ray.shutdown()
    return url
