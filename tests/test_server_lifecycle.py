"""`inferneo serve`'s lifecycle for orchestrators: ready only once warmed up, and a drain on SIGTERM.

The drain tests run the real `inferneo serve` (its signal handling, uvicorn, the engine) as a subprocess whose
engine steps the test holds: a gate file says how many steps may have run, so a stream is observed to have
produced tokens and to be still running (held) when SIGTERM arrives, however loaded the machine is.
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

# `inferneo serve` as users run it, with Engine.step gated (the only change): while GATE holds a number, a step
# waits until fewer than that many steps have run; STEPS always holds how many have run. No GATE: steps run.
GATED_SERVE = """
import os, sys, time
from inferneo_runtime import generation
gate, steps_file = sys.argv[1:3]
step, taken = generation.Engine.step, [0]
def gated_step(self):
    while True:
        try:
            with open(gate) as f:
                allowed = int(f.read())
        except FileNotFoundError:
            break
        if taken[0] < allowed:
            break
        time.sleep(0.005)
    taken[0] += 1
    with open(steps_file + ".tmp", "w") as f:
        f.write(str(taken[0]))
    os.replace(steps_file + ".tmp", steps_file)
    return step(self)
generation.Engine.step = gated_step
from inferneo_runtime.cli import main
sys.argv = ["inferneo", "serve", *sys.argv[3:]]
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


def _write(path: Path, text: str) -> None:
    path.with_suffix(".tmp").write_text(text)
    os.replace(path.with_suffix(".tmp"), path)


