"""`inferneo serve`: a real server on 127.0.0.1, exercised with the openai client.

Three kinds of server: `inferneo serve` subprocesses (the bundled-artifact default path, and a YAML config
with env overrides for two models under a budget that fits one), and uvicorn in a thread when a test must
hold the engine still (a gate on the backend's forward) to make queueing, disconnects, out-of-memory and
shutdown deterministic.
"""
from __future__ import annotations

import asyncio

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

import inferneo_runtime  # noqa: E402
from conftest import free_port, serve_subprocess, wait_ready  # noqa: E402
from inferneo_runtime.tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["The quick brown fox", "Hello world, this is", "Inferneo compiles models", "lazy dog",
           "a tiny tokenizer", "ahead of time", "with a KV cache", "jumps over the"]
MESSAGES = [{"role": "user", "content": "Hello world, this is a tiny tokenizer."}]


def serve_process(args: list[str], cwd: Path, port: int, env: dict | None = None):
    """`inferneo serve ARGS --log-level warning` as a subprocess; ARGS or `env` put it on `port`."""
    return serve_subprocess([*args, "--log-level", "warning"], cwd, port, env=env)


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def metric(url: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        lname, _, rest = key.partition("{")
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if lname == name and got == want:
            return float(value)
    return 0.0


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tiny_artifact):
    return tiny_artifact("llama")


@pytest.fixture(scope="module")
def qwen(tiny_artifact):
    return tiny_artifact("qwen2")


@pytest.fixture(scope="module")
def local(llama):
    with inferneo_runtime.load(llama) as m:
        yield m


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    """`inferneo serve` with no argument, in a directory whose artifacts/smollm2-135m is a built artifact."""
    cwd = tmp_path_factory.mktemp("serve-default")
    shutil.copytree(llama, cwd / "artifacts" / "smollm2-135m")
    port = free_port()
    # models may be registered over the API from the test run's temporary directories (the client test does)
    roots = {"INFERNEO_MODEL_ROOTS": str(tmp_path_factory.getbasetemp()), "INFERNEO_ALLOW_UNSIGNED_REGISTRATION": "1"}
    with serve_process(["--port", str(port), "--max-queue", "64"], cwd, port=port, env=roots) as s:
        yield s


