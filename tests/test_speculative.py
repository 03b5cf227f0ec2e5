"""Speculative decoding: the rejection rule keeps the sampler's distribution (chi-square, as test_sampling does),
n-gram drafting and back-off, and on real backends greedy output token-identical to plain decoding."""
from __future__ import annotations

import numpy as np
import pytest

import inferneo_runtime
from conftest import PROMPTS
from inferneo_runtime import RequestError, SamplingParams
from inferneo_runtime.sampling import verify_draft
from inferneo_runtime.speculative import NgramDrafter, SpeculationState, SpeculationStats, SpeculativeConfig
from inferneo_runtime.speculative import speculative_config as resolve
from test_sampling import CHI2_999, LOGITS, _expected

TARGETS = ["onnx", "torchscript"]


# -- the rejection rule on fixed logits ------------------------------------------------------------------------
def _draw_verified(params, draft_of, n=20000, seed=99):
    """Counts of the token verify_draft emits; draft_of(rng) -> (draft token, drafter probs or None)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(LOGITS))
    for _ in range(n):
        draft, q = draft_of(rng)
        counts[verify_draft(LOGITS, params, rng, [], [], draft, q)] += 1
    return counts


def _chi2(counts, expected):
    support = expected > 0
    assert counts[~support].sum() == 0, "a filtered-out token was emitted"
    return float((((counts - expected) ** 2)[support] / expected[support]).sum()), int(support.sum()) - 1


Q = np.array([0.05, 0.4, 0.05, 0.3, 0.15, 0.05])  # a drafter's distribution, far from the target's


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_k=3)])
@pytest.mark.parametrize("drafter", ["likely", "unlikely", "filtered", "distribution"])
def test_rejection_rule_keeps_the_samplers_distribution(kw, drafter):
    n = 20000
    draft_of = {
        "likely": lambda rng: (0, None),  # an n-gram draft of the most likely token
        "unlikely": lambda rng: (3, None),
        "filtered": lambda rng: (5, None),  # a token top-k/top-p remove: must never be emitted
        "distribution": lambda rng: (int(rng.choice(len(Q), p=Q)), Q),  # a draft model's sample and its q
    }[drafter]
    counts = _draw_verified(SamplingParams(**kw), draft_of, n)
    chi2, dof = _chi2(counts, _expected(**kw) * n)
    assert chi2 < CHI2_999[dof], (chi2, counts)


def test_a_biased_verifier_would_fail_the_check():
    # always keeping the n-gram draft would emit token 3 every time: far off the target distribution
    n = 20000
    counts = np.zeros(len(LOGITS))
    counts[3] = n
    chi2, dof = _chi2(counts, _expected(1.0) * n)
    assert chi2 > CHI2_999[dof]


def test_greedy_verification_keeps_only_the_argmax():
    rng = np.random.default_rng(0)
    greedy = SamplingParams()
    assert verify_draft(LOGITS, greedy, rng, [], [], 0) == 0
    assert verify_draft(LOGITS, greedy, rng, [], [], 2) == 0
    assert verify_draft(LOGITS, greedy, rng, [], [], 1, banned=[0]) == 1  # banned ids apply to verification too


# -- drafting and back-off --------------------------------------------------------------------------------------
def test_ngram_drafter_proposes_what_followed_the_latest_match():
    d = NgramDrafter(max_ngram=3, min_ngram=1)
    assert d.propose([1, 2, 3, 4, 5, 9, 2, 3], 3)[0] == [4, 5, 9]  # "2 3" matched, then 4 5 9 followed
    assert d.propose([7, 1, 2, 8, 1, 2, 6, 0, 1, 2], 2)[0] == [6, 0]  # latest of two matches
    assert d.propose([1, 2, 3], 4)[0] == []  # nothing repeats
    assert d.propose([5, 5], 4)[0] == [5]
    assert NgramDrafter(3, 2).propose([4, 1, 9, 1], 2)[0] == []  # a 1-gram match is below min_ngram


def test_back_off_after_rejections_and_widening_after_acceptance():
    s = SpeculationState(SpeculativeConfig(num_tokens=4))
    tokens = [1, 2, 3, 1, 2]
    assert s.draft(tokens, room=10)[0] == [3, 1, 2]
    s.update(proposed=3, kept=1)
    assert s.width == 2 and s.draft(tokens, room=10)[0] == [3, 1]
    s.update(proposed=2, kept=0)  # a full rejection: skip a step
    assert s.draft(tokens, room=10)[0] == [] and s.draft(tokens, room=10)[0] == [3]
    s.update(proposed=1, kept=0)  # again: skip three steps
    assert [s.draft(tokens, room=10)[0] for _ in range(4)] == [[], [], [], [3]]
    s.update(proposed=1, kept=1)
    s.update(proposed=2, kept=2)
    assert s.width == 3 and s.draft(tokens, room=2)[0] == [3, 1]  # never beyond the request's room


def test_speculative_settings_are_checked():
    assert resolve(None) is None and resolve(0) is None and resolve("off") is None
    assert resolve("ngram") == SpeculativeConfig() and resolve(6).num_tokens == 6
    assert resolve({"num_tokens": 2, "max_ngram": 4}) == SpeculativeConfig(num_tokens=2, max_ngram=4)
    for bad, needle in [("draft-model", "method"), (99, "num_tokens"), ({"k": 2}, "unknown"),
                        ({"min_ngram": 3, "max_ngram": 2}, "min_ngram")]:
        with pytest.raises(RequestError, match=needle):
            resolve(bad)


# -- on real backends: token-identical greedy output ----------------------------------------------------------
@pytest.fixture(scope="module", params=TARGETS)
def model(request, tiny_artifact):
    with inferneo_runtime.load(tiny_artifact("llama"), target=request.param) as m:
        yield m


def _spec_run(model, ids, params, **spec):
    stats = SpeculationStats()
    out = inferneo_runtime.generation.generate_ids(model.backend, ids, params, model.eos_ids, tokenizer=model.tokenizer,
                                                   speculative=SpeculativeConfig(**spec), spec_stats=stats)
    return out, stats


def test_greedy_speculation_is_token_identical(model):
    # long runs up to the artifact's max_sequence (128), across cache growth; prompts repeat themselves so
    # n-gram drafts are both kept and rejected
    prompts = [PROMPTS[0] + " " + PROMPTS[0], PROMPTS[2], "a b a b a b"]
    ids = [model.tokenizer.encode(p) for p in prompts]
    drafted = accepted = 0
    for i, p in enumerate(ids):
        params = SamplingParams(max_new_tokens=110 - len(p), ignore_eos=True, logprobs=2)
        plain = model.generate_ids([p], params)[0]
        for k in (1, 4, 7):
            spec, stats = _spec_run(model, [p], params, num_tokens=k)
            assert spec[0].token_ids == plain.token_ids, (i, k)
            assert [lp.token_id for lp in spec[0].logprobs] == plain.token_ids
            assert [lp.logprob for lp in spec[0].logprobs] == pytest.approx([lp.logprob for lp in plain.logprobs], abs=1e-4)
            drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert 0 < accepted < drafted  # both paths ran: kept drafts and rejected ones


def test_speculation_honours_stops_and_penalties(model):
    p = model.tokenizer.encode(PROMPTS[0] + " " + PROMPTS[0])
    plain = model.generate_ids([p], SamplingParams(max_new_tokens=40, ignore_eos=True))[0].token_ids
    stop = plain[len(plain) // 2]
    for params in [SamplingParams(max_new_tokens=40, stop_token_ids=[stop]),
                   SamplingParams(max_new_tokens=40, stop_token_ids=[stop], min_new_tokens=len(plain) // 2 + 2),
                   SamplingParams(max_new_tokens=40, repetition_penalty=1.3, frequency_penalty=0.5, ignore_eos=True),
                   SamplingParams(max_new_tokens=9, ignore_eos=True)]:
        expect = model.generate_ids([p], params)[0]
        got = _spec_run(model, [p], params, num_tokens=5)[0][0]
        assert (got.token_ids, got.finish_reason) == (expect.token_ids, expect.finish_reason), params


def test_batched_requests_speculate_independently(model):
    prompts = [PROMPTS[i % 3] + " " + PROMPTS[i % 3] + " x" * i for i in range(6)]
    ids = [model.tokenizer.encode(p) for p in prompts]
    params = [SamplingParams(max_new_tokens=20 + 7 * i, ignore_eos=True) for i in range(6)]
    plain = model.generate_ids(ids, params)
    spec, stats = _spec_run(model, ids, params, num_tokens=4)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert stats.accepted > 0  # (onnx verifies drafts only while one request runs: the batch's tail)


def test_batched_drafts_beside_a_request_at_the_context_limit(model):
    """A step pads every row to the widest draft: the padding of a row near the artifact's max_sequence must not
    run past the cache (it failed the whole batch with 'exceeds the artifact's max_sequence')."""
    limit = model.backend.target.shapes.max_sequence
    full = (model.tokenizer.encode(PROMPTS[2]) * 20)[:100]
    echo = model.tokenizer.encode("a b a b a b a b a b")
    params = [SamplingParams(max_new_tokens=limit - len(full), ignore_eos=True, speculative_tokens=0),
              SamplingParams(max_new_tokens=60, ignore_eos=True, speculative_tokens=4)]
    plain = model.generate_ids([full, echo], params)
    stats = SpeculationStats()
    got = inferneo_runtime.generation.generate_ids(model.backend, [full, echo], params, model.eos_ids,
                                                   tokenizer=model.tokenizer, spec_stats=stats)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert [len(o.token_ids) for o in got] == [limit - len(full), 60] and stats.accepted > 0


def test_sampled_speculation_is_seeded_and_reaches_the_api(model):
    kw = dict(max_new_tokens=30, temperature=0.8, seed=4, ignore_eos=True)
    a = model.generate(PROMPTS[0] + " " + PROMPTS[0], speculative="ngram", **kw)
    b = model.generate(PROMPTS[0] + " " + PROMPTS[0], speculative=SpeculativeConfig(num_tokens=4), **kw)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 30
    assert model.spec_stats.drafted > 0
    greedy = model.generate(PROMPTS[1], max_new_tokens=20, ignore_eos=True)
    assert model.generate(PROMPTS[1], max_new_tokens=20, ignore_eos=True, speculative=3).token_ids == greedy.token_ids
    streamed = "".join(model.stream(PROMPTS[1], max_new_tokens=20, ignore_eos=True, speculative="ngram"))
    assert streamed == greedy.text


# -- exposed: `inferneo generate` and `inferneo serve` -----------------------------------------------------------
def test_generate_cli_speculates_with_the_same_tokens(tiny_artifact):
    import json

    from conftest import run_cli

    base = ["generate", str(tiny_artifact("llama")), PROMPTS[0] + " " + PROMPTS[0], "--max-new-tokens", "30", "--json"]
    plain = json.loads(run_cli(*base).stdout)
    spec = json.loads(run_cli(*base, "--speculative", "ngram", "--speculative-tokens", "5").stdout)
    assert spec["token_ids"] == plain["token_ids"] and spec["speculative_drafted"] > 0
    bad = run_cli(*base, "--speculative", "medusa")
    assert bad.returncode != 0 and "medusa" in bad.stdout + bad.stderr


def check_speculation_over_http(client, url: str, model: str, prompt: str, expect: str) -> float:
    """A server speculating by default answers `expect` with speculation as set, turned off by the request
    (speculative_tokens 0) and widened by it (6), and its /metrics count what was drafted and kept. Returns the
    drafted tokens."""
    from test_server import metric

    texts = [client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True, **extra}).choices[0].text
             for extra in ({}, {"speculative_tokens": 0}, {"speculative_tokens": 6})]
    assert texts == [expect] * 3
    drafted = metric(url, "inferneo_spec_draft_tokens_total", model=model)
    accepted = metric(url, "inferneo_spec_accepted_tokens_total", model=model)
    assert drafted > 0 and 0 < accepted <= drafted
    assert metric(url, "inferneo_spec_acceptance_rate", model=model) == pytest.approx(accepted / drafted)
    return drafted


