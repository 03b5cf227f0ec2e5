"""Hostile and careless input: the server bounds what one request may ask, answers 4xx with a clear error,
and stays up. Ends with a Schemathesis run of the app's own OpenAPI schema against a real `inferneo serve`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from inferneo_runtime.client import InferneoClient, OverloadedError  # noqa: E402
from test_model_manager import serve_cli  # noqa: E402
from test_server import _in_background, _wait_for, inproc_server  # noqa: E402

LIMITS = """
max_request_bytes: 65536
max_n: 4
max_tokens_limit: 48
max_prompts: 3
max_prompt_chars: 2000
max_stop: 4
max_stop_chars: 16
"""


@pytest.fixture(scope="module")
def llama(tiny_artifact):
    return tiny_artifact("llama")


@pytest.fixture(scope="module")
def limited(llama, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("limits")
    (cwd / "serve.yaml").write_text(f"models: [{llama}]\n" + LIMITS)
    with serve_cli(["--config", str(cwd / "serve.yaml"), "--log-level", "warning"], cwd) as s:
        yield s


def post(url: str, body=None, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


def test_oversized_bodies_get_413_without_being_read(limited):
    big = {"model": "tiny-llama", "prompt": "x" * 70_000}
    r = post(limited.url, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "65536" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives, cut off at the limit
        yield b'{"model": "tiny-llama", "prompt": "'
        for _ in range(100):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(f"{limited.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert post(limited.url, {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("body, param, words", [
    ({"n": 5}, "n", "max_n"),
    ({"max_tokens": 49}, "max_tokens", "max_tokens_limit"),
    ({"prompt": ["a", "b", "c", "d"]}, "prompt", "max_prompts"),
    ({"prompt": "z" * 2001}, "prompt", "max_prompt_chars"),
    ({"prompt": [[7] * 2001]}, "prompt", "max_prompt_chars"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "max_stop"),
    ({"stop": "s" * 17}, "stop", "max_stop_chars"),
    ({"stop_token_ids": [1, 2, 3, 4, 5]}, "stop_token_ids", "max_stop"),
    ({"stop_token_ids": [2 ** 63]}, "stop_token_ids.0", "less than or equal"),
    ({"prompt": [2 ** 40]}, "prompt", "outside the model's vocabulary"),
    ({"max_tokens": 10 ** 30, "n": 1}, "max_tokens", "max_tokens_limit"),
])
def test_per_request_limits_are_400_naming_the_field(limited, body, param, words):
    r = post(limited.url, {"model": "tiny-llama", "prompt": "hi", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_the_max_tokens_limit_names_the_field_the_chat_request_used(limited):
    for field in ("max_tokens", "max_completion_tokens"):
        r = httpx.post(f"{limited.url}/v1/chat/completions", json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], field: 49}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert f"{field}=49" in r.json()["error"]["message"]


def test_hostile_bodies_are_4xx_and_the_server_stays_up(limited):
    url = limited.url
    raw = [b"[" * 30_000 + b"]" * 30_000,  # deeply nested JSON
           b'{"model": "tiny-llama", "prompt": "\\ud800"}',  # a lone surrogate
           b'{"model": "tiny-llama", "prompt": "hi", "temperature": NaN}',
           b"\xff\xfe\x00",
           b'{"messages": [{"role": "user", "content": "\\udfff"}]}']
    for body in raw:
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
            assert 400 <= r.status_code < 500, (body[:40], r.text)
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # (httpx refuses to send this)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 400")
    chat = {"messages": [{"role": "user", "content": "w" * 2001}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert post(url, {"prompt": "hi", "max_tokens": 2}).status_code == 200  # (routed to the only model)


def test_streams_per_client_and_requests_in_flight_are_bounded(llama):
    with inproc_server(llama, max_streams_per_client=2, max_concurrent_requests=3) as s:
        driver = s.registry.entry("tiny-llama").driver
        s.gate.set(0)  # hold the engine: requests stay in flight
        body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 4, "stream": True}
        held = [_in_background(lambda: httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)) for _ in range(2)]
        _wait_for(lambda: driver.in_flight == 2)
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_streams"
        held.append(_in_background(lambda: httpx.post(f"{s.url}/v1/completions", json={**body, "stream": False},
                                                      timeout=60)))
        _wait_for(lambda: driver.in_flight == 3)
        with pytest.raises(OverloadedError) as e:  # the fourth request over max_concurrent_requests
            InferneoClient(s.url).completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
        assert e.value.status == 429 and e.value.code == "overloaded" and "overloaded" in str(e.value)
        s.gate.set(None)
        assert all(f.result(30).status_code == 200 for f in held)
        state = s.server.config.app.state.inferneo
        _wait_for(lambda: state.requests_in_flight == 0 and not state.streams._open)
        assert httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).status_code == 200


# -- trusted keys ------------------------------------------------------------------------------------------
def test_serve_trusted_keys(llama, tmp_path):
    pytest.importorskip("cryptography")
    from inferneo_runtime.signing import generate_keypair, sign_artifact

    _, public, _ = generate_keypair(tmp_path / "ci")
    unsigned = tmp_path / "unsigned"
    shutil.copytree(llama, unsigned)
    r = subprocess.run([sys.executable, "-m", "inferneo_runtime.cli", "serve", "--model", str(unsigned),
                        "--trusted-key", str(public)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 9 and "not signed" in r.stderr, r.stderr
    env = {**os.environ, "INFERNEO_TRUSTED_KEYS": str(public)}
    r = subprocess.run([sys.executable, "-m", "inferneo_runtime.cli", "serve", "--model", str(unsigned)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 9 and "not signed" in r.stderr, r.stderr
    signed = tmp_path / "signed"
    shutil.copytree(llama, signed)
    sign_artifact(signed, tmp_path / "ci")
    with serve_cli(["--model", str(signed), "--trusted-key", str(public), "--log-level", "warning"], tmp_path,
                   env={"INFERNEO_MODEL_ROOTS": str(tmp_path)}) as s:  # API registration from tmp_path
        assert post(s.url, {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}).status_code == 200
        # a bare file has no signature: refused while keys are configured
        r = httpx.post(f"{s.url}/v1/models", json={"path": str(signed / "onnx" / "model.onnx"), "format": "onnx",
                                                   "tokenizer": str(signed)})
        assert r.status_code == 400 and "carries no signature" in r.json()["error"]["message"]


# -- the OpenAPI schema, fuzzed ----------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_error(llama, tmp_path):
    """Every operation of the app's OpenAPI schema, with generated valid and invalid inputs (coverage, fuzzing and
    stateful phases, bounded), against a real `inferneo serve`: no 5xx, and the server alive after. Without the
    error mapping (RequestError, ModelNotFound → 4xx) the generated bad requests come back 500 and this fails."""
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if st is None:
        pytest.skip("schemathesis is not installed (the test extra)")
    report = tmp_path / "schemathesis.json"
    with serve_cli(["--model", str(llama), "--log-level", "warning"], tmp_path) as s:
        r = subprocess.run([st, "run", f"{s.url}/openapi.json", "--checks", "not_a_server_error",
                            "--max-examples", "15",
                            "--workers", "1", "--seed", "1", "--no-shrink", "--request-timeout", "30",
                            # /ready's 503 ("nothing to serve") is its answer once the fuzzer deletes the model
                            "--exclude-path", "/ready",
                            "--report", "json", "--report-json-path", str(report)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=240)
        result = json.loads(report.read_text())
        assert result["failures"] == [], r.stdout[-6000:]
        # "Runtime Error" is Schemathesis tripping over itself while generating (hypothesis FlakyFailure, CPython's
        # "AST constructor recursion depth mismatch"), not about the server; whatever the server causes has its own
        # title (Network Error, Server Unavailable, Unresponsive Operation) and fails here.
        assert {e["title"] for e in result["errors"]} <= {"Runtime Error"}, r.stdout[-6000:]
        assert result["test_cases"]["generated"] > 300
        assert httpx.get(f"{s.url}/health", timeout=10).json() == {"status": "ok"}
        assert s.proc.poll() is None
        assert "Traceback" not in s.log.read_text()


def test_tools_and_tool_call_arguments_count_toward_max_prompt_chars(limited):
    # the chat template renders them too: a 3,000-character tool description is as much work as that prompt
    tool = {"type": "function", "function": {"name": "lookup", "description": "d" * 3000,
                                             "parameters": {"type": "object", "properties": {}}}}
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(f"{limited.url}/v1/chat/completions", json={**chat, "tools": [tool]}, timeout=60)
    assert r.status_code == 400 and "max_prompt_chars" in r.json()["error"]["message"], r.text
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"q": "x" * 3000})}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    r = httpx.post(f"{limited.url}/v1/chat/completions", json={**chat, "messages": messages}, timeout=60)
    assert r.status_code == 400 and "max_prompt_chars" in r.json()["error"]["message"], r.text
    call["function"]["arguments"] = json.dumps({"q": "x"})
    r = httpx.post(f"{limited.url}/v1/chat/completions", json={**chat, "messages": messages}, timeout=60)
    assert r.status_code == 200, r.text  # under the limit the same conversation is served
