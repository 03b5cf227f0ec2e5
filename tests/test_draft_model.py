"""Speculative decoding with a draft model: an artifact's int8 target drafts for its fp32 one. Greedy output stays
token-identical, the drafter's own cache reproduces the draft model's greedy tokens however drafts were rejected,
sampled output keeps the target's distribution, and the feature reaches the API, the CLI, the server and bench."""
from __future__ import annotations

import json
import queue
import shutil

import numpy as np
import pytest

import inferneo_runtime
from conftest import PROMPTS, run_cli, tiny_recipe_fields
from inferneo_runtime import RequestError, SamplingParams
from inferneo_runtime.generation import Engine, generate_ids
from inferneo_runtime.speculative import ModelDrafter, SpeculationStats, SpeculativeConfig
from inferneo_runtime.speculative import speculative_config as resolve
from test_sampling import CHI2_999

LENIENT = {"top1_agreement": 0.3, "mean_kl": 0.5, "perplexity_delta": 0.5}
DRAFT = {"method": "draft", "draft": "onnx-int8"}


@pytest.fixture(scope="module")
def draft_artifact(tiny_checkpoint, tmp_path_factory):
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    out = tmp_path_factory.mktemp("draft") / "tiny-draft"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "tiny-draft", out, targets=())
    fields["targets"] = [{"format": "onnx"}, {"format": "onnx", "precision": "int8", "tolerance": LENIENT}]
    return build(Recipe.model_validate(fields)).output


@pytest.fixture(scope="module")
def model(draft_artifact):
    with inferneo_runtime.load(draft_artifact, target="onnx") as m:
        yield m


def _run(model, ids, params, **spec):
    stats = SpeculationStats()
    out = generate_ids(model.backend, ids, params, model.eos_ids, tokenizer=model.tokenizer,
                       speculative=SpeculativeConfig(**{**DRAFT, **spec}), spec_stats=stats,
                       draft_backend=model.draft_backend)
    return out, stats


# -- the drafter -----------------------------------------------------------------------------------------------
def test_the_drafter_proposes_the_draft_models_greedy_tokens_across_rejections(model):
    draft = model.draft_backend("onnx-int8")
    assert model.draft_backend("onnx-int8") is draft  # loaded once, shared

    def greedy(ctx, k):  # the draft model's own greedy continuation, from an empty cache
        return generate_ids(draft, [ctx], SamplingParams(max_new_tokens=k, ignore_eos=True))[0].token_ids

    d = ModelDrafter(draft, vocab=model.backend.dims.vocab)
    ctx = model.tokenizer.encode(PROMPTS[2])
    first = d.propose(ctx, 4)
    assert first == (greedy(ctx, 4), None)
    # the target kept two drafts, then chose another token: the cache's third draft position is overwritten
    ctx = ctx + first[0][:2] + [(first[0][2] + 1) % 300]
    assert d.propose(ctx, 3)[0] == greedy(ctx, 3)
    # every draft kept, and one more token
    ctx = ctx + d.propose(ctx, 5)[0] + [7]
    assert d.propose(ctx, 2)[0] == greedy(ctx, 2)
    # a sequence that shares only the first token with the cache, then a long one
    other = ctx[:1] + model.tokenizer.encode(PROMPTS[0])
    assert d.propose(other, 4)[0] == greedy(other, 4)
    long = (other * 40)[:120]
    assert d.propose(long, 6)[0] == greedy(long, 6)
    # near the draft model's last position it drafts fewer: the cache holds the sequence and all drafts but one
    assert len(d.propose(long[:1] * 126, 6)[0]) == 3
    assert d.propose(long[:1] * 129, 6)[0] == []
    d.close()
    assert d.cache is None and d.cached == []


def test_the_drafter_proposes_only_ids_the_target_has(model):
    d = ModelDrafter(model.draft_backend("onnx-int8"), vocab=40)  # a target whose vocabulary is smaller
    ctx = model.tokenizer.encode(PROMPTS[1])
    proposed = d.propose(ctx, 8)[0]
    assert len(proposed) == 8 and all(t < 40 for t in proposed)
    assert d.propose(ctx + [600], 4)[0] == []  # an id past the draft model's vocabulary: nothing to draft from


# -- greedy output is unchanged --------------------------------------------------------------------------------
def test_greedy_draft_speculation_is_token_identical(model):
    prompts = [PROMPTS[0], PROMPTS[1] + " " + PROMPTS[2], "a b a b a b"]
    drafted = accepted = 0
    for i, p in enumerate(model.tokenizer.encode(p) for p in prompts):
        params = SamplingParams(max_new_tokens=100 - len(p), ignore_eos=True, logprobs=2)
        plain = model.generate_ids([p], params)[0]
        for k in (1, 4, 7):
            spec, stats = _run(model, [p], params, num_tokens=k)
            assert spec[0].token_ids == plain.token_ids, (i, k)
            assert [lp.logprob for lp in spec[0].logprobs] == pytest.approx([lp.logprob for lp in plain.logprobs],
                                                                            abs=1e-4)
            drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert 0 < accepted < drafted  # drafts both kept and rejected


