"""What a hostile probe found (issue 18), each against a real `inferneo serve` subprocess over HTTP: the management
API reached by DNS rebinding, cross-origin posts or header tricks, code run through model loading, lock-out by
abandoned requests, event-loop stalls, unlisted files read from a signed artifact."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from conftest import free_port, serve_subprocess  # noqa: E402


@pytest.fixture(scope="module")
def llama(tiny_artifact):
    return tiny_artifact("llama")


def serve(cwd: Path, config: str, extra: tuple = ()):
    (cwd / "serve.yaml").write_text(config)
    port = free_port()
    return serve_subprocess(["--config", str(cwd / "serve.yaml"), "--log-level", "warning", "--port", str(port),
                             *extra], cwd, port)


def card(url: str, model: str, **kw) -> dict:
    r = httpx.get(f"{url}/v1/models/{model}", timeout=30, **kw)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return tmp_path_factory.mktemp("model-roots")


@pytest.fixture(scope="module")
def open_server(llama, roots, tmp_path_factory):
    """Loopback-bound, no admin token, registration from `roots` with unsigned artifacts allowed."""
    cwd = tmp_path_factory.mktemp("hardening")
    with serve(cwd, f"models: [{llama}]\nmodel_roots: [{roots}]\nallow_unsigned_registration: true\n") as s:
        yield s


# -- the management API -------------------------------------------------------------------------------------
def test_dns_rebinding_host_is_refused_and_changes_nothing(open_server):
    url = open_server.url
    assert card(url, "tiny-llama")["loaded"]
    for host in ("evil.example", "evil.example:8000", "attacker.example."):
        r = httpx.post(f"{url}/v1/models/tiny-llama/unload", json={}, headers={"Host": host}, timeout=30)
        assert r.status_code == 421 and r.json()["error"]["code"] == "misdirected_host", r.text
        r = httpx.post(f"{url}/v1/models", json={"path": "/tmp"}, headers={"Host": host}, timeout=30)
        assert r.status_code == 421
    assert card(url, "tiny-llama")["loaded"]  # nothing changed
    # the same request with the host the server binds is served (the route works; only the Host was wrong)
    r = httpx.post(f"{url}/v1/models/tiny-llama/unload", json={}, timeout=30)
    assert r.status_code == 200 and not r.json()["loaded"]
    assert httpx.post(f"{url}/v1/models/tiny-llama/load", json={}, timeout=60).status_code == 200


def test_cross_origin_text_plain_post_is_refused(open_server):
    url = open_server.url
    body = json.dumps({}).encode()
    r = httpx.post(f"{url}/v1/models/tiny-llama/unload", content=body, headers={"Content-Type": "text/plain"},
                   timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    r = httpx.post(f"{url}/v1/models/tiny-llama/unload", timeout=30)  # no body, no type: a browser's simple POST
    assert r.status_code == 415
    r = httpx.post(f"{url}/v1/models/tiny-llama/unload", json={}, headers={"Origin": "http://evil.example"},
                   timeout=30)
    assert r.status_code == 403 and "origin" in r.json()["error"]["message"]
    assert card(url, "tiny-llama")["loaded"]
    r = httpx.get(f"{url}/v1/routing", headers={"Origin": f"http://127.0.0.1:{url.rsplit(':', 1)[1]}"}, timeout=30)
    assert r.status_code == 200  # the server's own origin is fine


def test_forwarded_headers_do_not_decide_who_is_loopback(llama, tmp_path):
    """A loopback peer stays loopback whatever X-Forwarded-For claims; a server bound to every address needs the
    admin token whatever the request claims to come from."""
    with serve(tmp_path, f"models: [{llama}]\n") as s:
        r = httpx.get(f"{s.url}/v1/routing", headers={"X-Forwarded-For": "203.0.113.7"}, timeout=30)
        assert r.status_code == 200, r.text
    wild = tmp_path / "wild"
    wild.mkdir()
    with serve(wild, f"models: [{llama}]\nhost: 0.0.0.0\n") as s:
        for claim in ("localhost", "127.0.0.1", "testclient"):
            r = httpx.post(f"{s.url}/v1/models/tiny-llama/unload", json={}, timeout=30,
                           headers={"X-Forwarded-For": claim, "X-Real-IP": claim, "Forwarded": f"for={claim}"})
            assert r.status_code == 403 and "admin token" in r.json()["error"]["message"], r.text
        assert card(s.url, "tiny-llama")["loaded"]


def _evil_torchscript(path: Path, marker: Path) -> None:
    """A TorchScript module whose __setstate__ (run by torch.jit.load) creates `marker`: code run by loading."""
    torch = pytest.importorskip("torch")

    class Evil(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.marker = str(marker)
            self.buf = torch.zeros(8, dtype=torch.uint8)

        def forward(self, x):
            return x

        @torch.jit.export
        def __getstate__(self):
            return (self.marker, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[str, bool]):
            self.marker = state[0]
            self.training = state[1]
            self.buf = torch.from_file(self.marker, True, 8, dtype=torch.uint8)  # creates the marker file

    torch.jit.script(Evil()).save(str(path))


def test_bare_torchscript_over_the_api_is_refused_and_never_loaded(open_server, llama, roots):
    evil = roots / "evil"
    evil.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama / f, evil / f)
    marker = roots / "pwned"
    _evil_torchscript(evil / "model.pt", marker)
    assert not marker.exists()
    r = httpx.post(f"{open_server.url}/v1/models", timeout=120,
                   json={"path": str(evil / "model.pt"), "format": "torchscript", "load": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "registration_refused", r.text
    assert "run code" in r.json()["error"]["message"]
    assert not marker.exists()
    assert [m["id"] for m in httpx.get(f"{open_server.url}/v1/models").json()["data"]] == ["tiny-llama"]


def test_registration_only_under_model_roots_and_errors_list_nothing(open_server, tmp_path):
    url = open_server.url
    for path in ("/etc", "/", str(tmp_path), "/etc/../root", "relative/dir", "s3://bucket/model"):
        r = httpx.post(f"{url}/v1/models", json={"path": path}, timeout=30)
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "registration_refused", r.text
        assert "passwd" not in err["message"] and "hosts" not in err["message"] and "model root" in err["message"]


def test_registration_is_off_without_model_roots(llama, tmp_path):
    with serve(tmp_path, f"models: [{llama}]\n") as s:
        r = httpx.post(f"{s.url}/v1/models", json={"path": str(llama), "name": "again"}, timeout=30)
        assert r.status_code == 400 and "model_roots" in r.json()["error"]["message"], r.text


def test_a_model_that_fails_to_load_is_not_kept(open_server, llama, roots):
    broken = roots / "broken"
    shutil.copytree(llama, broken)
    data = broken / "onnx" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped: the checksum fails at load
    data.write_bytes(bytes(raw))
    r = httpx.post(f"{open_server.url}/v1/models", timeout=120,
                   json={"path": str(broken), "name": "broken", "target": "onnx", "load": True})
    assert r.status_code >= 400, r.text
    assert "broken" not in [m["name"] for m in httpx.get(f"{open_server.url}/v1/models").json()["data"]]
    ok = httpx.post(f"{open_server.url}/v1/models", timeout=120, json={"path": str(llama), "name": "fine"})
    assert ok.status_code == 400 and "model root" in ok.json()["error"]["message"]  # llama is outside the roots


def test_unsigned_artifacts_need_the_operators_opt_in_and_cards_hide_paths(llama, tmp_path):
    roots = tmp_path / "roots"
    shutil.copytree(llama, roots / "tiny")
    config = f"models: [{llama}]\nmodel_roots: [{roots}]\nadmin_token: s3cret\n"
    with serve(tmp_path, config) as s:
        admin = {"Authorization": "Bearer s3cret"}
        r = httpx.post(f"{s.url}/v1/models", json={"path": str(roots / "tiny"), "name": "copy"}, headers=admin,
                       timeout=30)
        assert r.status_code == 400 and "allow_unsigned_registration" in r.json()["error"]["message"], r.text
        public = card(s.url, "tiny-llama")
        assert not public.get("source") and not public.get("notes") and str(llama) not in json.dumps(public)
        assert card(s.url, "tiny-llama", headers=admin)["source"] == str(llama)


def test_a_manifest_with_an_absurd_size_is_refused_at_registration(open_server, llama, roots):
    huge = roots / "huge"
    shutil.copytree(llama, huge)
    manifest = huge / "inferneo.json"
    text = manifest.read_text()
    data = json.loads(text)
    data["targets"]["onnx"]["files"][0]["size"] = 10 ** 400
    manifest.write_text(json.dumps(data))
    r = httpx.post(f"{open_server.url}/v1/models", json={"path": str(huge), "name": "huge"}, timeout=60)
    assert r.status_code == 400 and "size" in r.json()["error"]["message"], r.text
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(f"{open_server.url}{path}", timeout=30).status_code == 200


# -- the runtime reads only what the manifest lists ---------------------------------------------------------------
def test_an_unlisted_chat_template_added_after_signing_is_not_used(llama, tmp_path):
    """The template moved into tokenizer_config.json (listed), chat_template.jinja dropped from the manifest, then
    the artifact signed; a hostile chat_template.jinja added after signing must not be rendered."""
    pytest.importorskip("cryptography")
    from inferneo_runtime.manifest import sha256_file
    from inferneo_runtime.signing import generate_keypair, sign_artifact

    art = tmp_path / "art"
    shutil.copytree(llama, art)
    config = json.loads((art / "tokenizer_config.json").read_text())
    config["chat_template"] = (art / "chat_template.jinja").read_text()
    (art / "tokenizer_config.json").write_text(json.dumps(config))
    (art / "chat_template.jinja").unlink()
    manifest = json.loads((art / "inferneo.json").read_text())
    manifest["root_files"] = [f for f in manifest["root_files"] if f["path"] != "chat_template.jinja"]
    for f in manifest["root_files"]:
        if f["path"] == "tokenizer_config.json":
            f.update(sha256=sha256_file(art / f["path"]), size=(art / f["path"]).stat().st_size)
    (art / "inferneo.json").write_text(json.dumps(manifest, indent=2))
    _, public, _ = generate_keypair(tmp_path / "ci")
    sign_artifact(art, tmp_path / "ci")
    (art / "chat_template.jinja").write_text("{{ raise_exception('the unlisted template ran') }}")
    with serve(tmp_path, f"models: [{art}]\ntrusted_keys: [{public}]\n") as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", timeout=60, json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text


# -- abandoned requests -------------------------------------------------------------------------------------
def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def _until(condition, timeout: float, what: str):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(what)


def test_an_abandoned_non_streaming_request_is_cancelled(llama, tmp_path):
    """16 sequences of a non-streaming request whose client hangs up: their queue room frees within seconds (a
    request needing the whole queue is admitted) and they stop generating (far fewer tokens than asked for)."""
    import socket

    with serve(tmp_path, f"models: [{llama}]\nmax_queue: 16\n") as s:
        host, port = s.url.removeprefix("http://").split(":")
        body = json.dumps({"model": "tiny-llama", "prompt": "hi", "n": 16, "max_tokens": 100, "ignore_eos": True,
                           "temperature": 1.0}).encode()
        before = _metric(s.url, "inferneo_generation_tokens_total")
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        _until(lambda: _metric(s.url, "inferneo_requests_in_flight") >= 16, 30, "the request was not admitted")
        sock.close()  # the client goes away
        full = {"model": "tiny-llama", "prompt": "hi", "n": 16, "max_tokens": 2}
        _until(lambda: httpx.post(f"{s.url}/v1/completions", json=full, timeout=30).status_code == 200, 10,
               "the abandoned request's queue room was not freed")
        generated = _metric(s.url, "inferneo_generation_tokens_total") - before - 16 * 2
        assert generated < 16 * 100 / 2, f"the abandoned sequences ran on: {generated} tokens"


# -- heavy work stays off the event loop --------------------------------------------------------------------------
def _health_while(url: str, send) -> tuple[httpx.Response, list[float]]:
    """Run `send()` (one hostile request) on a thread and probe /health until it answers: the probes' latencies."""
    import threading
    import time

    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", send()))
    worker.start()
    latencies = []
    with httpx.Client(timeout=30) as probe:  # one client: making one per probe costs more than the probe
        while worker.is_alive():
            t0 = time.perf_counter()
            assert probe.get(f"{url}/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
    worker.join()
    return result["r"], latencies


def test_health_answers_while_a_hostile_chat_template_runs(llama, tmp_path):
    from inferneo_runtime.manifest import sha256_file

    art = tmp_path / "art"
    shutil.copytree(llama, art)
    template = art / "chat_template.jinja"
    template.write_text("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    manifest = json.loads((art / "inferneo.json").read_text())
    for f in manifest["root_files"]:
        if f["path"] == "chat_template.jinja":
            f.update(sha256=sha256_file(template), size=template.stat().st_size)
    (art / "inferneo.json").write_text(json.dumps(manifest, indent=2))
    with serve(tmp_path, f"models: [{art}]\n") as s:
        r, latencies = _health_while(s.url, lambda: httpx.post(f"{s.url}/v1/chat/completions", timeout=120, json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        assert r.status_code == 400 and r.json()["error"]["code"] == "template_limit_exceeded", r.text
        assert len(latencies) >= 3 and max(latencies) < 0.5, latencies
        ok = httpx.post(f"{s.url}/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_health_answers_while_a_huge_prompt_is_tokenized_and_hostile_fields_are_400s(llama, tmp_path):
    with serve(tmp_path, f"models: [{llama}]\nmax_messages: 64\n") as s:
        # 900k characters, encoded here (not on the sending thread, where it would stall this process's probes)
        body = json.dumps({"model": "tiny-llama", "prompt": "漢字かな" * 225_000, "max_tokens": 2}).encode()
        r, latencies = _health_while(s.url, lambda: httpx.post(f"{s.url}/v1/completions", timeout=120, content=body,
                                                               headers={"Content-Type": "application/json"}))
        assert r.status_code == 400 and r.json()["error"]["param"] in ("prompt", "messages"), r.text
        assert len(latencies) >= 3 and max(latencies) < 0.5, latencies
        chat = f"{s.url}/v1/chat/completions"
        r = httpx.post(chat, timeout=60, json={"model": "tiny-llama", "messages": [{"role": "user", "content": ""}] * 65})
        assert r.status_code == 400 and "max_messages" in r.json()["error"]["message"], r.text
        r = httpx.post(chat, timeout=60, json={"model": "tiny-llama", "messages": [{"role": "x" * 300, "content": "hi"}]})
        assert r.status_code == 400 and "role" in r.json()["error"]["param"], r.text
        for field in ("repetition_penalty", "temperature", "top_p"):
            r = httpx.post(chat, timeout=60, content=b'{"model": "tiny-llama", "messages": [{"role": "user", "content":'
                           b' "hi"}], "' + field.encode() + b'": Infinity}', headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_a_catastrophic_routing_regex_does_not_stall_the_server(open_server):
    url = open_server.url
    r = httpx.post(f"{url}/v1/routing/rules", timeout=30, json={
        "name": "evil", "condition": "prompt matches '(a|aa)+$'", "model": "tiny-llama"})
    assert r.status_code == 201, r.text
    try:
        body = {"prompt": "a" * 60 + "b", "max_tokens": 2}  # no model: the rules are tried; ~fib(60) steps for re
        r, latencies = _health_while(url, lambda: httpx.post(f"{url}/v1/completions", json=body, timeout=120))
        assert r.status_code == 200, r.text
        assert max(latencies) < 0.5, latencies
    finally:
        httpx.delete(f"{url}/v1/routing/rules/evil", timeout=30)