def test_server_speculates_caches_prefixes_and_reports_it(tiny_artifact, tmp_path):
    openai = pytest.importorskip("openai")
    from conftest import free_port, serve_subprocess
    from test_server import metric

    art = tiny_artifact("llama")
    prompt = PROMPTS[1] + " " + PROMPTS[2] + " " + PROMPTS[2]  # 23 tokens: a whole 16-token block to cache
    with inferneo_runtime.load(art) as local:
        expect = local.generate(prompt, max_new_tokens=24, ignore_eos=True).text
    port = free_port()
    args = [str(art), "--port", str(port), "--speculative", "ngram", "--speculative-tokens", "3",
            "--prefix-cache-mb", "4", "--prefill-chunk", "5", "--log-level", "warning"]
    with serve_subprocess(args, tmp_path, port) as srv:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        drafted = check_speculation_over_http(c, srv.url, "tiny-llama", prompt, expect)
        hits = metric(srv.url, "inferneo_prefix_cache_hit_tokens_total", model="tiny-llama")
        assert hits > 0 and metric(srv.url, "vllm:prefix_cache_hits_total", model_name="tiny-llama") == hits
        assert metric(srv.url, "vllm:spec_decode_num_draft_tokens_total", model_name="tiny-llama") == drafted
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=4, extra_body={"speculative_tokens": 99})