# -- completions and chat ---------------------------------------------------------------------------------
def test_completions_streamed_equals_full(server, local):
    c = client(server.url)
    prompt = PROMPTS[0]
    full = c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True})
    expected = local.generate(prompt, max_new_tokens=24, ignore_eos=True)
    assert full.choices[0].text == expected.text and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(local.tokenizer.encode(prompt)) == len(expected.prompt_ids)
    assert full.usage.completion_tokens == 24 and full.usage.total_tokens == full.usage.prompt_tokens + 24
    chunks = list(c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_streamed_equals_full(server, local):
    c = client(server.url)
    expected = local.chat(MESSAGES, max_new_tokens=20)
    full = c.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=20, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content == expected.text
    assert full.choices[0].finish_reason == expected.finish_reason
    assert full.usage.prompt_tokens == len(local.tokenizer.encode_chat(MESSAGES))
    assert full.usage.completion_tokens == len(expected.token_ids)
    stream = c.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_raw_stream_ends_with_done(server):
    body = {"model": "tiny-llama", "prompt": PROMPTS[1], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_n_seed_sampling_and_logprobs(server, local):
    c = client(server.url)
    kw = dict(model="tiny-llama", prompt=PROMPTS[2], max_tokens=12, temperature=1.0, seed=7, n=3,
              extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # seeds reproduce
    for i, ch in enumerate(a.choices):  # choice i used seed + i
        ref = local.generate(PROMPTS[2], max_new_tokens=12, temperature=1.0, seed=7 + i, ignore_eos=True, top_k=50,
                             min_p=0.01, repetition_penalty=1.1)
        assert ch.text == ref.text
    assert a.usage.completion_tokens == 36
    lp = c.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3,
                              extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    chat = c.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=5, temperature=0,
                                     logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy picks the top token


def test_stop_strings(server, local):
    c = client(server.url)
    full = local.generate(PROMPTS[2], max_new_tokens=20, ignore_eos=True).text
    i = next(i for i in range(3, len(full) - 3) if full[i:i + 3].isascii() and full[i:i + 3].isprintable())
    stop = full[i:i + 3]
    out = c.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=20, temperature=0, stop=[stop, "zzzz"],
                               extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == full[: full.index(stop)]


def test_eight_concurrent_streams(server, local):
    """More clients than the artifact's max_batch (4): they join the running batch; each equals its solo run."""
    expected = {p: local.generate(p, max_new_tokens=40, ignore_eos=True).text for p in PROMPTS}
    barrier = threading.Barrier(len(PROMPTS))

    def one(prompt):
        c = client(server.url)
        barrier.wait()
        stream = c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        return "".join(ch.choices[0].text for ch in stream if ch.choices)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = dict(zip(PROMPTS, pool.map(one, PROMPTS)))
    assert got == expected


# -- models, health, metrics ------------------------------------------------------------------------------
def test_models_health_ready_metrics(server, llama):
    c = client(server.url)
    assert [m.id for m in c.models.list().data] == ["tiny-llama"]
    card = c.models.retrieve("tiny-llama").model_dump()
    manifest = json.loads((llama / "inferneo.json").read_text())
    onnx = manifest["targets"]["onnx"]
    assert card["format"] == "onnx" and card["dtype"] == onnx["dtype"] and card["loaded"] is True
    assert card["weight_bytes"] == sum(f["size"] for f in onnx["files"]) and card["parameters"] > 0
    assert card["validation"]["status"] == "passed" and card["max_context"] == 128
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json()["loaded"] == ["tiny-llama"]
    c.completions.create(model="tiny-llama", prompt="Hello", max_tokens=2)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("inferneo_requests_total", "inferneo_prompt_tokens_total", "inferneo_generation_tokens_total",
                 "inferneo_time_to_first_token_seconds_bucket", "inferneo_request_latency_seconds_bucket",
                 "inferneo_models_loaded", "inferneo_kv_cache_bytes", "inferneo_model_evictions_total"):
        assert name in text
    assert metric(server.url, "inferneo_models_loaded") == 1
    # the names vLLM dashboards read carry the same values
    ours = metric(server.url, "inferneo_prompt_tokens_total", model="tiny-llama")
    assert ours > 0 and metric(server.url, "vllm:prompt_tokens_total", model_name="tiny-llama") == ours
    for name in ("vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count"):
        assert name in text


# -- errors -----------------------------------------------------------------------------------------------
def test_errors_have_openai_shape_and_server_keeps_serving(server):
    c = client(server.url)
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "tiny-llama", "prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "malformed JSON" in r.json()["error"]["message"]

    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-model", prompt="hi")
    assert e.value.body["code"] == "model_not_found" and "tiny-llama" in e.value.body["message"]

    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-llama", prompt="hi", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"

    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    n_prompt = len(Tokenizer(Path(server.log.parent / "artifacts" / "smollm2-135m")).encode(long_prompt))
    assert n_prompt > 128
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-llama", prompt=long_prompt, max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded"
    assert "128" in e.value.body["message"] and str(n_prompt) in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": long_prompt}])
    assert e.value.body["code"] == "context_length_exceeded"

    with pytest.raises(openai.BadRequestError) as e:  # an OpenAI field this server cannot honour
        c.completions.create(model="tiny-llama", prompt="hi", suffix="!")
    assert e.value.body["param"] == "suffix"
    # unknown fields are accepted (and logged)
    assert c.completions.create(model="tiny-llama", prompt="hi", max_tokens=2, extra_body={"frobnicate": 1}).choices
    assert metric(server.url, "inferneo_requests_total", model="", endpoint="completions", status="404") >= 1
    assert metric(server.url, "inferneo_requests_total", model="tiny-llama", endpoint="completions", status="400") >= 2


# -- several models -----------------------------------------------------------------------------------------
def test_two_models_under_a_budget_that_fits_one(llama, qwen, tmp_path):
    weights = {}
    for a in (llama, qwen):
        m = json.loads((a / "inferneo.json").read_text())
        weights[m["name"]] = sum(f["size"] for f in m["targets"]["onnx"]["files"])
    budget = max(weights.values()) + 200_000  # one model and its KV cache, not two
    assert budget < sum(weights.values())
    config = tmp_path / "serve.yaml"
    config.write_text(f"artifacts:\n  - {llama}\n  - path: {qwen}\n    target: onnx\nport: 1\nlazy: true\n"
                      f"memory_budget_gb: 10\n")
    port = free_port()
    env = {"INFERNEO_PORT": str(port), "INFERNEO_MEMORY_BUDGET_GB": str(budget / 1e9)}  # env overrides the file
    with serve_process(["--config", str(config)], tmp_path, env=env, port=port) as s:
        c = client(s.url)
        assert httpx.get(f"{s.url}/ready").json()["loaded"] == []  # lazy
        outputs = {}
        for name in ["tiny-llama", "tiny-qwen2", "tiny-llama", "tiny-qwen2"]:
            text = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text
            assert outputs.setdefault(name, text) == text
            assert metric(s.url, "inferneo_models_loaded") == 1
            assert metric(s.url, "inferneo_model_loaded", model=name) == 1
        for name, path in (("tiny-llama", llama), ("tiny-qwen2", qwen)):
            with inferneo_runtime.load(path) as m:
                assert outputs[name] == m.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True).text
        assert metric(s.url, "inferneo_model_evictions_total", model="tiny-llama") == 2
        assert metric(s.url, "inferneo_model_evictions_total", model="tiny-qwen2") == 1
        assert metric(s.url, "inferneo_model_loads_total", model="tiny-llama") == 2
        assert metric(s.url, "inferneo_memory_budget_bytes") == pytest.approx(budget, abs=2)
        assert 0 < metric(s.url, "inferneo_memory_used_bytes") <= budget
        assert [m.loaded for m in c.models.list().data] == [False, True]


def test_registry_leases_and_budget(llama, qwen):
    """A busy model is not evicted under its requests: the other waits, then fails with CapacityError."""
    from inferneo_runtime.registry import CapacityError, ModelRegistry

    reg = ModelRegistry([llama, qwen], max_models=1, wait_s=0.3)
    try:
        busy = reg.acquire("tiny-llama")
        t0 = time.monotonic()
        with pytest.raises(CapacityError, match="busy"):
            reg.acquire("tiny-qwen2")
        assert time.monotonic() - t0 >= 0.25 and reg.loaded() == ["tiny-llama"]
        threading.Timer(0.1, busy.release).start()  # released while the next acquire waits
        with reg.acquire("tiny-qwen2", wait_s=5) as lease:
            assert lease.model.name == "tiny-qwen2" and reg.loaded() == ["tiny-qwen2"]
        assert reg.entry("tiny-llama").evictions == 1
    finally:
        reg.close()
    with pytest.raises(CapacityError, match="out of memory"):  # cannot fit even alone: fails at once
        ModelRegistry([llama], memory_budget_bytes=1000).acquire("tiny-llama")


def test_settings_precedence(tmp_path):
    from inferneo_runtime.server.config import ConfigError, load_server_config

    f = tmp_path / "s.yaml"
    f.write_text("artifacts: [a, b]\nport: 9000\nmax_models: 3\nhost: 0.0.0.0\n")
    cfg = load_server_config(f, overrides={"port": 9100, "lazy": None},
                             env={"INFERNEO_PORT": "9001", "INFERNEO_MAX_MODELS": "2"})
    assert (cfg.port, cfg.max_models, cfg.host, [a.path for a in cfg.artifacts]) == (9100, 2, "0.0.0.0", ["a", "b"])
    with pytest.raises(ConfigError, match="INFERNEO_MEMORY_BUDGET_GB"):
        load_server_config(None, env={"INFERNEO_MEMORY_BUDGET_GB": "lots"})
    f.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_server_config(f, env={})


def test_serve_without_artifact_says_how_to_build(tmp_path):
    r = subprocess.run([sys.executable, "-m", "inferneo_runtime.cli", "serve"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "INFERNEO_ARTIFACTS"})
    assert r.returncode == 2
    assert "make demo" in r.stderr and "inferneo build recipes/smollm2-135m.yaml" in r.stderr


def test_serve_without_fastapi_names_the_extra(tmp_path):
    script = ("import sys\n"
              "class Block:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] == 'fastapi': raise ImportError(name)\n"
              "sys.meta_path.insert(0, Block())\n"
              "from inferneo_runtime.cli import main\n"
              "sys.argv = ['inferneo', 'serve']\n"
              "main()\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 5 and "inferneo[serve]" in r.stderr, r.stderr


def test_import_stays_slim():
    r = subprocess.run([sys.executable, "-c", "import sys, inferneo_runtime, inferneo_runtime.cli, "
                        "inferneo_runtime.registry, inferneo_runtime.server.config, inferneo_runtime.drivers; "
                        "print([m for m in ('fastapi', 'uvicorn', 'torch') if m in sys.modules])"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# -- a server in this process, with the engine held still ----------------------------------------------------
class Gate:
    """Wraps a backend's engine steps (`forward`, and `forward_tokens`, which decode steps that read no logits call):
    each call needs a permit while the gate is closed; counts calls."""

    def __init__(self, backend):
        self._cond = threading.Condition()
        self.permits = None  # None: open
        self.calls = 0
        for name in ("forward", "forward_tokens"):
            setattr(backend, name, self._gated(getattr(backend, name)))

    def _gated(self, method):
        def call(*args, **kwargs):
            with self._cond:
                if not self._cond.wait_for(lambda: self.permits is None or self.permits > 0, timeout=20):
                    raise TimeoutError("gate never opened")
                if self.permits is not None:
                    self.permits -= 1
                self.calls += 1
            return method(*args, **kwargs)
        return call

    def set(self, permits):
        with self._cond:
            self.permits = permits
            self._cond.notify_all()


@contextmanager
def inproc_server(artifact: Path, **settings):
    import uvicorn

    from inferneo_runtime.server.app import create_app
    from inferneo_runtime.server.lifecycle import build_registry
    from inferneo_runtime.server.config import ServerConfig

    config = ServerConfig(artifacts=[{"path": str(artifact)}], log_level="warning", graceful_timeout_s=10, **settings)
    registry = build_registry(config)
    registry.preload()
    model = registry.entry(registry.names[0]).model
    gate = Gate(model.backend)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(registry, config), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    try:
        yield SimpleNamespace(url=url, registry=registry, model=model, gate=gate, server=server, thread=thread)
    finally:
        gate.set(None)
        server.should_exit = True
        thread.join(15)


def _in_background(fn):
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


def _port_closed(url: str):
    """A predicate: the server no longer accepts connections (its shutdown closed the listening socket)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)

    def closed() -> bool:
        try:
            socket.create_connection((parts.hostname, parts.port), timeout=1).close()
            return False
        except OSError:
            return True

    return closed


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_queue_full_gets_429_then_serves(llama):
    with inproc_server(llama, max_queue=2) as s:
        driver = s.registry.entry("tiny-llama").driver
        s.gate.set(0)
        held = _in_background(lambda: client(s.url).completions.create(
            model="tiny-llama", prompt=PROMPTS[0], max_tokens=4, n=2, temperature=0))
        _wait_for(lambda: driver.in_flight == 2)
        with pytest.raises(openai.RateLimitError) as e:
            client(s.url).completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        s.gate.set(None)
        assert len(held.result(20).choices) == 2
        assert client(s.url).completions.create(model="tiny-llama", prompt="hi", max_tokens=2).choices


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_disconnect_cancels_the_request_and_frees_its_slot(llama, endpoint):
    """A client that goes away mid-stream (the engine held after its first token, so the stream is surely
    running) is counted as 499, its sequence leaves the engine, and the server keeps serving."""
    with inproc_server(llama) as s:
        driver = s.registry.entry("tiny-llama").driver
        # chat's first chunk (the role) needs the prefill only; a completion's first text can need a few tokens
        permits = 1 if endpoint == "chat" else 8
        s.gate.set(permits)
        body = {"model": "tiny-llama", "max_tokens": 100, "stream": True, "ignore_eos": True}
        body.update(messages=MESSAGES) if endpoint == "chat" else body.update(prompt=PROMPTS[0])
        path = "chat/completions" if endpoint == "chat" else "completions"
        with httpx.stream("POST", f"{s.url}/v1/{path}", json=body) as r:
            first = next(ln for ln in r.iter_lines() if ln.startswith("data: {"))
            assert '"finish_reason":null' in first
        _wait_for(lambda: metric(s.url, "inferneo_requests_total", model="tiny-llama", endpoint=endpoint,
                                 status="499") == 1)
        s.gate.set(None)
        _wait_for(lambda: driver.in_flight == 0 and not driver.engine.has_work)
        assert s.gate.calls <= permits + 2  # cancelled after a step or two, not 100 tokens
        assert metric(s.url, "inferneo_requests_in_flight") == 0
        assert client(s.url).completions.create(model="tiny-llama", prompt="hi", max_tokens=2).choices


def _fail_next_cache_allocation(backend, monkeypatch) -> None:
    """The backend's next KV-cache allocation raises MemoryError; later ones succeed (a failed engine step)."""
    real = backend.allocate_cache

    def fail_once(*a, **k):
        monkeypatch.setattr(backend, "allocate_cache", real)
        raise MemoryError("cannot allocate the KV cache")

    monkeypatch.setattr(backend, "allocate_cache", fail_once)


def test_out_of_memory_is_503_and_the_server_stays_up(llama, monkeypatch):
    with inproc_server(llama) as s:
        _fail_next_cache_allocation(s.model.backend, monkeypatch)
        with pytest.raises(openai.InternalServerError) as e:
            client(s.url).completions.create(model="tiny-llama", prompt="hi", max_tokens=4)
        assert e.value.status_code == 503 and e.value.body["code"] == "out_of_memory"
        assert client(s.url).completions.create(model="tiny-llama", prompt="hi", max_tokens=4).choices
        assert httpx.get(f"{s.url}/health").status_code == 200


def test_graceful_shutdown_finishes_in_flight_requests(llama):
    with inproc_server(llama) as s:
        s.gate.set(1)
        pending = _in_background(lambda: client(s.url).completions.create(
            model="tiny-llama", prompt=PROMPTS[1], max_tokens=10, temperature=0, extra_body={"ignore_eos": True}))
        _wait_for(lambda: s.gate.calls == 1)
        s.server.should_exit = True  # what SIGTERM does
        _wait_for(_port_closed(s.url), 20)  # uvicorn's shutdown has begun, with the request held in flight
        assert s.gate.calls == 1 and not pending.done()
        s.gate.set(None)
        out = pending.result(20)
        assert out.usage.completion_tokens == 10 and out.choices[0].finish_reason == "length"
        s.thread.join(15)
        assert not s.thread.is_alive() and s.registry.loaded() == []  # engines drained and models closed


# -- the Python client and the latency benchmark -------------------------------------------------------------
def test_inferneo_client_calls_and_typed_errors(server, local, tmp_path):
    from inferneo_runtime import InferneoError
    from inferneo_runtime.client import BadRequestError, InferneoClient, InvalidFormatError, ModelNotFoundError

    c = InferneoClient(server.url)
    expected = local.chat(MESSAGES, max_new_tokens=20)
    chat = c.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=20, temperature=0)
    assert chat.choices[0].message.content == expected.text and chat.usage.completion_tokens == len(expected.token_ids)
    chunks = list(c.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected.text
    text = local.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True).text
    out = c.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                               extra_body={"ignore_eos": True})
    assert out.choices[0].text == text and out.to_dict()["object"] == "text_completion"
    assert [m.id for m in c.models.list().data] == ["tiny-llama"]
    info = c.models.get("tiny-llama")  # Inferneo's fields beside OpenAI's
    assert (info.format, info.version, info.dtype, info.validation["status"]) == ("onnx", "1", "float32", "passed")
    assert info.parameters > 0 and info.memory["weights_bytes"] == info.weight_bytes and info.loaded

    with pytest.raises(ModelNotFoundError) as e:
        c.completions.create(model="no-such-model", prompt="hi")
    assert isinstance(e.value, InferneoError) and "model not found" in str(e.value) and e.value.status == 404
    with pytest.raises(ModelNotFoundError):
        list(c.chat.completions.create(model="no-such-model", messages=MESSAGES, stream=True))
    (tmp_path / "notes.onnx").write_text("not a model")  # (.onnx: other bare files are refused over the API)
    with pytest.raises(InvalidFormatError) as e:
        c.models.register("notes", str(tmp_path / "notes.onnx"), format="onnx")
    assert "invalid format" in str(e.value) and e.value.code == "invalid_format"
    with pytest.raises(BadRequestError) as e:
        c.completions.create(model="tiny-llama", prompt="hi", max_tokens=-1)
    assert e.value.param == "max_tokens" and not isinstance(e.value, InvalidFormatError)
    assert isinstance(c.openai, openai.OpenAI)  # the official client underneath

    async def the_same_awaited():
        from inferneo_runtime.client import AsyncInferneoClient

        async with AsyncInferneoClient(server.url) as ac:
            whole = await ac.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                                extra_body={"ignore_eos": True})
            stream = await ac.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
            streamed = "".join([ch.choices[0].text async for ch in stream if ch.choices])
            with pytest.raises(ModelNotFoundError):
                await ac.chat.completions.create(model="no-such-model", messages=MESSAGES)
        return whole.choices[0].text, streamed

    assert asyncio.run(the_same_awaited()) == (text, text)


def test_queue_full_is_an_overloaded_error_for_the_client(llama):
    from inferneo_runtime.client import InferneoClient, OverloadedError

    with inproc_server(llama, max_queue=1) as s:
        s.gate.set(0)
        held = _in_background(lambda: client(s.url).completions.create(model="tiny-llama", prompt="hi", max_tokens=2))
        _wait_for(lambda: s.registry.entry("tiny-llama").driver.in_flight == 1)
        with pytest.raises(OverloadedError) as e:
            InferneoClient(s.url).completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
        assert e.value.status == 429 and e.value.code == "queue_full"
        s.gate.set(None)
        assert held.result(20).choices


def test_latency_benchmark_against_the_server(server):
    from inferneo_runtime.bench_server import format_report, run_bench

    report = run_bench(server.url, requests=4, concurrency=2, model="tiny-llama", max_tokens=4)
    assert [r["run"] for r in report["runs"]] == ["single", "batched", "concurrent"]
    for r in report["runs"]:
        assert r["errors"] == 0 and r["completion_tokens"] == 16, r
        lat = r["latency_s"]
        assert 0 < lat["median"] <= lat["p95"] <= lat["p99"] and lat["mean"] > 0
        assert r["ttft_s"]["mean"] > 0 and r["tokens_per_s"] > 0
    assert report["runs"][1]["requests"] == 2  # batched: 2 requests of 2 prompts
    assert "p99" in format_report(report)
    r = subprocess.run([sys.executable, "-m", "inferneo_runtime.cli", "bench", "--url", server.url, "--requests", "3",
                        "--concurrency", "2", "--model", "tiny-llama", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and [x["requests"] for x in out["runs"]] == [3, 2, 3]


def test_prefix_cache_bytes_still_count_after_a_failed_step(llama, monkeypatch):
    """A step that fails replaces the engine but keeps the prefix cache (it holds completed prefills only): its
    blocks are still memory the model holds, so the model's KV-cache bytes (/metrics, the memory budget) still
    count them."""
    from inferneo_runtime.sampling import SamplingParams

    with inproc_server(llama, prefix_cache_mb=1) as s:
        driver = s.registry.entry("tiny-llama").driver
        long_prompt = " ".join(PROMPTS)  # more than one 16-token block
        assert client(s.url).completions.create(model="tiny-llama", prompt=long_prompt, max_tokens=2).choices
        held = metric(s.url, "inferneo_prefix_cache_bytes", model="tiny-llama")
        assert held > 0 and metric(s.url, "inferneo_kv_cache_bytes", model="tiny-llama") == held
        _fail_next_cache_allocation(s.model.backend, monkeypatch)
        with pytest.raises(openai.InternalServerError):
            client(s.url).completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
        # the driver thread has finished handling the failure once it answers a later item (an empty prompt,
        # refused by the engine without a step)
        answered = threading.Event()
        driver.submit([], SamplingParams(max_new_tokens=1), lambda item: answered.set())
        assert answered.wait(10)
        assert metric(s.url, "inferneo_prefix_cache_bytes", model="tiny-llama") == held
        assert metric(s.url, "inferneo_kv_cache_bytes", model="tiny-llama") == held
