"""The `.pt2` target (torch.export + AOTInductor) built on this host's CPU: validated against transformers,
checksummed, preflighted, and run by the generation loop with continuous batching over the runtime's cache."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import inferneo_runtime
from conftest import PROMPTS, run_cli, tiny_recipe_fields
from inferneo_runtime import SamplingParams, preflight
from inferneo_runtime.manifest import MANIFEST_NAME, read_manifest
from inferneo_runtime.preflight import GPU, Host
from static_decode import assert_padded_batches_leave_other_slots_alone, assert_static_decode_matches

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="AOTInductor needs a C++ compiler (g++) to build the .pt2 target")

# Gemma 2's shape: a sliding window shorter than the tests' sequences, attention and final softcaps, sandwich norms
MODEL_TYPE = "gemma2"


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    out = tmp_path_factory.mktemp("pt2") / "tiny-pt2"
    fields = tiny_recipe_fields(tiny_checkpoint(MODEL_TYPE), "tiny-pt2", out, targets=("torchscript", "pt2"))
    return build(Recipe.model_validate(fields)).output


def test_pt2_target_is_validated_and_described(artifact):
    m = read_manifest(artifact)
    entry = m.targets["pt2"]
    assert entry.status == "valid" and entry.validation.status == "passed"
    assert [f.path for f in entry.files] == ["pt2/model.pt2"]
    assert entry.io.kv_layout == "stacked"
    assert entry.io.inputs[3].shape[2] == "slots" and entry.io.inputs[3].shape[4] == "capacity"
    assert [t.name for t in entry.io.inputs][-1] == "slot_offset"
    assert [t.name for t in entry.io.outputs] == ["logits", "kv_new"]
    assert entry.toolchain["torch"] == torch.__version__ and entry.toolchain["device"] == "cpu"
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    assert entry.compatibility == {"device": "cpu", **({"cpu_isa": str(pick_vec_isa())} if str(pick_vec_isa()) else {})}
    # validation compared every step's logits with transformers'; the report records how close they were
    report = json.loads((artifact / "validation.json").read_text())
    pt2 = next(t for t in report["targets"] if t["target"] == "pt2")
    assert pt2["passed"] and entry.validation.token_match and 0 < pt2["max_abs_logits_error"] < 1e-3
    r = run_cli("validate", str(artifact), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"]


def test_pt2_generates_the_goldens_alone_and_in_a_running_batch(artifact):
    m = read_manifest(artifact)
    with inferneo_runtime.load(artifact, target="pt2") as model, \
            inferneo_runtime.load(artifact, target="torchscript") as traced:
        for golden in m.goldens:  # transformers' greedy tokens, recorded at build time
            out = model.generate_ids([golden.prompt_ids], SamplingParams(max_new_tokens=len(golden.tokens),
                                                                          ignore_eos=True))[0]
            assert out.token_ids == golden.tokens
        # more requests than max_batch (4), of different lengths: requests join and leave a running batch, so the
        # compiled graph runs on slot ranges that start past 0 of a bigger cache, which must not disturb the rest
        prompts = [PROMPTS[i % 3] + " y" * i for i in range(7)]
        params = [SamplingParams(max_new_tokens=4 + 3 * i, ignore_eos=True) for i in range(7)]
        ids = [model.tokenizer.encode(p) for p in prompts]
        together = model.generate_ids(ids, params)
        for i in range(7):
            alone = model.generate_ids([ids[i]], params[i])[0].token_ids
            assert together[i].token_ids == alone
        # the same decoder traced by TorchScript gives the same tokens
        assert [o.token_ids for o in traced.generate_ids(ids, params)] == [o.token_ids for o in together]


def test_pt2_static_decode_step_gives_the_per_length_steps_tokens_and_logits(artifact):
    """The step a CUDA graph replays, uncaptured: the .pt2 graph takes a mask over the whole cache capacity
    (the step's own positions masked as stale) and the backend writes the step's keys and values after it."""
    with inferneo_runtime.load(artifact, target="pt2") as model:
        ids = [model.tokenizer.encode(p) for p in PROMPTS]
        assert_static_decode_matches(model.backend, ids, [10, 100, 30])
        # the step's keys and values are written at the rows' positions: a padding row's at its slot's last one
        assert_padded_batches_leave_other_slots_alone(model.backend, [*ids, ids[2][::-1]])


def test_pt2_graph_reads_the_cache_and_returns_the_steps_keys_and_values(artifact):
    # A compiled graph that wrote the cache itself copied every layer's whole cache per call (an in-place write
    # to a view of an input is functionalized). The contract: the whole cache goes in untouched, the call's
    # slots picked by slot_offset's length; the step's keys/values come back for the runtime to write, and are
    # what the TorchScript decoder writes there.
    m = read_manifest(artifact)
    package = torch._inductor.aoti_load_package(str(artifact / m.targets["pt2"].files[0].path))
    traced = torch.jit.load(str(artifact / m.targets["torchscript"].files[0].path))
    cache_spec = m.targets["pt2"].io.inputs[3]
    layers, kv_heads, head_dim = cache_spec.shape[0], cache_spec.shape[3], cache_spec.shape[5]
    slots, first, n, steps, past, capacity = 6, 3, 2, 3, 5, 16
    torch.manual_seed(0)
    cache = torch.randn(layers, 2, slots, kv_heads, capacity, head_dim)  # stale values everywhere, as when reused
    before = cache.clone()
    ids = torch.randint(0, 100, (n, steps))
    positions = past + torch.arange(steps).expand(n, steps)
    mask = torch.ones(n, past + steps, dtype=torch.int64)
    picked = torch.arange(steps)
    with torch.inference_mode():
        logits, kv_new = package(ids, positions, mask, cache, picked, torch.empty(first + 2, dtype=torch.uint8))
        ours = before[:, :, first:first + n].clone()
        want_logits, written = traced(ids, positions, mask, ours, picked)
    assert torch.equal(cache, before)
    assert kv_new.shape == (layers, 2, n, kv_heads, steps, head_dim)
    torch.testing.assert_close(kv_new, written[..., past:past + steps, :], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)


def test_a_pt2_package_that_writes_its_cache_is_refused_with_rebuild(artifact, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    io = raw["targets"]["pt2"]["io"]
    io["kv_layout"], io["inputs"] = "slot_major", io["inputs"][:-1]
    (copy / MANIFEST_NAME).write_text(json.dumps(raw, indent=2))
    with pytest.raises(Exception, match=r"slot_major.*rebuild it"):
        inferneo_runtime.load(copy, target="pt2")


def test_pt2_logprobs_agree_with_torchscript(artifact):
    prompt = PROMPTS[0]
    with inferneo_runtime.load(artifact, target="pt2") as model, \
            inferneo_runtime.load(artifact, target="torchscript") as traced:
        a = model.generate(prompt, max_new_tokens=8, logprobs=3)
        b = traced.generate(prompt, max_new_tokens=8, logprobs=3)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose([t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs], atol=1e-4)


def test_preflight_refuses_a_pt2_target_on_another_device_or_torch(artifact, tmp_path):
    m = read_manifest(artifact)
    cuda_host = Host(versions={"torch": torch.__version__}, torch_cuda=True,
                     gpus=[GPU(0, "NVIDIA H100 80GB HBM3", "9.0", total_bytes=80 * 10**9, free_bytes=70 * 10**9)],
                     available_memory=16 * 10**9)
    v = preflight.check(m, "pt2", "cuda", cuda_host)
    assert not v.ok
    assert any(p.check == "device" and "compiled for cpu" in p.message for p in v.errors)
    assert preflight.check(m, "pt2", "cpu", Host(versions={"torch": torch.__version__})).ok

    # compiled CPU kernels need the vector ISA they were compiled for: a CPU without it is refused, not crashed
    isa = m.targets["pt2"].compatibility.get("cpu_isa")
    if isa:
        v = preflight.check(m, "pt2", "cpu", Host(versions={"torch": torch.__version__}, cpu_flags={"sse2", "sse4_2"}))
        message = next(f.message for f in v.errors if f.check == "cpu_isa")
        assert f"compiled for {isa}" in message and "illegal instruction" in message

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    other = f"{major}.{minor + 1}.0"
    v = preflight.check(m, "pt2", "cpu", Host(versions={"torch": other}))
    assert not v.ok
    message = next(p.message for p in v.errors if p.check == "torch_version")
    assert torch.__version__ in message and other in message

    # the loader is refused before it touches the package, and says why
    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    raw["targets"]["pt2"]["toolchain"]["torch"] = "2.1.0"
    (copy / MANIFEST_NAME).write_text(json.dumps(raw, indent=2))
    with pytest.raises(Exception, match=r"compiled by torch 2\.1\.0"):
        inferneo_runtime.load(copy, target="pt2")


def test_pt2_recipe_errors_name_the_field(tiny_checkpoint, tmp_path):
    from pydantic import ValidationError

    from inferneo_build.recipe import Recipe

    fields = tiny_recipe_fields(tiny_checkpoint(MODEL_TYPE), "bad", tmp_path / "out", targets=())
    fields["targets"] = [{"format": "pt2", "device": "tpu"}]
    with pytest.raises(ValidationError, match="device"):
        Recipe.model_validate(fields)
    fields["targets"] = [{"format": "pt2", "precision": "int4"}]
    with pytest.raises(ValidationError, match="precision"):
        Recipe.model_validate(fields)
