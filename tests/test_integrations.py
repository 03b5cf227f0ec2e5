"""Serving engines people already run, for real on 127.0.0.1: a local Ray cluster (one per session) with
Ray Serve replicas of `inferneo serve`'s app and Ray build tasks, and KServe's model server.

The Ray cluster binds to the loopback interface only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray take
127.0.0.1 as the node address), without usage reporting; its workers start with an S3 endpoint on a dead
loopback port, so a task that missed the forwarded settings fails locally instead of reaching out."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import free_port, run_cli, tiny_recipe_fields, write_recipe

pytestmark = pytest.mark.integration

PROMPTS = ["The quick brown fox", "Hello world, this is", "Inferneo compiles models"]
MESSAGES = [{"role": "user", "content": "Hello world, this is a tiny tokenizer."}]
APP = "inferneo-test"


def wait_until(predicate, timeout: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact("llama")


@pytest.fixture(scope="module")
def reference(artifact):
    import inferneo_runtime

    with inferneo_runtime.load(artifact, target="onnx") as model:
        return {"completions": {p: model.generate(p, max_new_tokens=24).text for p in PROMPTS},
                "long": model.generate(PROMPTS[0], max_new_tokens=96).text,
                "chat": model.chat(MESSAGES, max_new_tokens=16).text}


# -- one local Ray cluster for this module (shut down after it, so its processes load no later test) ---------
@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node address 127.0.0.1 (read when ray is imported)
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'inferneo[ray]')")
    from ray import serve
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before this fixture ran
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED")}
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # what workers inherit unless a job forwards its own
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    try:
        context = ray.init(_node_ip_address="127.0.0.1", num_cpus=6, include_dashboard=False,
                           logging_level="WARNING", log_to_driver=False)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    address = context.address_info["gcs_address"]
    assert address.startswith("127.0.0.1:"), address
    yield {"address": address, "url": f"http://127.0.0.1:{port}", "port": port}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_app(ray_cluster, artifact):
    """Two replicas of a tiny artifact behind Ray Serve's proxy."""
    from ray import serve

    from inferneo_runtime.integrations.ray_serve import deployment

    app = deployment([str(artifact)], num_replicas=2, num_cpus=0.5, settings={"threads": 1},
                     health_check_period_s=1, graceful_shutdown_timeout_s=5)
    t0 = time.perf_counter()
    serve.run(app, name=APP, route_prefix="/")
    yield {**ray_cluster, "startup_s": time.perf_counter() - t0}
    _delete_app(APP)


def _delete_app(name: str, timeout: float = 240) -> None:
    """Delete a Serve application and wait for it to go. Serve's own blocking delete gives up after 60 s, which a
    loaded 2-core runner can exceed while a replica replaced after a kill is still starting."""
    from ray import serve

    if name in serve.status().applications:
        serve.delete(name, _blocking=False)
        wait_until(lambda: name not in serve.status().applications, timeout, f"Ray Serve did not delete {name}")


def _client(url: str, **kwargs):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", **kwargs)


def _replicas(app: str = APP) -> dict:
    from ray import serve

    status = serve.status().applications.get(app)
    return dict(status.deployments["Inferneo"].replica_states) if status else {}


def test_ray_serve_replicas_answer_the_openai_client(ray_app, reference):
    import httpx

    assert _replicas().get("RUNNING") == 2
    ready = httpx.get(f"{ray_app['url']}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["loaded"] == ["tiny-llama"]
    assert ready.json()["warmed"] == ["tiny-llama"]  # each replica ran its warm-up generation before Ray routed to it
    client = _client(ray_app["url"])
    with ThreadPoolExecutor(6) as pool:  # enough requests that both replicas serve some
        texts = list(pool.map(lambda p: client.completions.create(model="tiny-llama", prompt=p, max_tokens=24,
                                                                  temperature=0).choices[0].text, PROMPTS * 3))
    assert texts == [reference["completions"][p] for p in PROMPTS * 3]
    stream = client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == reference["completions"][PROMPTS[1]]
    chat = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == reference["chat"]
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]