def test_batched_requests_draft_each_with_its_own_cache(model):
    ids = [model.tokenizer.encode(PROMPTS[2]), model.tokenizer.encode(PROMPTS[0])]
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True), SamplingParams(max_new_tokens=50, ignore_eos=True)]
    plain = model.generate_ids(ids, params)
    spec, stats = _run(model, ids, params, num_tokens=4)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert stats.accepted > 0  # (onnx verifies drafts while one request runs: here the longer one's tail)


def test_a_finished_request_gives_its_draft_cache_back(model):
    engine = Engine(model.backend, model.eos_ids, model.tokenizer, speculative=DRAFT,
                    draft_backend=model.draft_backend)
    req = engine.add(model.tokenizer.encode(PROMPTS[0]), SamplingParams(max_new_tokens=20, ignore_eos=True))
    held = []
    while engine.has_work:
        engine.step()
        held.append(req.spec.drafter.cache is not None)
    assert any(held) and not held[-1]
    assert model.memory()["draft_kv_cache_bytes"] == 0


# -- sampling --------------------------------------------------------------------------------------------------
def test_sampled_draft_speculation_is_seeded_and_in_the_vocabulary(model):
    kw = dict(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    a = model.generate(PROMPTS[1], speculative=DRAFT, **kw)
    b = model.generate(PROMPTS[1], speculative="draft:onnx-int8", **kw)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 40
    assert all(0 <= t < model.backend.dims.vocab for t in a.token_ids)


def _top2(logits, temperature=1.0):
    """The target's top-2 distribution at temperature 1, computed here (not by the sampler under test)."""
    top = np.argsort(-logits)[:2]
    p = np.exp((logits[top] - logits[top].max()) / temperature)
    return dict(zip(top.tolist(), (p / p.sum()).tolist()))


def test_sampled_draft_speculation_keeps_the_targets_distribution(model):
    # the second token is drafted (by the int8 model's argmax) and verified: the pair (first, second) must follow
    # p(first) * p(second | first) of the target alone, chi-square as test_sampling does
    prompt = model.tokenizer.encode(PROMPTS[0])

    def last_logits(ids):
        return model.generate_ids([ids], SamplingParams(max_new_tokens=1), keep_logits=True)[0].prompt_logits[-1]

    expected = {(a, b): pa * pb for a, pa in _top2(last_logits(prompt)).items()
                for b, pb in _top2(last_logits(prompt + [a])).items()}
    n, counts, stats = 600, dict.fromkeys(expected, 0), SpeculationStats()
    for seed in range(n):
        params = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=2, seed=seed, ignore_eos=True)
        out = generate_ids(model.backend, [prompt], params, model.eos_ids, speculative=DRAFT, spec_stats=stats,
                           draft_backend=model.draft_backend)[0].token_ids
        counts[tuple(out[:2])] += 1
    assert stats.drafted >= n and 0 < stats.accepted < stats.drafted  # the rule both kept and replaced drafts
    chi2 = sum((counts[k] - n * p) ** 2 / (n * p) for k, p in expected.items())
    assert chi2 < CHI2_999[len(expected) - 1], (counts, expected)


