"""`inferneo serve`: its flags are generated from the settings model (server/config.py's ServerConfig), so a
setting is declared once (type, bounds, description) and is at once a config-file key, an INFERNEO_* variable
and a flag. tests/test_layout.py checks that every setting has one."""
from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .cli_base import needs_extra, run_command
from .server.config import ServerConfig

# A setting's flag is --its-name with dashes, except these (vLLM's names, or older short ones).
FLAG_NAMES = {
    "models": ("--model",), "adapters": ("--adapter",), "trusted_keys": ("--trusted-key",),
    "allowed_hosts": ("--allowed-host",), "model_roots": ("--model-root",), "registry_path": ("--registry",),
    "graceful_timeout_s": ("--drain-timeout",), "lazy": ("--lazy/--eager", "--lazy-loading/--eager-loading"),
    "enable_metrics": ("--enable-metrics/--disable-metrics",),
}
# Settings that are not flags, and where they are given instead.
NOT_FLAGS = {"artifacts": "the ARTIFACTS arguments", "routing": "the config file's `routing:` (rules and A/B tests)"}
# Flags of the command that are not settings.
COMMAND_FLAGS = {"config", "ray", "replicas"}


def flag_names(setting: str) -> tuple[str, ...]:
    field = ServerConfig.model_fields[setting]
    if setting in FLAG_NAMES:
        return FLAG_NAMES[setting]
    name = "--" + setting.replace("_", "-")
    return (f"{name}/--no-{name[2:]}",) if _base_type(field.annotation) is bool else (name,)


def setting_flags() -> dict[str, tuple[str, ...]]:
    """Every setting that is a flag, with its flag names."""
    return {name: flag_names(name) for name in ServerConfig.model_fields if name not in NOT_FLAGS}


def _base_type(annotation):
    """The type a flag parses: Optional[X] is X, list[X] stays a list (repeatable), Literal and constrained str
    are str (the settings model checks the value and names the choices)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is list:
        return list[str]
    if origin is typing.Union and len(args) == 1:
        return _base_type(args[0])
    if origin is typing.Annotated:
        return _base_type(args[0])
    return annotation if annotation in (bool, int, float) else str


def _choices(annotation) -> tuple:
    """The values a Literal setting (optional or not) takes; () for any other type."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return next((c for a in typing.get_args(annotation) if (c := _choices(a))), ())


def _help(field) -> str:
    text = field.description or ""
    choices = _choices(field.annotation)
    if choices and len(choices) > 1 and not all(c in text for c in choices):
        text += f" ({' | '.join(choices)})"
    if isinstance(field.default, bool):
        text += f" (default {'on' if field.default else 'off'})"
    elif field.default_factory is None and field.default is not None and "default" not in text:
        text += f" (default {field.default})"
    return escape(text)


def _option(name: str) -> inspect.Parameter:
    field = ServerConfig.model_fields[name]
    bounds = {}
    for rule in field.metadata:  # Ge/Le become typer's min/max, so a bad value is refused before anything runs
        if hasattr(rule, "ge"):
            bounds["min"] = rule.ge
        if hasattr(rule, "le"):
            bounds["max"] = rule.le
    kind = _base_type(field.annotation)
    if kind not in (int, float):
        bounds = {}
    option = typer.Option(None, *flag_names(name), help=_help(field), **bounds)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind])


def serve_parameters() -> list[inspect.Parameter]:
    """The serve command's parameters: ARTIFACTS, one option per setting, then the command's own flags."""
    artifacts = inspect.Parameter("artifacts", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[list[str]],
                                  default=typer.Argument(None, metavar="ARTIFACTS", help=escape(ServerConfig.model_fields["artifacts"]
                                                                           .description)))
    own = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--config", help="YAML settings file (flags and INFERNEO_* env win)")),
        inspect.Parameter("ray", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--ray", help="run replicas on Ray Serve: a local cluster, or RAY_ADDRESS's (needs inferneo\\[ray])")),
        inspect.Parameter("replicas", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
            None, "--replicas", help="with --ray: replica count (2), or a range to autoscale in (1-4)")),
    ]
    return [artifacts, *(_option(name) for name in setting_flags()), *own]


def serve(**flags) -> None:
    """Serve models over an OpenAI-compatible HTTP API (needs inferneo\\[serve])."""
    run_command(lambda: _serve(**flags), as_json=False)


def _serve(config: Optional[Path], ray: bool, replicas: Optional[str], **flags) -> None:
    with needs_extra("serve", "serve"):
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        import prometheus_client  # noqa: F401
    from .server.config import load_server_config
    from .server.lifecycle import run_server

    settings = load_server_config(config, overrides=flags)
    if ray or replicas:  # many replicas on Ray Serve, same app (inferneo_runtime/integrations/ray_serve.py)
        from .integrations.ray_serve import serve_on_ray

        return serve_on_ray(settings, replicas)
    run_server(settings)


# typer reads a command's parameters from its signature: give `serve` the generated one
serve.__signature__ = inspect.Signature(serve_parameters())