def test_killing_a_replica_loses_no_request_that_had_not_started_streaming(ray_app, reference):
    """24 clients keep long requests (half streamed) running across both replicas until one replica has been
    killed mid-stream, then send one more each. Every request either answers correctly or failed after its
    response had started (a stream cut off); Ray replaces the replica and the deployment serves again.
    The clients loop rather than send one request each: on a fast host a single wave can finish before the
    kill lands, and then the test would prove nothing."""
    import ray

    client = _client(ray_app["url"], timeout=60)  # the official client, its default retries (2)
    expected = reference["long"]
    streaming_started, killed = threading.Event(), threading.Event()
    victim = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith(f"SERVE_REPLICA::{APP}#"))[0]  # looked up before the load starts

    def one(i: int):
        phase, started = "request", time.monotonic()
        try:
            if i % 2:
                r = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=96, temperature=0)
                return ("ok" if r.choices[0].text == expected else "wrong", phase, started, time.monotonic())
            stream = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=96, temperature=0,
                                               stream=True)
            phase = "started"  # the response head is in: the request runs on a replica and streams
            text = ""
            for chunk in stream:
                streaming_started.set()
                text += chunk.choices[0].text
            return ("ok" if text == expected else "wrong", phase, started, time.monotonic())
        except Exception as e:  # noqa: BLE001 - classified below
            return (f"error {type(e).__name__}: {e}", phase, started, time.monotonic())

    def client_loop(i: int) -> list:
        results, deadline = [], time.monotonic() + 90
        while not killed.is_set() and time.monotonic() < deadline:
            results.append(one(i))
        results.append(one(i))  # one more, sent after the kill
        return results

    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(client_loop, i) for i in range(24)]
        assert streaming_started.wait(60)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        killed.set()
        results = [r for f in futures for r in f.result(timeout=180)]

    lost = [r for r in results if r[0] != "ok" and r[1] != "started"]
    assert not lost, f"requests lost before streaming began: {lost}"
    assert not [r for r in results if r[0] == "wrong"], results
    assert sum(r[0] == "ok" for r in results) >= 24  # every non-streamed request (two or more per odd client)
    assert any(start < killed_at < end for _, _, start, end in results), "nothing was in flight when the replica died"

    def recovered():
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(f"SERVE_REPLICA::{APP}#")}
        return victim not in names and len(names) == 2 and _replicas().get("RUNNING") == 2

    wait_until(recovered, 60, "the deployment did not recover to 2 replicas")
    r = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=96, temperature=0)
    assert r.choices[0].text == expected


def test_inferneo_serve_ray_on_an_existing_cluster(ray_cluster, artifact, reference, tmp_path):
    """`inferneo serve ART --ray --replicas 1` with RAY_ADDRESS: deploys on that cluster, and SIGTERM
    deletes the application (Ray drains it) while the cluster keeps running."""
    import httpx
    from ray import serve

    _delete_app(APP)  # the module's two-replica app holds the route prefix "/"
    log = tmp_path / "serve.log"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"]}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "inferneo_runtime.cli", "serve", str(artifact), "--ray",
                                 "--replicas", "1", "--port", str(ray_cluster["port"]), "--threads", "1"],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: proc.poll() is not None or "Inferneo on Ray Serve" in log.read_text(), 120,
                   f"serve --ray did not start:\n{log.read_text()}")
        assert proc.poll() is None, log.read_text()
        client = _client(ray_cluster["url"])
        r = client.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=24, temperature=0)
        assert r.choices[0].text == reference["completions"][PROMPTS[2]]
        assert httpx.get(f"{ray_cluster['url']}/ready").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, log.read_text()
    assert "inferneo" not in serve.status().applications


