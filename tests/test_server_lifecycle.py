"""`inferneo serve`'s lifecycle for orchestrators: ready only once warmed up, and a drain on SIGTERM.

The drain tests run the real `inferneo serve` (its signal handling, uvicorn, the engine) as a subprocess, with
each engine step slowed by a fixed delay so that a 60-token stream is reliably still running when SIGTERM
arrives (the tiny model alone generates 60 tokens in a few milliseconds).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from conftest import free_port  # noqa: E402

PROMPT = "The quick brown fox"
STEP_DELAY_S = 0.03  # per engine step (one token per sequence): 60 tokens take about 2 s

# `inferneo serve` as users run it, with Engine.step slowed down (the only change).
SLOW_SERVE = f"""
import sys, time
from inferneo_runtime import generation
step = generation.Engine.step
def slow_step(self):
    time.sleep({STEP_DELAY_S})
    return step(self)
generation.Engine.step = slow_step
from inferneo_runtime.cli import main
sys.argv = ["inferneo", "serve", *sys.argv[1:]]
main()
"""


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


@pytest.fixture(scope="module")
def llama(tiny_artifact):
    return tiny_artifact("llama")


@contextmanager
def slow_serve(artifact: Path, tmp_path: Path, *args: str):
    """The subprocess; every /ready answer seen while it starts is recorded (`starting`)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, "--model", str(artifact), "--port", str(port),
                                 "--threads", "1", "--log-level", "warning", *args],
                                stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    starting = []

    def ready():
        assert proc.poll() is None, log.read_text()
        try:
            r = httpx.get(f"{url}/ready", timeout=2)
        except httpx.TransportError:  # not listening yet
            return None
        starting.append((r.status_code, r.json()))
        return r.status_code == 200

    try:
        wait_until(ready, 60, f"serve did not get ready:\n{log.read_text()}")
        yield SimpleNamespace(url=url, proc=proc, log=log, starting=starting)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ready_only_after_the_warm_up_generation(llama):
    """In process, with the warm-up's engine steps held: /ready is 503 while it runs, 200 (naming the model
    warmed) after; /health answers throughout. Then the drain flag: /ready and new requests get 503."""
    from starlette.testclient import TestClient

    from inferneo_runtime.integrations.common import WARMUP_TOKENS
    from inferneo_runtime.server.app import build_registry, create_app
    from inferneo_runtime.server.config import ServerConfig

    config = ServerConfig(artifacts=[{"path": str(llama)}], log_level="warning", threads=1)
    registry = build_registry(config)
    app = create_app(registry, config)
    state = app.state.inferneo
    registry.preload()  # loaded, not warmed: start_models only warms it up
    backend = registry.entry("tiny-llama").model.backend
    forward, release, steps = backend.forward, threading.Event(), []

    def held_forward(*args, **kwargs):
        assert release.wait(20)
        steps.append(1)
        return forward(*args, **kwargs)

    backend.forward = held_forward
    starter = threading.Thread(target=state.start_models)
    with TestClient(app) as c:
        starter.start()
        wait_until(lambda: state.starting, 10, "start_models did not start")
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["reason"] == "loading and warming up the models"
        assert c.get("/health").json() == {"status": "ok"}
        release.set()
        starter.join(20)
        r = c.get("/ready")
        assert r.status_code == 200 and r.json()["warmed"] == ["tiny-llama"], r.json()
        assert len(steps) == WARMUP_TOKENS  # the warm-up generation ran through the engine: prefill + decode
        hi = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}
        assert c.post("/v1/completions", json=hi).status_code == 200

        state.shutting_down = True  # what SIGTERM does first (DrainingServer.handle_exit)
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["reason"] == "shutting down"
        r = c.post("/v1/completions", json=hi)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert r.headers["connection"] == "close"
        assert c.get("/health").status_code == 200


def test_sigterm_drains_the_running_stream_then_exits_0(llama, tmp_path):
    """SIGTERM while a stream runs: /ready turns 503 and new requests get 503 while the port stays open; the
    stream ends with all its tokens and its finish_reason; then the process exits 0."""
    import inferneo_runtime

    with inferneo_runtime.load(llama, target="onnx") as model:
        expected = model.generate(PROMPT, max_new_tokens=60, ignore_eos=True).text
    with slow_serve(llama, tmp_path, "--drain-timeout", "20") as s:
        # never ready before the warm-up: every answer before the first 200 was a 503 saying so
        assert all(code == 503 and body["reason"] == "loading and warming up the models"
                   for code, body in s.starting[:-1]), s.starting
        assert s.starting[-1][1]["warmed"] == ["tiny-llama"]

        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=30)
        stream = iter(client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=60, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        chunks = [next(stream)]  # generating
        signalled = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)

        # the drain: the port stays open while the stream runs, and answers 503
        wait_until(lambda: httpx.get(f"{s.url}/ready").status_code == 503, 2, "/ready did not turn 503")
        assert httpx.get(f"{s.url}/ready").json()["reason"] == "shutting down"
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{s.url}/health").status_code == 200  # alive: not a liveness failure
        with pytest.raises(openai.InternalServerError) as e:  # the official client's view of a new request
            client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2)
        assert e.value.status_code == 503

        chunks += list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text == expected and finish == ["length"]
        assert chunks[-1].usage.completion_tokens == 60

        rc = s.proc.wait(20)
        exited_after = time.monotonic() - signalled
    assert rc == 0, s.log.read_text()
    assert "Traceback" not in s.log.read_text(), s.log.read_text()
    print(f"drained a 60-token stream: exit 0 {exited_after:.1f}s after SIGTERM")


def test_drain_timeout_bounds_the_wait(llama, tmp_path):
    """A stream longer than --drain-timeout is ended when the timeout passes, with an error event (503,
    shutting_down) and [DONE] rather than a cut connection, and the process still exits 0."""
    import json

    with slow_serve(llama, tmp_path, "--drain-timeout", "1") as s:
        body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 120, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            events = [next(ln for ln in lines if ln.startswith("data: "))]
            signalled = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            events += [ln for ln in lines if ln.startswith("data: ")]
        rc = s.proc.wait(20)
        exited_after = time.monotonic() - signalled
    assert rc == 0, s.log.read_text()
    assert 1 <= exited_after < 5, exited_after
    # 120 tokens take ~3.6 s: the stream was ended early, and says why
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and "drain timeout" in error["message"]
    assert len(events) - 2 < 120 and not any('"finish_reason":"length"' in e for e in events)
    log = s.log.read_text()
    assert "drain timeout (1s): ending 1 running generation request(s) with a 503" in log and "Traceback" not in log