# -- settings ----------------------------------------------------------------------------------------------------
def test_draft_settings_are_checked_and_name_the_bad_value(model, draft_artifact, tmp_path):
    assert resolve("draft:onnx-int4") == SpeculativeConfig(method="draft", draft="onnx-int4")
    assert resolve({"draft": "s3://b/p", "num_tokens": 2}) == SpeculativeConfig("draft", 2, draft="s3://b/p")
    for bad, needle in [("draft", "needs `draft`"), ({"method": "draft", "draft": " "}, "needs `draft`"),
                        ({"method": "ngram", "draft": "onnx-int4"}, "'onnx-int4' is for method 'draft'"),
                        ({"method": "draft", "draft": "onnx-int4", "drafts": 2}, "unknown field.*drafts")]:
        with pytest.raises(RequestError, match=needle):
            resolve(bad)
    with pytest.raises(RequestError, match=r"'onnx-int9' is neither a target of 'tiny-draft' \(it has: onnx, "
                                           r"onnx-int8\) nor an artifact directory"):
        model.generate(PROMPTS[0], max_new_tokens=4, speculative="draft:onnx-int9")
    with pytest.raises(RequestError, match="needs a loaded model"):  # a bare backend cannot load a draft model
        generate_ids(model.backend, [[1, 2]], SamplingParams(max_new_tokens=4), speculative=DRAFT)
    # another artifact drafts when its tokenizer is the same (this one, by path), and is refused when not
    by_path = model.generate(PROMPTS[0], max_new_tokens=8, speculative={"draft": str(draft_artifact)})
    assert by_path.token_ids == model.generate(PROMPTS[0], max_new_tokens=8).token_ids
    other = tmp_path / "other-tokenizer"
    shutil.copytree(draft_artifact, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with inferneo_runtime.load(draft_artifact, target="onnx", verify=False) as m:
        with pytest.raises(RequestError, match="cannot draft for 'tiny-draft': its tokenizer differs"):
            m.generate(PROMPTS[0], max_new_tokens=4, speculative={"draft": str(other)})


# -- exposed: `inferneo generate`, `inferneo serve`, bench -------------------------------------------------------
def test_generate_cli_drafts_with_a_smaller_target(draft_artifact):
    base = ["generate", str(draft_artifact), PROMPTS[2], "--target", "onnx", "--max-new-tokens", "30", "--json"]
    plain = json.loads(run_cli(*base).stdout)
    spec = json.loads(run_cli(*base, "--speculative-model", "onnx-int8").stdout)
    assert spec["token_ids"] == plain["token_ids"] and spec["speculative_accepted"] > 0
    bad = run_cli(*base, "--speculative", "draft")
    assert bad.returncode != 0 and "needs `draft`" in bad.stdout + bad.stderr


def test_server_drafts_with_a_smaller_target_and_reports_it(draft_artifact, model, tmp_path):
    openai = pytest.importorskip("openai")
    from conftest import free_port, serve_subprocess
    from inferneo_runtime.server.config import ConfigError, load_server_config
    from test_speculative import check_speculation_over_http

    with pytest.raises(ConfigError, match="speculative draft needs speculative_model"):
        load_server_config(None, overrides={"speculative": "draft"}, env={})
    prompt = PROMPTS[1] + " " + PROMPTS[2]
    expect = model.generate(prompt, max_new_tokens=24, ignore_eos=True).text
    port = free_port()
    args = [str(draft_artifact), "--port", str(port), "--speculative", "draft",
            "--speculative-model", "onnx-int8", "--speculative-tokens", "3", "--log-level", "warning"]
    with serve_subprocess(args, tmp_path, port) as srv:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        check_speculation_over_http(c, srv.url, "tiny-draft", prompt, expect)


def test_a_servers_memory_budget_counts_the_draft_models_it_loaded(draft_artifact):
    """The draft model's weights and caches are the served model's too: what the budget adds up (and evicts
    by) counts them from the moment the driver loads the draft."""
    from inferneo_runtime import preflight
    from inferneo_runtime.manager import ModelManager
    from inferneo_runtime.registry import ArtifactSource

    sources = [ArtifactSource(str(draft_artifact), "onnx")]
    plain = ModelManager(sources)
    try:
        plain.load("tiny-draft")
        alone = plain.entry("tiny-draft")
        assert alone.draft_bytes == 0 and plain.memory_used() == alone.weight_bytes + alone.cache_bytes
    finally:
        plain.close()
    manager = ModelManager(sources, engine_options={"speculative": SpeculativeConfig(**DRAFT)})
    try:
        with manager.acquire("tiny-draft") as lease:
            entry, model = lease.entry, lease.model
            events, measured = queue.Queue(), []

            def sink(item):  # on the driver thread: the first step's figures against what is alive after the second
                events.put(item)
                if lease.driver.steps == 2 and not measured:  # (two steps give at most 11 of the 24 tokens)
                    info = manager.get("tiny-draft")
                    measured.append((entry.cache_bytes, model.memory(), manager.memory_used(), info))

            ids = model.tokenizer.encode(PROMPTS[0])
            lease.driver.submit(ids, SamplingParams(max_new_tokens=24, ignore_eos=True), sink)
            while getattr(item := events.get(timeout=60), "finish_reason", "error") is None:
                pass
            assert not isinstance(item, BaseException), item
        # mid-request, the request's draft-model cache is the model's KV cache too: in /metrics and the budget
        cache, memory, used, info = measured[0]
        assert memory["draft_kv_cache_bytes"] > 0
        assert cache == memory["kv_cache_bytes"] + memory["draft_kv_cache_bytes"] == info["memory"]["kv_cache_bytes"]
        draft_weights = preflight.weights_bytes(entry.resolved.manifest.targets["onnx-int8"])
        assert entry.draft_bytes == memory["draft_weights_bytes"] == draft_weights > 0
        assert used == entry.weight_bytes + cache + draft_weights
        assert manager.memory_used() == entry.weight_bytes + entry.cache_bytes + entry.draft_bytes
        assert manager.get("tiny-draft")["memory"]["resident_bytes"] == manager.memory_used()
        draft = model.draft_backend("onnx-int8")
    finally:
        manager.close()
    assert manager.memory_used() == 0 and not draft._loaded  # the draft model is released with its model


def test_bench_measures_chat_drafted_by_the_int8_target(model):
    from inferneo_runtime.bench_workloads import draft_target, drafted_chat

    assert draft_target(model.manifest, "onnx") == "onnx-int8" and draft_target(model.manifest, "onnx-int8") is None
    row = drafted_chat(model, n_new=16, runs=1, spec=SpeculativeConfig(num_tokens=4), limit=128, draft="onnx-int8")
    assert row["draft"] == "onnx-int8" and row["identical_tokens"] and row["ratio"] > 0
    assert 0 < row["acceptance_rate"] <= 1
    assert "skipped" in drafted_chat(model, 16, 1, SpeculativeConfig(), 128, None)