# -- Ray build tasks ----------------------------------------------------------------------------------------
def test_build_directory_as_ray_tasks_then_cache(ray_cluster, tiny_checkpoint, tmp_path, s3env, bucket):
    """Two tiny recipes (one with two targets: one task per target, merged) built as Ray tasks in parallel
    with the S3 build cache; the second run hits the cache for both and starts no task."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    write_recipe(recipes / "a.yaml", **tiny_recipe_fields(tiny_checkpoint("llama"), "fan-a", tmp_path / "out" / "a",
                                                          targets=("onnx", "torchscript")))
    write_recipe(recipes / "b.yaml", **tiny_recipe_fields(tiny_checkpoint("qwen2"), "fan-b", tmp_path / "out" / "b",
                                                          targets=("onnx",)))
    (recipes / "notes.txt").write_text("not a recipe")
    cache = f"s3://{bucket}/build-cache"
    env = {"RAY_ADDRESS": ray_cluster["address"]}

    t0 = time.perf_counter()
    r = run_cli("build", str(recipes), "--ray", "--json", "--cache", cache, env=env)
    first_s = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    first = json.loads(r.stdout)
    assert first["ok"] and first["ray"] and first["built"] == 2 and first["cached"] == 0
    a, b = first["recipes"]
    assert a["name"] == "fan-a" and a["tasks"] == 2 and set(a["targets"]) == {"onnx", "torchscript"}
    assert b["name"] == "fan-b" and b["tasks"] == 1
    work = tmp_path / "out" / ".inferneo-fanout"  # per-target sub-builds are cleaned up after the merge
    assert not work.exists() or not any(work.iterdir())
    # the merged artifact is a whole artifact: checksums and goldens of both targets hold
    import inferneo_runtime
    from inferneo_build.cli import run_build

    for target in ("onnx", "torchscript"):
        with inferneo_runtime.load(tmp_path / "out" / "a", target=target) as model:
            model.check_goldens()
    # ... with the build key a plain build computes: it is up to date for `inferneo build a.yaml`
    assert run_build(recipes / "a.yaml", None, quiet=True)["cached"] == "output"

    # another CI job: fresh outputs, same cache → both from the cache, nothing compiled
    fields_a = tiny_recipe_fields(tiny_checkpoint("llama"), "fan-a", tmp_path / "job2" / "a",
                                  targets=("onnx", "torchscript"))
    fields_b = tiny_recipe_fields(tiny_checkpoint("qwen2"), "fan-b", tmp_path / "job2" / "b", targets=("onnx",))
    write_recipe(recipes / "a.yaml", **fields_a)
    write_recipe(recipes / "b.yaml", **fields_b)
    t0 = time.perf_counter()
    r = run_cli("build", str(recipes), "--ray", "--json", "--cache", cache, env=env)
    second_s = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    second = json.loads(r.stdout)
    assert second["built"] == 0 and second["cached"] == 2
    assert all(x["cached"] == f"{cache}/{x['build_key']}" for x in second["recipes"])
    assert [x["build_key"] for x in second["recipes"]] == [x["build_key"] for x in first["recipes"]]
    print(f"fan-out: first run {first_s:.1f}s, cached run {second_s:.1f}s")


def test_build_lock_serializes_jobs_on_one_key(s3env, bucket):
    """Two jobs on the same key: the second waits while the first holds the lock, then sees its result."""
    from inferneo_build.fanout import build_lock
    from inferneo_runtime import s3

    cache, key = f"s3://{bucket}/cache", "k" * 64
    order = []
    with build_lock(cache, key) as waited:
        assert not waited

        contended = threading.Event()  # set by the second job's "waiting for it" log line

        def second():
            with build_lock(cache, key, log=lambda _: contended.set(), poll_s=0.05) as w:
                order.append(("second", w))

        t = threading.Thread(target=second)
        t.start()
        # wait for the second job to find the lock taken (not a fixed sleep: creating its S3 client can take longer
        # on a busy machine, and the result written below would then be seen before the lock)
        assert contended.wait(30)
        time.sleep(0.2)
        assert t.is_alive()  # blocked on the lock
        order.append(("first", False))
        client = s3.make_client()  # the first job's result lands in the cache (what build_cache.store writes last)
        client.put_object(Bucket=bucket, Key=f"cache/{key}/LATEST", Body=b"{}")
    t.join(10)
    assert order == [("first", False), ("second", True)]


# -- KServe ---------------------------------------------------------------------------------------------------
def test_kserve_predictor_answers_through_the_model_server(artifact, reference, tmp_path):
    pytest.importorskip("kserve", reason="KServe's SDK is not installed (pip install 'inferneo[kserve]' or "
                        "'inferneo[test]')")
    import httpx

    port = free_port()
    log = tmp_path / "kserve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "inferneo_runtime.integrations.kserve", "--model_name", "tiny",
                                 "--artifact", str(artifact), "--http_port", str(port), "--enable_grpc", "false",
                                 "--host", "127.0.0.1", "--threads", "1"], stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"{url}/v1/models/tiny", timeout=2).json().get("ready")
            except (httpx.TransportError, ValueError):
                return False

        wait_until(ready, 90, f"KServe model server not ready:\n{log.read_text()}")
        v1 = httpx.post(f"{url}/v1/models/tiny:predict", timeout=30, json={
            "instances": [PROMPTS[0], {"prompt": PROMPTS[1], "max_tokens": 24}], "parameters": {"max_tokens": 24}})
        assert v1.status_code == 200, v1.text
        assert [p["text"] for p in v1.json()["predictions"]] == [reference["completions"][p] for p in PROMPTS[:2]]
        v2 = httpx.post(f"{url}/v2/models/tiny/infer", timeout=30, json={"inputs": [
            {"name": "text_input", "shape": [2], "datatype": "BYTES", "data": PROMPTS[:2]},
            {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [24]}]})
        assert v2.status_code == 200, v2.text
        out = {o["name"]: o["data"] for o in v2.json()["outputs"]}
        assert out["text_output"] == [reference["completions"][p] for p in PROMPTS[:2]]
        assert httpx.get(f"{url}/v2/models/tiny/ready").status_code == 200
        bad = httpx.post(f"{url}/v1/models/tiny:predict", json={"instances": [{"prompt": "x", "max_tokens": 10**6}]})
        assert bad.status_code == 400 and "max_sequence" in bad.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