@contextmanager
def gated_serve(artifact: Path, tmp_path: Path, *args: str):
    """The subprocess; every /ready answer seen while it starts is recorded (`starting`). `hold(n)` lets n more
    engine steps run and holds the next; `release()` lets every step run."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log, gate, steps = tmp_path / "serve.log", tmp_path / "gate", tmp_path / "steps"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", GATED_SERVE, str(gate), str(steps), "--model", str(artifact),
                                 "--port", str(port), "--threads", "1", "--log-level", "warning", *args],
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

    def hold(n: int) -> None:
        taken = int(steps.read_text()) if steps.exists() else 0
        _write(gate, str(taken + n))

    def held() -> bool:  # the engine is waiting at the gate
        return gate.exists() and steps.exists() and int(steps.read_text()) >= int(gate.read_text())

    try:
        wait_until(ready, 120, f"serve did not get ready:\n{log.read_text()}")
        yield SimpleNamespace(url=url, proc=proc, log=log, starting=starting, hold=hold, held=held,
                              release=lambda: gate.unlink(missing_ok=True))
    finally:
        gate.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ready_only_after_the_warm_up_generation(llama):
    """In process, with the warm-up's engine steps held: /ready is 503 while it runs, 200 (naming the model
    warmed) after; /health answers throughout. Then the drain flag: /ready and new requests get 503."""
    from starlette.testclient import TestClient

    from inferneo_runtime.integrations.common import WARMUP_TOKENS
    from inferneo_runtime.server.app import create_app
    from inferneo_runtime.server.lifecycle import build_registry
    from inferneo_runtime.server.config import ServerConfig

    config = ServerConfig(artifacts=[{"path": str(llama)}], log_level="warning", threads=1)
    registry = build_registry(config)
    app = create_app(registry, config)
    state = app.state.inferneo
    registry.preload()  # loaded, not warmed: start_models only warms it up
    backend = registry.entry("tiny-llama").model.backend
    release, steps = threading.Event(), []

    def held(step):  # the engine's steps: forward, and forward_tokens for decode steps that read no logits
        def call(*args, **kwargs):
            assert release.wait(20)
            steps.append(1)
            return step(*args, **kwargs)
        return call

    backend.forward, backend.forward_tokens = held(backend.forward), held(backend.forward_tokens)
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
    with gated_serve(llama, tmp_path, "--drain-timeout", "60") as s:
        # never ready before the warm-up: every answer before the first 200 was a 503 saying so
        assert all(code == 503 and body["reason"] == "loading and warming up the models"
                   for code, body in s.starting[:-1]), s.starting
        assert s.starting[-1][1]["warmed"] == ["tiny-llama"]

        s.hold(3)  # the prefill and two decode steps, then the stream waits, running
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = iter(client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=60, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        chunks = [next(stream)]  # it has produced tokens...
        wait_until(s.held, 30, "the engine did not reach the gate")
        assert chunks[0].choices and not chunks[0].choices[0].finish_reason  # ...and is still running
        s.proc.send_signal(signal.SIGTERM)

        # the drain: the port stays open while the stream runs, and answers 503
        wait_until(lambda: httpx.get(f"{s.url}/ready").status_code == 503, 30, "/ready did not turn 503")
        assert httpx.get(f"{s.url}/ready").json()["reason"] == "shutting down"
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{s.url}/health").status_code == 200  # alive: not a liveness failure
        with pytest.raises(openai.InternalServerError) as e:  # the official client's view of a new request
            client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2)
        assert e.value.status_code == 503
        assert s.proc.poll() is None and s.held()  # everything above happened while the stream was held

        s.release()
        chunks += list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text == expected and finish == ["length"]
        assert chunks[-1].usage.completion_tokens == 60

        rc = s.proc.wait(60)
    assert rc == 0, s.log.read_text()
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


def test_drain_timeout_bounds_the_wait(llama, tmp_path):
    """A stream longer than --drain-timeout is ended when the timeout passes, with an error event (503,
    shutting_down) and [DONE] rather than a cut connection, and the process still exits 0."""
    import json

    with gated_serve(llama, tmp_path, "--drain-timeout", "1") as s:
        s.hold(3)  # the stream produces a few tokens, then is held past the drain timeout
        body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 120, "temperature": 0, "stream": True,
                "ignore_eos": True}  # greedy: sampled, the first tokens might make no text before the gate holds
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            events = [next(ln for ln in lines if ln.startswith("data: "))]
            wait_until(s.held, 30, "the engine did not reach the gate")
            signalled = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            events += [ln for ln in lines if ln.startswith("data: ")]
            ended_after = time.monotonic() - signalled
            assert s.held()  # it was ended by the timeout, not by finishing
        s.release()
        rc = s.proc.wait(60)
    assert rc == 0, s.log.read_text()
    assert ended_after >= 1, ended_after  # not before the drain timeout
    # the stream was ended early, and says why
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and "drain timeout" in error["message"]
    assert len(events) - 2 < 120 and not any('"finish_reason":"length"' in e for e in events)
    log = s.log.read_text()
    assert "drain timeout (1s): ending 1 running generation request(s) with a 503" in log and "Traceback" not in log


def test_a_second_signal_stops_the_server_at_once(llama, tmp_path):
    """SIGTERM starts a drain that would wait up to 600 s for a held stream; a second SIGTERM ends the process
    while that stream is still held (so without draining it), as uvicorn does: its exit status is the signal."""
    with gated_serve(llama, tmp_path, "--drain-timeout", "600") as s:
        s.hold(3)
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=60)
        # greedy, as in the tests above: sampled, the 3 tokens let through could all be pieces of one UTF-8
        # character, so no text (and no chunk) would come before the gate holds the stream
        stream = iter(client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=60, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
        assert not next(stream).choices[0].finish_reason
        wait_until(s.held, 30, "the engine did not reach the gate")
        s.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{s.url}/ready").status_code == 503, 30, "/ready did not turn 503")
        assert s.proc.poll() is None  # draining: the held stream keeps the process up
        s.proc.send_signal(signal.SIGTERM)
        rc = s.proc.wait(60)
        assert s.held()  # the stream never finished: the process did not drain it
    assert rc == -signal.SIGTERM, (rc, s.log.read_text())


# -- several models under one budget -------------------------------------------------------------------------------
def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_requests_waiting_for_room_do_not_stall_requests_to_a_loaded_model(llama, tiny_artifact, tmp_path,
                                                                            monkeypatch):
    """max_models 1: a held stream keeps tiny-llama loaded and busy, so requests to tiny-qwen2 wait for room (up to
    load_wait_s). More of them than the event loop's default worker threads must not stall a request to the loaded
    model (here /tokenize, which tokenizes on a worker thread): it answers at once, not when the waits give up."""
    qwen = tiny_artifact("qwen2")
    monkeypatch.setenv("INFERNEO_LOAD_WAIT_S", "600")
    workers = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default executor on this host
    waiting = workers + 4
    with gated_serve(llama, tmp_path, "--model", str(qwen), "--max-models", "1", "--drain-timeout", "60") as s:
        s.hold(0)  # no engine step runs: the stream to tiny-llama stays in flight
        held = []
        threading.Thread(target=lambda: held.append(httpx.post(
            f"{s.url}/v1/completions", json={"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4},
            timeout=120).status_code), daemon=True).start()
        wait_until(lambda: _metric(s.url, "inferneo_requests_in_flight") == 1, 30, "tiny-llama's request not admitted")
        for _ in range(waiting):
            threading.Thread(target=lambda: held.append(httpx.post(
                f"{s.url}/v1/completions", json={"model": "tiny-qwen2", "prompt": PROMPT, "max_tokens": 2},
                timeout=120).status_code), daemon=True).start()
        # admitted (queue room reserved), then waiting for room: at least as many as the default executor has threads
        wait_until(lambda: _metric(s.url, "inferneo_requests_in_flight") >= 1 + workers, 60,
                   "the requests to tiny-qwen2 were not admitted")
        r = httpx.post(f"{s.url}/tokenize", json={"model": "tiny-llama", "prompt": PROMPT}, timeout=60)
        assert r.status_code == 200 and r.json()["count"] > 0
        assert _metric(s.url, "inferneo_model_loaded{model=\"tiny-qwen2\"}") == 0  # they were still waiting
        s.release()  # the stream ends, tiny-llama is evicted, tiny-qwen2 loads and answers them all
        wait_until(lambda: len(held) == 1 + waiting, 120, "the requests did not finish")
        assert held == [200] * (1 + waiting), held
        assert _metric(s.url, "inferneo_requests_in_flight") == 0
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(60) == 0, s.log.read_text()
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


def test_an_env_alias_with_a_bad_value_is_named_in_the_error(llama, tmp_path):
    """INFERNEO_DRAIN_TIMEOUT is read as graceful_timeout_s: a bad value is reported under the variable that was
    set, not under INFERNEO_GRACEFUL_TIMEOUT_S (which the user never set)."""
    for var, value, field in (("INFERNEO_DRAIN_TIMEOUT", "soon", "graceful_timeout_s"),
                              ("INFERNEO_GPU_MEMORY_UTIL", "5", "gpu_memory_utilization")):
        r = subprocess.run([sys.executable, "-m", "inferneo_runtime.cli", "serve", "--model", str(llama)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, var: value})
        assert r.returncode == 2 and f"environment ({var}): {field}:" in r.stderr, r.stderr


def test_a_request_waiting_for_a_model_at_the_drain_timeout_gets_a_503(llama, tiny_artifact, tmp_path, monkeypatch):
    """max_models 1: a held request keeps tiny-llama busy and one to tiny-qwen2 waits for room when SIGTERM comes.
    At the drain timeout both end with a 503 (shutting_down), as documented, the waiting one too (it is not running
    on the engine yet): not a cancelled task's 500 and a traceback in the log. Then the process exits 0."""
    qwen = tiny_artifact("qwen2")
    monkeypatch.setenv("INFERNEO_LOAD_WAIT_S", "600")
    with gated_serve(llama, tmp_path, "--model", str(qwen), "--max-models", "1", "--drain-timeout", "1") as s:
        s.hold(0)
        answers = {}

        def post(model: str) -> None:
            r = httpx.post(f"{s.url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 4},
                           timeout=120)
            answers[model] = r

        threading.Thread(target=post, args=("tiny-llama",), daemon=True).start()
        wait_until(lambda: _metric(s.url, "inferneo_requests_in_flight") == 1, 30, "tiny-llama's request not admitted")
        threading.Thread(target=post, args=("tiny-qwen2",), daemon=True).start()
        wait_until(lambda: _metric(s.url, "inferneo_requests_in_flight") == 2, 30, "tiny-qwen2's request not admitted")
        s.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: len(answers) == 2, 60, "the requests were not answered at the drain timeout")
        for model, r in answers.items():
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", (model, r.text)
        s.release()  # the held engine step may end now (the evicting wait joins it)
        assert s.proc.wait(60) == 0, s.log.read_text()
    assert "Traceback" not in s.log.read_text(), s.log.read_text()