def test_bench_workloads_report_each_comparison(tiny_artifact, tmp_path):
    import json
    from pathlib import Path

    from conftest import run_cli

    r = run_cli("bench", str(tiny_artifact("llama")), "--workloads", "--runs", "1", "--prefill-chunk", "16", "--json",
                "--plot", str(tmp_path))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert sorted(Path(p).name for p in report["charts"]) == sorted(  # what they plot: test_charts_and_report
        f"{s}.{e}" for s in ("speculation_tok_s", "prefix_ttft_ms", "interleave_itl_ms") for e in ("svg", "png"))
    assert all(Path(p).is_file() for p in report["charts"])
    assert report["copy"]["identical_tokens"] and report["chat"]["identical_tokens"]
    assert report["copy"]["ratio"] > 0 and 0 <= report["copy"]["acceptance_rate"] <= 1
    assert report["copy"]["decode_ratio"] > 0 and report["chat"]["speculative_decode_tok_s"] > 0
    assert report["prefix"]["prefix_tokens"] == 88 and report["prefix"]["cached_ttft_ms"] > 0
    assert report["interleave"]["prefill_chunk"] == 16 and report["interleave"]["p99_ratio_chunked"] > 0
    assert report["interleave"]["long_prompt_ttft_ms"]["whole"] > 0 and report["interleave"]["long_prompt_ttft_ms"]["chunked"] > 0
