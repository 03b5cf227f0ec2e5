"""The package layout a newcomer relies on, checked from the source (every import, inside functions too; imports
under `if TYPE_CHECKING:` are annotations only and do not count)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "inferneo_runtime"
SERVER_MAX_LINES = 400
CLI_MAX_LINES = 350
# the only runtime modules that may import the server: the CLI starts it, Ray Serve builds its app
SERVER_IMPORTERS = {"inferneo_runtime.cli", "inferneo_runtime.cli_serve", "inferneo_runtime.integrations.ray_serve"}
# the only runtime modules that may import the builder: the CLI's build-side commands, and compiling a checkpoint
# that `serve --model` was pointed at
BUILD_IMPORTERS = {"inferneo_runtime.cli", "inferneo_runtime.cli_build", "inferneo_runtime.model_sources.checkpoint"}


def _modules(package: Path) -> dict[str, Path]:
    mods = {}
    for f in package.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _runtime_imports(path: Path, module: str) -> set[str]:
    """Absolute names of what `module` imports at run time (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph(package: Path) -> dict[str, set[str]]:
    mods = _modules(package)
    # an edge to a submodule only: a package's __init__ runs first for any import, which is how packages work
    return {m: {t for t in _runtime_imports(f, m) if t in mods and t != m and not m.startswith(t + ".")}
            for m, f in mods.items()}


def test_the_analysis_sees_imports_inside_functions():
    graph = _graph(RUNTIME)
    assert "inferneo_runtime.server.lifecycle" in graph["inferneo_runtime.cli_serve"]  # imported inside `serve`
    assert "inferneo_runtime.drivers" in graph["inferneo_runtime.registry"]  # inside _default_driver


def test_no_file_in_the_server_is_over_400_lines():
    long = {str(f.relative_to(ROOT)): n for f in (RUNTIME / "server").rglob("*.py")
            if (n := len(f.read_text().splitlines())) > SERVER_MAX_LINES}
    assert not long, long


def test_only_the_cli_and_ray_serve_import_the_server():
    graph = _graph(RUNTIME)
    importers = {m for m, targets in graph.items() if not m.startswith("inferneo_runtime.server")
                 and any(t.startswith("inferneo_runtime.server") for t in targets)}
    assert importers <= SERVER_IMPORTERS, importers - SERVER_IMPORTERS


def test_the_cli_is_thin():
    cli = [RUNTIME / "cli.py", *RUNTIME.glob("cli_*.py")]
    long = {str(f.relative_to(ROOT)): n for f in cli if (n := len(f.read_text().splitlines())) > CLI_MAX_LINES}
    assert not long, long


def test_only_the_cli_and_on_demand_compilation_import_the_builder():
    importers = {m for m, f in _modules(RUNTIME).items()
                 if any(t.split(".")[0] == "inferneo_build" for t in _runtime_imports(f, m))}
    assert "inferneo_runtime.cli_build" in importers  # the analysis sees them
    assert importers <= BUILD_IMPORTERS, importers - BUILD_IMPORTERS


def test_every_server_setting_is_a_flag_of_serve():
    from typer.main import get_command

    from inferneo_runtime.cli import app
    from inferneo_runtime.cli_serve import COMMAND_FLAGS, NOT_FLAGS, setting_flags
    from inferneo_runtime.server.config import ServerConfig

    serve = get_command(app).commands["serve"]
    options = {o for p in serve.params for o in (*p.opts, *p.secondary_opts)}
    flags = setting_flags()
    assert set(flags) | set(NOT_FLAGS) == set(ServerConfig.model_fields)
    for setting, names in flags.items():
        for name in names:
            assert set(name.split("/")) <= options, (setting, name)
        param = next(p for p in serve.params if p.name == setting)
        assert param.help, f"--{setting} has no help: give ServerConfig.{setting} a description"
    # what the flags set reaches the settings, under the settings' names
    from inferneo_runtime.server.config import load_server_config

    ctx = serve.make_context("serve", ["--model", "m", "--max-queue", "7", "--drain-timeout", "3", "--eager",
                                       "--disable-metrics", "--allowed-host", "a.example", "--admin-token", "t"])
    assert not COMMAND_FLAGS & set(ServerConfig.model_fields)  # the command's own flags are not settings
    flagged = {k: v for k, v in ctx.params.items() if k not in COMMAND_FLAGS}
    s = load_server_config(None, overrides=flagged, env={})
    assert (s.max_queue, s.graceful_timeout_s, s.lazy, s.enable_metrics, s.allowed_hosts, s.admin_token) == \
        (7, 3.0, False, False, ["a.example"], "t")
    assert [m.path for m in s.models] == ["m"]


@pytest.mark.parametrize("package", ["inferneo_runtime", "inferneo_build"])
def test_no_import_cycles(package):
    graph = _graph(ROOT / package)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
