"""Shared fixtures: tiny random checkpoints and artifacts built once per session, and the real SmolLM2 build."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["The quick brown fox", "Hello world, this is", "Inferneo compiles models ahead of time and serves"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Conversions and build caches go to a per-run directory unless the caller chose one (CI may reuse it).
    if "INFERNEO_CACHE_DIR" not in os.environ:
        os.environ["INFERNEO_CACHE_DIR"] = str(tmp_path_factory.mktemp("inferneo-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = make_tiny_checkpoint(model_type, tmp_path_factory.mktemp(f"ckpt-{model_type}"))
        return made[model_type]

    return get


def write_recipe(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def tiny_recipe_fields(checkpoint: Path, name: str, output: Path, targets=("onnx", "torchscript"), **overrides) -> dict:
    fields = {
        "name": name,
        "source": {"path": str(checkpoint)},
        "targets": [{"format": t} for t in targets],
        "shapes": {"max_batch": 4, "max_sequence": 128},
        "validation": {"prompts": PROMPTS, "max_new_tokens": 16, "logits_atol": 1e-3},
        "output": str(output),
    }
    fields.update(overrides)
    return fields


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint, tmp_path_factory):
    """Build (once per session) a tiny artifact with ONNX + TorchScript targets for a model type."""
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            out = tmp_path_factory.mktemp(f"art-{model_type}") / f"tiny-{model_type}"
            recipe = Recipe.model_validate(tiny_recipe_fields(tiny_checkpoint(model_type), f"tiny-{model_type}", out))
            built[model_type] = build(recipe).output
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory):
    """The bundled recipe, built once per session (GGUF conversion + both targets + validation)."""
    from inferneo_build import build, load_recipe

    if os.environ.get("INFERNEO_SMOLLM2_ARTIFACT"):  # reuse a build made earlier in the same CI run
        return Path(os.environ["INFERNEO_SMOLLM2_ARTIFACT"])
    recipe = load_recipe(REPO / "recipes" / "smollm2-135m.yaml")
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m"
    return build(recipe, out).output


def run_cli(*args: str, env: dict | None = None, timeout: float = 600):
    """Run the installed `inferneo` console script as a user would."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "inferneo_runtime.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- `inferneo serve` in its own process ----------------------------------------------------------------------
def wait_ready(url: str, proc=None, log: Path | None = None, timeout: float = 60) -> None:
    """Poll `url`/ready until it answers 200; fail with the server's log if it exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server at {url} not ready after {timeout}s:\n{log.read_text() if log else ''}")


@contextmanager
def serve_subprocess(args: list[str], cwd: Path, port: int, env: dict | None = None, timeout: float = 60):
    """`inferneo serve ARGS` (listening on `port`, which ARGS or `env` set) as a subprocess, yielded once ready as
    (url, proc, log). SIGTERM at the end must drain and exit 0 with no traceback in the log."""
    log = cwd / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "inferneo_runtime.cli", "serve", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log, timeout)
        yield SimpleNamespace(url=url, proc=proc, log=log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, f"unclean shutdown ({rc}):\n{text}"


# -- a real S3-compatible server (moto over HTTP, in its own process) -------------------------------------
@contextmanager
def moto_server(log_dir: Path, **env: str):
    """`python -m moto.server` on a free local port (with `env` added to its environment); yields its URL."""
    port = free_port()
    log = open(log_dir / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start (see {log.name})")
            time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


@pytest.fixture
def s3env(s3_server, monkeypatch, tmp_path):
    """The standard AWS variables pointed at the local server, and a cache of this test's own."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("INFERNEO_CACHE_DIR", str(tmp_path / "cache"))
    return s3_server


@pytest.fixture
def client(s3env):
    import boto3

    return boto3.client("s3")


@pytest.fixture
def bucket(client):
    name = f"inferneo-test-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    return name
