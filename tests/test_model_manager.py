"""Model management: what --model accepts, the flags users' scripts pass, versions, the persisted registry,
routing rules and A/B tests, custom model classes.

Servers here are `inferneo serve` subprocesses (the way users run it) unless a test only needs the Python API.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

import inferneo_runtime  # noqa: E402
from conftest import free_port, serve_subprocess  # noqa: E402
from inferneo_runtime.client import InferneoClient  # noqa: E402

PROMPTS = ["The quick brown fox", "Hello world, this is", "Inferneo compiles models"]


def serve_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300):
    """`inferneo serve ARGS --port P` as a subprocess (its own --log-level, if any, is kept)."""
    port = free_port()
    return serve_subprocess([*args, "--port", str(port)], cwd, port, env=env, timeout=timeout)


def greedy(url: str, model: str | None, prompt: str, n: int = 8, headers: dict | None = None):
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
                                                  "ignore_eos": True}, headers=headers or {}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.headers["x-inferneo-model"]


def local_greedy(path: Path, prompt: str, n: int = 8, **kw) -> str:
    with inferneo_runtime.load(path, **kw) as m:
        return m.generate(prompt, max_new_tokens=n, ignore_eos=True).text


# -- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tiny_artifact):
    return tiny_artifact("llama")


@pytest.fixture(scope="module")
def qwen(tiny_artifact):
    return tiny_artifact("qwen2")


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_checkpoint, tmp_path_factory):
    """A checkpoint directory named the way users name theirs (the served name is the directory's), whose next
    token is always clear: the tiny Llama made nearly a bigram table (lm_head = a permutation of the embeddings,
    attention and MLP outputs scaled down), so its greedy path has wide logit margins and an int8 build of it
    validates on any host. (A random-weight model has near-ties that int8 flips.)"""
    import torch
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("hf") / "tiny-chat"
    shutil.copytree(tiny_checkpoint("llama"), d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        model.lm_head.weight.copy_(emb[torch.randperm(emb.shape[0], generator=g)] * 2.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def adapter(checkpoint_dir, tmp_path_factory):
    """A PEFT LoRA adapter (random, non-zero) for the tiny checkpoint."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             lora_dropout=0.0)
    torch.manual_seed(3)
    model = peft.get_peft_model(base, config)
    out = tmp_path_factory.mktemp("adapter") / "chat-lora"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def local_artifact(checkpoint_dir, adapter, tmp_path_factory):
    """The artifact users would have built: the adapter merged, a float32 and an int8 ONNX target."""
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    out = tmp_path_factory.mktemp("local") / "tiny-chat-local"
    recipe = Recipe.model_validate({
        "name": "tiny-chat-local", "source": {"path": str(checkpoint_dir), "adapters": [str(adapter)]},
        "targets": [{"format": "onnx"}, {"format": "onnx", "precision": "int8"}],
        "shapes": {"max_batch": 4, "max_sequence": 128},
        "validation": {"prompts": ["Hello", "The quick brown fox"], "max_new_tokens": 16}, "output": str(out)})
    return build(recipe).output


# -- the serve command users know ---------------------------------------------------------------------------
def test_long_serve_command_line_starts_answers_and_compiles_once(local_artifact, checkpoint_dir, adapter, tmp_path):
    from inferneo_runtime.local_cache import cache_root

    args = ["--model", str(local_artifact), "--model", str(checkpoint_dir), "--model-type", "onnx", "--lazy-loading",
            "--max-model-len", "4096", "--max-batch-size", "16", "--max-concurrent-requests", "50",
            "--gpu-memory-utilization", "0.8", "--dtype", "half", "--quantization", "int8", "--adapter", str(adapter),
            "--adapter-type", "lora", "--enable-metrics", "--log-level", "info",
            "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1"]
    compiled = cache_root() / "served" / "tiny-chat"
    shutil.rmtree(compiled, ignore_errors=True)
    with serve_cli(args, tmp_path) as s:
        c = InferneoClient(s.url)
        ids = [m.id for m in c.models.list().data]
        assert ids == ["tiny-chat-local", "tiny-chat"]
        for name in ids:
            text, served = greedy(s.url, name, PROMPTS[0])
            assert served == f"{name}@1" and text
            info = c.models.get(name)
            assert info.format == "onnx" and info.precision == "int8" and info.dtype == "int8"  # --quantization
            assert info.max_context == (128 if name == "tiny-chat-local" else 512)  # --max-model-len within bounds
            assert info.max_batch == (4 if name == "tiny-chat-local" else 16)  # --max-batch-size within bounds
            assert info.validation["status"] == "passed" and info.validated
            assert len(info.adapters) == 1 and info.gpu_memory_utilization == 0.8
            assert any("no effect on cpu" in n for n in info.notes)  # --gpu-memory-utilization said, not ignored
            assert any("--dtype half" in n for n in info.notes)
        assert c.models.get("tiny-chat").kind == "checkpoint"
        assert "inferneo_requests_total" in httpx.get(f"{s.url}/metrics").text  # --enable-metrics
        first = json.loads((compiled / "inferneo.json").read_text())
        log = s.log.read_text()
        assert "compiled in" in log and "--gpu-memory-utilization 0.8 has no effect on cpu" in log
        assert "exceeds the 128 tokens" in log  # the artifact's bound, said
    # the same command again: the build cache has the compiled artifact, nothing is rebuilt
    with serve_cli(args, tmp_path) as s:
        text, _ = greedy(s.url, "tiny-chat", PROMPTS[0])
        assert "up to date (build cache)" in s.log.read_text() and "compiled in" not in s.log.read_text()
    assert json.loads((compiled / "inferneo.json").read_text())["built_at"] == first["built_at"]
    assert text == local_greedy(compiled, PROMPTS[0], target="onnx-int8")


def test_parallel_flags_above_one_are_refused(llama, tmp_path):
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size"):
        r = subprocess.run([sys.executable, "-m", "inferneo_runtime.cli", "serve", "--model", str(llama), flag, "2"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"{flag} 2" in r.stderr and "no Inferneo backend shards" in r.stderr, r.stderr


def test_flags_pick_a_target_or_fail_clearly(local_artifact, llama, adapter, tmp_path):
    from inferneo_runtime.model_sources import ModelSourceError, resolve
    from inferneo_runtime.server.config import ModelConfig

    def pick(path, **kw):
        return resolve(ModelConfig(path=str(path), **kw))

    assert pick(local_artifact, quantization="int8").target == "onnx-int8"
    assert pick(local_artifact, dtype="float32").target == "onnx"
    assert pick(local_artifact, adapters=[str(adapter)]).target == "onnx"  # the adapter it carries
    assert pick(llama, format="torchscript").target == "torchscript"
    with pytest.raises(ModelSourceError, match=r"no valid target matching --dtype half.*onnx \(onnx fp32\)"):
        pick(llama, dtype="half")  # a CPU-only float32 artifact has no half target
    with pytest.raises(ModelSourceError, match="no valid target matching --quantization int4"):
        pick(local_artifact, quantization="int4")
    with pytest.raises(ModelSourceError, match="built with adapters merged in: none"):
        pick(llama, adapters=[str(adapter)])
    with pytest.raises(ModelSourceError, match="no tokenizer.json"):
        pick(llama / "onnx" / "model.onnx", format="onnx")
    with pytest.raises(ModelSourceError, match="is onnx, not --model-type torchscript"):
        pick(llama / "onnx" / "model.onnx", format="torchscript", tokenizer=str(llama))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelSourceError, match="--model-type"):
        pick(tmp_path / "notes.txt", tokenizer=str(llama))
    with pytest.raises(ModelSourceError, match="not an Inferneo artifact .* nor a Hugging Face checkpoint"):
        pick(tmp_path)
    r = subprocess.run([sys.executable, "-m", "inferneo_runtime.cli", "serve", "--model", str(llama), "--quantization",
                        "awq"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "quantization 'awq' is not supported" in r.stderr, r.stderr


def test_checkpoint_without_the_build_extra_says_how_to_build(checkpoint_dir, tmp_path):
    script = ("import sys\n"
              "class Block:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] == 'inferneo_build': raise ImportError(name)\n"
              "sys.meta_path.insert(0, Block())\n"
              "from inferneo_runtime.cli import main\n"
              f"sys.argv = ['inferneo', 'serve', '--model', {str(checkpoint_dir)!r}]\n"
              "main()\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 5, r.stderr
    assert "is a Hugging Face checkpoint, not an Inferneo artifact" in r.stderr and "inferneo[build]" in r.stderr


def test_bare_onnx_exported_by_the_build_serves_the_same_greedy_text(llama, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    for f in ("model.onnx", "model.onnx.data"):
        shutil.copy(llama / "onnx" / f, export / f)
    expected = {p: local_greedy(llama, p, 12) for p in PROMPTS}
    with serve_cli(["--model", str(export / "model.onnx"), "--model-type", "onnx", "--tokenizer", str(llama),
                    "--log-level", "warning"], tmp_path) as s:
        info = InferneoClient(s.url).models.get("export")
        assert info.kind == "file" and info.validated is False and info.validation["status"] == "skipped"
        assert any("served unvalidated" in n for n in info.notes)
        assert (info.format, info.architecture, info.max_context) == ("onnx", "llama", 512)
        for p in PROMPTS:
            assert greedy(s.url, "export", p, 12)[0] == expected[p]
        chat = InferneoClient(s.url).chat.completions.create(
            model="export", messages=[{"role": "user", "content": "Hello world"}], max_tokens=6, temperature=0)
        assert chat.choices[0].message.role == "assistant"
        assert "served unvalidated" in s.log.read_text()


def test_bare_torchscript_file_with_its_config_serves_the_same_greedy_text(llama, tmp_path):
    # a bare `model.pt` (the operator's own file, named on the command line; the API never registers one)
    export = tmp_path / "ts-export"
    export.mkdir()
    shutil.copy(llama / "torchscript" / "model.pt", export / "model.pt")
    shutil.copy(llama / "config.json", export / "config.json")
    expected = {p: local_greedy(llama, p, 12, target="torchscript") for p in PROMPTS}
    with serve_cli(["--model", str(export / "model.pt"), "--model-type", "torchscript", "--tokenizer", str(llama),
                    "--log-level", "warning"], tmp_path) as s:
        info = InferneoClient(s.url).models.get("ts-export")
        assert info.kind == "file" and info.validated is False and info.format == "torchscript"
        for p in PROMPTS:
            assert greedy(s.url, "ts-export", p, 12)[0] == expected[p]


# -- versions and the registry file -----------------------------------------------------------------------------
def test_two_versions_side_by_side_and_the_registry_survives_a_restart(llama, local_artifact, tmp_path):
    registry = tmp_path / "registry.json"
    v1, v2 = local_greedy(llama, PROMPTS[1]), local_greedy(local_artifact, PROMPTS[1])
    assert v1 != v2  # (the adapter changed the model, so the versions are told apart by their text)
    roots = {"INFERNEO_MODEL_ROOTS": f"{llama.parent},{local_artifact.parent}",  # registered over the API below
             "INFERNEO_ALLOW_UNSIGNED_REGISTRATION": "1"}
    with serve_cli(["--model", str(llama), "--registry", str(registry), "--log-level", "warning"], tmp_path,
                   env=roots) as s:
        c = InferneoClient(s.url)
        c.models.register("tiny", str(llama), version="1")
        card = c.models.register("tiny", str(local_artifact), version="2", target="onnx")
        assert (card.id, card.version, card.versions) == ("tiny", "2", ["1", "2"])
        assert greedy(s.url, "tiny", PROMPTS[1]) == (v2, "tiny@2")  # the newest by default
        assert greedy(s.url, "tiny@1", PROMPTS[1]) == (v1, "tiny@1")
        assert greedy(s.url, "tiny@2", PROMPTS[1]) == (v2, "tiny@2")
        assert [m.id for m in c.models.list().data] == ["tiny-llama", "tiny@1", "tiny"]
    saved = json.loads(registry.read_text())["models"]
    assert [(m["name"], m["version"]) for m in saved] == [("tiny-llama", "1"), ("tiny", "1"), ("tiny", "2")]
    with serve_cli(["--registry", str(registry), "--lazy", "--log-level", "warning"], tmp_path) as s:  # no --model
        c = InferneoClient(s.url)
        assert [m.id for m in c.models.list().data] == ["tiny-llama", "tiny@1", "tiny"]
        assert greedy(s.url, "tiny", PROMPTS[1]) == (v2, "tiny@2")
        assert greedy(s.url, "tiny@1", PROMPTS[1]) == (v1, "tiny@1")
        c.models.unload("tiny@1")
        assert c.models.get("tiny@1").loaded is False
        assert c.models.delete("tiny@1").deleted
    assert [(m["name"], m["version"]) for m in json.loads(registry.read_text())["models"]] == [
        ("tiny-llama", "1"), ("tiny", "2")]


def test_model_manager_python_api(llama, qwen, tmp_path):
    from inferneo_runtime import ModelManager
    from inferneo_runtime.registry import ModelNotFound, RegistryError, version_key

    assert sorted(["10", "9", "1.10", "1.2"], key=version_key) == ["1.2", "1.10", "9", "10"]
    path = tmp_path / "models.json"
    m = ModelManager(max_models=1, max_memory_gb=1, registry_path=path)
    try:
        m.register("chat", llama, version="9")
        m.register("chat", qwen, version="10")
        m.register(llama)  # the manifest's name, version 1
        assert m.entry("chat").version == "10" and m.entry("chat@9").source == str(llama)
        with pytest.raises(RegistryError, match="already registered"):
            m.register("chat", llama, version="9")
        with pytest.raises(ModelNotFound, match="chat@3"):
            m.entry("chat@3")
        assert m.generate("chat@9", PROMPTS[0], max_new_tokens=6, ignore_eos=True).text == \
            local_greedy(llama, PROMPTS[0], 6)
        streamed = "".join(m.stream("chat", PROMPTS[0], max_new_tokens=6, ignore_eos=True))
        assert streamed == local_greedy(qwen, PROMPTS[0], 6)
        assert m.loaded() == ["chat"]  # max_models=1: the older one was evicted
        info = {i["key"]: i for i in m.list()}
        assert info["chat@10"]["loaded"] and info["chat@10"]["memory"]["weights_bytes"] > 0
        assert info["chat@9"]["format"] == "onnx" and info["chat@9"]["parameters"] > 0
        assert info["tiny-llama@1"]["validation"]["status"] == "passed"
        m.unload("chat")
        assert m.loaded() == []
    finally:
        m.close()
    restored = ModelManager(registry_path=path)
    try:
        assert [e.key for e in restored.entries.values()] == ["chat@9", "chat@10", "tiny-llama@1"]
        restored.unregister("chat@9")
    finally:
        restored.close()
    assert [r["version"] for r in json.loads(path.read_text())["models"]] == ["10", "1"]


def gated_registry(artifact, **kw):
    """A ModelRegistry over `artifact` whose (real) loads wait for `.gate`; `.models` lists what they loaded."""
    from inferneo_runtime.registry import ArtifactSource, ModelRegistry

    gate, models = threading.Event(), []

    def load(root, **options):
        gate.wait(60)
        models.append(inferneo_runtime.load(root, **options))
        return models[-1]

    registry = ModelRegistry([ArtifactSource(str(artifact), "onnx")], loader=load, **kw)
    registry.gate, registry.models = gate, models
    return registry


def acquire_in_thread(registry, name: str) -> tuple[threading.Thread, list]:
    """registry.acquire(name) on a thread; the list gets its lease or its error."""
    out: list = []

    def run():
        try:
            out.append(registry.acquire(name))
        except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
            out.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def wait_for(condition) -> None:
    for _ in range(6000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_a_load_that_fails_half_way_fails_each_request_waiting_on_it_once(llama):
    """Two requests for a model that loads and then fails (its draft model does not exist): it is loaded once,
    closed again, and both requests get that error; the next request tries again."""
    from inferneo_runtime.errors import RequestError

    registry = gated_registry(llama, engine_options={"speculative": "draft:no-such-target"})
    try:
        first, first_out = acquire_in_thread(registry, "tiny-llama")
        wait_for(lambda: registry.entry("tiny-llama").state == "loading")
        second, second_out = acquire_in_thread(registry, "tiny-llama")
        wait_for(lambda: registry._cond._waiters)  # the second request waits on the first one's load
        registry.gate.set()
        first.join(60), second.join(60)
        assert isinstance(first_out[0], RequestError) and "no-such-target" in str(first_out[0])
        assert second_out == first_out
        assert len(registry.models) == 1 and not registry.models[0].backend._loaded  # loaded once, released
        assert registry.entry("tiny-llama").state == "unloaded" and registry.memory_used() == 0
        with pytest.raises(RequestError, match="no-such-target"):
            registry.acquire("tiny-llama")  # a later request loads again
        assert len(registry.models) == 2 and not registry.models[1].backend._loaded
    finally:
        registry.close()


def test_a_load_finishing_after_close_is_released(llama):
    from inferneo_runtime.registry import CapacityError

    registry = gated_registry(llama)
    thread, out = acquire_in_thread(registry, "tiny-llama")
    wait_for(lambda: registry.entry("tiny-llama").state == "loading")
    registry.close()
    registry.gate.set()
    thread.join(60)
    assert isinstance(out[0], CapacityError) and "shutting down" in str(out[0])
    assert not registry.models[0].backend._loaded and registry.loaded() == [] and registry.memory_used() == 0
    registry.close()  # a second close is a no-op


def test_idle_models_are_evicted_when_a_load_brings_a_draft_model_past_the_budget(llama, qwen):
    """The budget makes room for a model's weights; its draft model (speculative "draft": here the artifact's
    torchscript target) loads with it, and an idle model that no longer fits beside both goes."""
    from inferneo_runtime import preflight
    from inferneo_runtime.registry import ArtifactSource, ModelRegistry

    registry = ModelRegistry([ArtifactSource(str(llama), "onnx"), ArtifactSource(str(qwen), "onnx")],
                             engine_options={"speculative": "draft:torchscript"})
    try:
        llama_e, qwen_e = registry.entry("tiny-llama"), registry.entry("tiny-qwen2")
        drafts = {e.name: preflight.weights_bytes(e.resolved.manifest.targets["torchscript"])
                  for e in (llama_e, qwen_e)}
        # room for llama with its draft and qwen's weights: the budget lets qwen load without evicting llama
        registry.memory_budget_bytes = llama_e.weight_bytes + drafts["tiny-llama"] + qwen_e.weight_bytes
        registry.load("tiny-llama")
        assert registry.memory_used() == llama_e.weight_bytes + drafts["tiny-llama"]
        registry.load("tiny-qwen2")
        assert registry.loaded() == ["tiny-qwen2"] and llama_e.evictions == 1
        assert registry.memory_used() == qwen_e.weight_bytes + drafts["tiny-qwen2"] <= registry.memory_budget_bytes
    finally:
        registry.close()


# -- routing and A/B tests ----------------------------------------------------------------------------------------
def test_ab_split_is_binomial_and_sticky_per_id():
    from inferneo_runtime.server.routing import RouteContext, Router

    router = Router()
    router.add_ab_test("compare", "model-a", "model-b", traffic_split=0.3, sticky="request_id")
    ids = [f"req-{i}" for i in range(1000)]
    arms = {i: router.route("compare", RouteContext(headers={"x-request-id": i}), []).arm for i in ids}
    b = sum(a == "b" for a in arms.values())
    sd = math.sqrt(1000 * 0.3 * 0.7)
    assert abs(b - 300) <= 4 * sd, b  # within 4 standard deviations of the binomial mean
    for i in ids[:200]:  # sticky: the same id lands on the same arm every time
        assert router.route("compare", RouteContext(headers={"x-request-id": i}), []).arm == arms[i]
    user = router.route("compare", RouteContext(user="alice"), [])  # sticky user (the default key order)
    assert all(router.route("compare", RouteContext(user="alice"), []).arm == user.arm for _ in range(20))


def test_routing_rules_and_ab_tests_from_the_config_file_and_the_api(llama, qwen, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(f"""
models: [{llama}, {qwen}]
routing:
  default_model: tiny-llama
  rules:
    - {{name: code, condition: "prompt contains 'code'", model: tiny-qwen2, priority: 10}}
  ab_tests:
    - {{name: compare, model_a: tiny-llama, model_b: tiny-qwen2, traffic_split: 0.5, sticky: user}}
""")
    with serve_cli(["--config", str(config), "--log-level", "warning"], tmp_path) as s:
        assert greedy(s.url, None, "write some CODE please")[1] == "tiny-qwen2@1"  # the rule, case-insensitive
        assert greedy(s.url, None, "hello there")[1] == "tiny-llama@1"  # no match: the default model
        assert greedy(s.url, "auto", "hello there")[1] == "tiny-llama@1"
        assert greedy(s.url, "tiny-llama", "write code")[1] == "tiny-llama@1"  # an explicit name bypasses routing
        c = InferneoClient(s.url)
        c.routing.add_rule("team", "header x-team == 'ml'", "tiny-qwen2", priority=5)
        assert greedy(s.url, None, "hello", headers={"X-Team": "ml"})[1] == "tiny-qwen2@1"
        assert greedy(s.url, None, "hello", headers={"X-Team": "web"})[1] == "tiny-llama@1"
        # the A/B test by name: each user sticks to an arm; the arms are counted
        seen = {}
        for user in [f"user-{i}" for i in range(12)] * 2:
            r = httpx.post(f"{s.url}/v1/completions", json={"model": "compare", "prompt": "hi", "max_tokens": 2,
                                                            "user": user}, timeout=60)
            assert r.status_code == 200
            assert seen.setdefault(user, r.json()["model"]) == r.json()["model"]
        assert set(seen.values()) == {"tiny-llama", "tiny-qwen2"}
        arms = c.routing.ab_test("compare").arms
        assert arms.a.requests + arms.b.requests == 24 and arms.a.errors == arms.b.errors == 0
        assert arms.a.mean_latency_s > 0 and arms.b.completion_tokens > 0
        assert 'inferneo_ab_requests_total{arm="b",model="tiny-qwen2",status="200",test="compare"}' in \
            httpx.get(f"{s.url}/metrics").text
        rules = c.routing.get().rules
        assert [(r.name, r.hits) for r in rules] == [("code", 1), ("team", 1)]
        c.routing.delete_rule("team")
        assert greedy(s.url, None, "hello", headers={"X-Team": "ml"})[1] == "tiny-llama@1"

        # an A/B test added at run time, as a rule's target; a `user ==` rule of higher priority wins over it
        c.routing.add_ab_test("canary", "tiny-llama", "tiny-qwen2", traffic_split=0.5)
        c.routing.add_rule("beta", "prompt contains 'beta'", "canary", priority=1)
        c.routing.add_rule("bob", "user == 'bob'", "tiny-llama", priority=20)
        # without `user`, the X-User-ID header is the sticky key: the same id, the same arm; ids spread over both
        arm_of = {}
        for uid in [f"id-{i}" for i in range(12)] * 2:
            model = greedy(s.url, None, "beta test", headers={"X-User-ID": uid})[1]
            assert arm_of.setdefault(uid, model) == model
        assert set(arm_of.values()) == {"tiny-llama@1", "tiny-qwen2@1"}
        assert c.routing.ab_test("canary").arms.a.requests + c.routing.ab_test("canary").arms.b.requests == 24
        qwen_id = next(uid for uid, m in arm_of.items() if m == "tiny-qwen2@1")
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "beta code", "max_tokens": 2, "user": "bob"},
                       headers={"X-User-ID": qwen_id}, timeout=60)
        assert r.status_code == 200 and r.headers["x-inferneo-model"] == "tiny-llama@1"  # rule `bob` (priority 20)


def test_settings_from_the_environment_and_the_management_api_switched_off(llama, qwen, tmp_path):
    # INFERNEO_<SETTING> variables configure a server with no flags at all: two models, no management API
    port = free_port()
    env = {"INFERNEO_MODELS": f"{llama},{qwen}", "INFERNEO_ADMIN_API": "false", "INFERNEO_PORT": str(port),
           "INFERNEO_LOG_LEVEL": "warning"}
    with serve_subprocess([], tmp_path, port, env=env, timeout=300) as s:
        listed = httpx.get(f"{s.url}/v1/models", timeout=30).json()["data"]
        assert {m["id"] for m in listed} >= {"tiny-llama", "tiny-qwen2"}
        assert greedy(s.url, "tiny-qwen2", "hello")[1] == "tiny-qwen2@1"
        for method, path, body in [("POST", "/v1/models", {"path": str(llama)}), ("GET", "/v1/routing", None),
                                   ("POST", "/v1/models/tiny-llama/unload", {})]:
            r = httpx.request(method, f"{s.url}{path}", json=body, timeout=30)
            assert r.status_code == 404 and "admin_api: false" in r.text, (path, r.status_code, r.text)
        assert greedy(s.url, "tiny-llama", "hello")[1] == "tiny-llama@1"  # nothing was unloaded


# -- custom model classes ---------------------------------------------------------------------------------------
ECHO = '''
from inferneo_runtime.models import CustomModel

class Echo(CustomModel):
    model_name = "echo"

    def load(self):
        self.prefix = "echo: "

    def generate(self, prompt, params):
        return (self.prefix + prompt)[: params.max_new_tokens]

    def stream(self, prompt, params):
        text = self.generate(prompt, params)
        for i in range(0, len(text), 3):
            yield text[i:i + 3]
'''


def test_custom_model_class_is_served_like_a_backend(tmp_path):
    (tmp_path / "my_models.py").write_text(ECHO)
    with serve_cli(["--model-class", "my_models:Echo", "--log-level", "warning"], tmp_path) as s:
        c = InferneoClient(s.url)
        assert [m.id for m in c.models.list().data] == ["echo"]
        info = c.models.get("echo")
        assert info.format == "custom" and info.model_class == "my_models:Echo" and info.loaded
        out = c.completions.create(model="echo", prompt="hello world", max_tokens=40)
        assert out.choices[0].text == "echo: hello world" and out.choices[0].finish_reason == "stop"
        chunks = list(c.completions.create(prompt="hello world", max_tokens=40, stream=True))  # routed: the only model
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == "echo: hello world"
        chat = c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=40)
        assert chat.choices[0].message.content == "echo: user: hi\nassistant:"


# -- an encoder beside a generation model ----------------------------------------------------------------------
def test_metrics_answer_with_an_embedding_model_loaded(llama, tmp_path_factory, tmp_path):
    """An encoder's driver runs no sequences: /metrics still answers (200) once it is loaded, reporting 0 sequences
    in flight for it beside the generation model's gauges."""
    from test_encoders import encoder_recipe, make_tiny_bert

    from inferneo_build import build

    bert = build(encoder_recipe({"path": str(make_tiny_bert(tmp_path_factory.mktemp("bert") / "ckpt"))},
                                tmp_path_factory.mktemp("bert-art") / "tiny-bert", targets=[{"format": "onnx"}]))
    with serve_cli(["--model", str(llama), "--model", str(bert.output), "--log-level", "warning"], tmp_path) as s:
        r = httpx.post(f"{s.url}/v1/embeddings", json={"model": "tiny-bert", "input": "hello"}, timeout=60)
        assert r.status_code == 200, r.text
        assert greedy(s.url, "tiny-llama", "hello")[1] == "tiny-llama@1"
        r = httpx.get(f"{s.url}/metrics", timeout=30)
        assert r.status_code == 200, r.text
        assert 'inferneo_model_loaded{model="tiny-bert"} 1.0' in r.text
        assert 'inferneo_sequences_in_flight{model="tiny-bert"} 0.0' in r.text
        assert 'inferneo_sequences_in_flight{model="tiny-llama"} 0.0' in r.text
