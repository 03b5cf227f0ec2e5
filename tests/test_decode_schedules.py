"""A randomized differential check of the one decode loop: requests submitted at random steps (shared long
prefixes, repeating text that n-gram drafts predict, one-token prompts, prompts near max_sequence), with random
max_tokens, stop strings, logprobs and cancellations, under every mix of speculation (none, n-gram, draft model),
a small prefix cache that evicts, and prefill chunks of 1..N tokens. Each request's greedy tokens (and logprobs)
must be its solo decode's, token for token; a cancelled one's, a prefix of them. Counters stay consistent and
memory is given back when the engine goes idle."""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

import inferneo_runtime
from conftest import PROMPTS, tiny_recipe_fields
from inferneo_runtime import SamplingParams
from inferneo_runtime.generation import Engine, generate_ids
from inferneo_runtime.prefix_cache import PrefixCache
from inferneo_runtime.sampling import _processed, filter_probs
from inferneo_runtime.speculative import SpeculationStats
from test_draft_model import DRAFT, LENIENT


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    out = tmp_path_factory.mktemp("sched") / "tiny-sched"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "tiny-sched", out, targets=())
    fields["targets"] = [{"format": "onnx"}, {"format": "torchscript"},
                         {"format": "onnx", "precision": "int8", "tolerance": LENIENT}]
    return build(Recipe.model_validate(fields)).output


@pytest.fixture(scope="module", params=["onnx", "torchscript"])
def model(request, artifact):
    with inferneo_runtime.load(artifact, target=request.param) as m:
        m._solo = {}  # (prompt, params) -> the solo decode's SequenceOutput
        yield m


def solo(model, prompt, params):
    key = (tuple(prompt), params)
    if key not in model._solo:
        model._solo[key] = generate_ids(model.backend, [prompt], params, model.eos_ids, tokenizer=model.tokenizer)[0]
    return model._solo[key]


def make_requests(model, rng: random.Random, n: int, max_sequence: int, spread: int = 12):
    """(arrival step, prompt ids, params, cancel after this many events or None) for n random requests."""
    tok = model.tokenizer
    vocab = model.backend.dims.vocab
    shared = tok.encode(" ".join(PROMPTS) + " " + PROMPTS[2])  # a long common prefix
    out = []
    for _ in range(n):
        kind = rng.choice(["shared", "shared", "repeat", "one", "random", "long", "dup"])
        if kind == "dup" and out:
            prompt = list(rng.choice(out)[1])
        elif kind == "shared":
            prompt = shared[:rng.randint(len(shared) // 2, len(shared))] + tok.encode(rng.choice(PROMPTS))
        elif kind == "repeat":
            unit = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))]
            prompt = unit * rng.randint(2, 6)
        elif kind == "one":
            prompt = [rng.randrange(3, vocab)]
        elif kind == "long":
            prompt = (shared * 4)[:rng.randint(max_sequence - 20, max_sequence - 2)]
        else:
            prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 40))]
        room = max_sequence - len(prompt)
        max_new = rng.randint(1, min(room, 40))
        fields = dict(max_new_tokens=max_new, ignore_eos=rng.random() < 0.7, logprobs=rng.choice([None, None, 0, 2]))
        if rng.random() < 0.15:
            fields["prompt_logprobs"] = rng.choice([0, 1])
        if rng.random() < 0.15:
            fields["repetition_penalty"] = 1.3
        if rng.random() < 0.1:
            fields["logit_bias"] = ((rng.randrange(3, vocab), 5.0),)
        if rng.random() < 0.2:  # the request's own number of draft tokens (0: off; with no engine setting: n-gram)
            fields["speculative_tokens"] = rng.choice([0, 1, 3, 8])
        if rng.random() < 0.2:  # sampled: exact where it does not speculate (the same draws from the same seed)
            fields.update(temperature=0.8, top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1000), speculative_tokens=0)
        params = SamplingParams(**fields)
        if rng.random() < 0.5:  # a stop the solo decode reaches: a string or a token
            expect = solo(model, prompt, params)
            at = rng.randrange(len(expect.token_ids))
            if rng.random() < 0.5:
                params = replace(params, stop_token_ids=(expect.token_ids[at],))
            elif len(expect.text) > 2:
                at = rng.randrange(len(expect.text) - 1)
                params = replace(params, stop=(expect.text[at:at + rng.randint(1, 3)],),
                                 include_stop_str_in_output=rng.random() < 0.5)
        if not params.ignore_eos and rng.random() < 0.5:
            params = replace(params, min_new_tokens=rng.randint(0, max_new))
        cancel = rng.randint(0, max_new) if rng.random() < 0.2 else None
        out.append((rng.randint(0, spread), prompt, params, cancel))
    return out


def float_tie(model, prompt, params, got, expect, margin=1e-5) -> bool:
    """Whether the first token where `got` and `expect` differ was a tie within float rounding: greedy, the top two
    logits within `margin`; sampled, the request's uniform within `margin` of a boundary of the distribution's CDF.
    Batches of other shapes round a step's logits differently in the last bits, which moves such a token only."""
    i = next(i for i, (a, b) in enumerate(zip(got, expect)) if a != b)
    cache = model.backend.allocate_cache(1, len(prompt) + i)
    ids = np.asarray([prompt + got[:i]], dtype=np.int64)
    logits = model.backend.forward(cache, 0, ids, np.zeros(1, dtype=np.int64), last_only=True)[0, -1]
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(model.eos_ids))
    banned = sorted(stops) if i < params.min_new_tokens else []
    x = _processed(np.asarray(logits, dtype=np.float64), params, prompt + got[:i], got[:i], banned)
    if params.greedy:
        top = np.sort(x)[-2:]
        return bool(top[1] - top[0] < margin)
    u = np.random.default_rng(params.seed).random(i + 1)[i]  # one uniform per sampled token (no speculation)
    cdf = np.cumsum(filter_probs(x, params))
    return bool(np.abs(cdf - u * cdf[-1]).min() < margin)


def run_schedule(model, seed: int, speculative=None, prefix_blocks=None, block_size=None, chunk=None, n=8,
                 cache=None):
    """Drive an Engine the way the server's driver does and compare every request to its solo decode."""
    rng = random.Random(seed)
    block_size = block_size or rng.choice([1, 3, 4, 16])
    backend = model.backend
    stats = SpeculationStats()
    d = model.backend.dims
    block_bytes = d.num_layers * 2 * d.kv_heads * block_size * d.head_dim * 4
    if cache is None and prefix_blocks:
        cache = PrefixCache(max_bytes=prefix_blocks * block_bytes, block_size=block_size)
    engine = Engine(backend, model.eos_ids, model.tokenizer, speculative=speculative, spec_stats=stats,
                    prefix_cache=cache, prefill_chunk=chunk, draft_backend=model.draft_backend)
    # the server's driver may lower the artifact's bounds
    engine.max_batch = min(engine.max_batch, rng.choice([1, 2, 3, 4, 4, 4]))
    engine.max_sequence = min(engine.max_sequence, rng.choice([engine.max_sequence, engine.max_sequence, 90]))
    plan = make_requests(model, rng, n, engine.max_sequence, rng.choice([0, 12, 60]))
    reqs, events, step, verify_steps = [], {}, 0, 0
    while plan or engine.has_work:
        for item in [p for p in plan if p[0] <= step]:
            plan.remove(item)
            r = engine.add(item[1], item[2])
            reqs.append((r, item))
            events[r.id] = []
        for r, item in reqs:
            if item[3] is not None and not r.finished and len(events[r.id]) >= item[3] and not r.cancelled:
                engine.cancel(r)
        before = stats.drafted
        for ev in engine.step():
            assert not events[ev.request_id] or events[ev.request_id][-1].finish_reason is None, "event after the end"
            events[ev.request_id].append(ev)
        verify_steps += stats.drafted > before
        step += 1
        assert step < 2000
    where = f"seed={seed} speculative={speculative} prefix_blocks={prefix_blocks} chunk={chunk}"
    for r, (_, prompt, params, cancel) in reqs:
        expect = solo(model, prompt, params)
        got = r.out
        assert [e.token_id for e in events[r.id]] == got.token_ids, where
        if got.finish_reason == "cancelled":
            assert got.token_ids == expect.token_ids[:len(got.token_ids)], where
            continue
        if got.token_ids != expect.token_ids and float_tie(model, prompt, params, got.token_ids, expect.token_ids):
            continue  # (a float tie at the first difference: the rest follows another context)
        assert got.token_ids == expect.token_ids, f"{where} request {r.id} prompt={prompt} params={params}"
        assert got.finish_reason == expect.finish_reason, where
        assert got.text == expect.text == "".join(e.text for e in events[r.id]), where
        if params.logprobs is not None:
            assert [lp.token_id for lp in got.logprobs] == got.token_ids
            np.testing.assert_allclose([lp.logprob for lp in got.logprobs], [lp.logprob for lp in expect.logprobs],
                                       atol=1e-3, err_msg=where)
            assert [[t for t, _ in lp.top] for lp in got.logprobs] == [[t for t, _ in lp.top] for lp in expect.logprobs]
        if params.prompt_logprobs is not None:
            assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(prompt)
            np.testing.assert_allclose([lp.logprob for lp in got.prompt_logprobs[1:]],
                                       [lp.logprob for lp in expect.prompt_logprobs[1:]], atol=1e-3, err_msg=where)
    # counters and memory
    assert engine.cache is None and not engine.active and engine.prefilling is None
    assert 0 <= stats.accepted <= stats.drafted
    assert stats.steps == verify_steps, f"{where}: {stats.steps} verify steps counted, {verify_steps} ran"
    for r, _ in reqs:
        if r.spec is not None:
            assert r.spec.drafter.nbytes == 0, f"{where}: request {r.id}'s draft cache was not given back"
    if cache is not None:
        assert 0 <= cache.nbytes <= cache.max_bytes
        assert cache.nbytes == sum(b.nbytes for b in cache._blocks.values())
        assert 0 <= cache.hit_tokens <= cache.lookup_tokens
    return engine, stats, cache


CONFIGS = [
    dict(),
    dict(speculative="ngram"),
    dict(speculative=DRAFT),
    dict(prefix_blocks=12),
    dict(chunk=1),
    dict(chunk=7),
    dict(speculative="ngram", prefix_blocks=10, chunk=5),
    dict(speculative=DRAFT, prefix_blocks=10, chunk=3),
    dict(speculative={"method": "ngram", "num_tokens": 16}, prefix_blocks=3, chunk=2, n=12),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_random_schedules_match_solo_decodes(model, config):
    for seed in range(2):
        run_schedule(model, seed, **config)


def test_random_schedules_through_static_decode_steps(model):
    """The torch backends' static decode step (what a GPU captures as a CUDA graph; on the CPU, uncaptured): batch
    buckets whose padding rows write into the slots after the active ones, a part-way prefilled prompt's included."""
    if not hasattr(model.backend, "decode_graphs"):
        pytest.skip("onnx has no static decode step")
    from inferneo_runtime.backends.decode_graph import DecodeGraphs

    plain = model.backend.decode_graphs
    model.backend.decode_graphs = DecodeGraphs(model.backend._static_step, "static")
    try:
        for seed, config in enumerate([dict(chunk=3, prefix_blocks=10), dict(speculative="ngram", chunk=5)]):
            run_schedule(model, 100 + seed, n=10, **config)
    finally:
        model.backend.decode_graphs = plain


# -- what the schedules found -------------------------------------------------------------------------------------
def _self_drafting(artifact, target):
    """A model that drafts with its own target: every draft is the target's greedy token."""
    m = inferneo_runtime.load(artifact, target=target)
    return m, {"method": "draft", "draft": target, "num_tokens": 4}


def test_a_kept_draft_that_ends_the_request_counts_as_accepted(artifact):
    """A stop token inside an accepted draft ends the request at that draft token: it was still kept (it is in the
    output), so the acceptance counters count it (they counted 0 of 4 drafts kept when the first one stopped)."""
    m, spec = _self_drafting(artifact, "onnx")
    with m:
        prompt = m.tokenizer.encode(PROMPTS[0])
        plain = generate_ids(m.backend, [prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].token_ids
        for at in (1, 3):  # the first token, then the first step's 4 drafts: plain[1:5]
            if plain[at] in plain[:at]:
                continue
            stats = SpeculationStats()
            params = SamplingParams(max_new_tokens=12, ignore_eos=True, stop_token_ids=(plain[at],))
            got = generate_ids(m.backend, [prompt], params, m.eos_ids, speculative=spec, spec_stats=stats,
                               draft_backend=m.draft_backend)[0]
            assert got.token_ids == plain[:at + 1] and got.finish_reason == "stop"
            assert (stats.drafted, stats.accepted, stats.steps) == (4, at, 1)


def test_speculation_steps_count_verify_forwards_not_rows(artifact):
    """SpeculationStats.steps counts the verify forwards that carried drafts: a torchscript step that verifies two
    rows' drafts is one (it counted one per row)."""
    m, spec = _self_drafting(artifact, "torchscript")
    with m:
        prompts = [m.tokenizer.encode(PROMPTS[0]), m.tokenizer.encode(PROMPTS[1])]
        stats = SpeculationStats()
        engine = Engine(m.backend, m.eos_ids, m.tokenizer, speculative=spec, spec_stats=stats,
                        draft_backend=m.draft_backend)
        for p in prompts:
            engine.add(p, SamplingParams(max_new_tokens=11, ignore_eos=True))
        steps = 0
        while engine.has_work:
            engine.step()
            steps += 1
        # every step verified both rows' drafts (the first one's decode follows the prefill in the same step)
        assert (stats.drafted, stats.accepted, stats.steps, steps) == (16, 16, 2, 2)


@pytest.fixture(scope="module")
def longrope(tiny_checkpoint, tmp_path_factory):
    """Phi-3's LongRoPE switching at 16 positions (tests/tiny_models.py): onnx, drafting with itself."""
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    out = tmp_path_factory.mktemp("longrope") / "tiny-phi3"
    fields = tiny_recipe_fields(tiny_checkpoint("phi3"), "tiny-phi3", out, targets=("onnx",))
    with inferneo_runtime.load(build(Recipe.model_validate(fields)).output, target="onnx") as m:
        m._solo = {}
        yield m


def test_longrope_answers_do_not_depend_on_how_calls_split_the_sequence(longrope):
    """A LongRoPE call longer than the switch rotates all its tokens with the long factors. Speculation (a verify
    call crossing the switch), chunked prefill (a long prompt's first chunks ending before it) and prefix caching
    (a short prompt's blocks reused by a long one) each changed the greedy answer of the whole-prompt, one-token-per-
    step decode; now the engine keeps its calls on one side of the switch and caches each side's keys apart."""
    m = longrope
    assert m.backend.rope_switch == 16
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)

    def run(prompt, **kw):
        return generate_ids(m.backend, [prompt], params, m.eos_ids, draft_backend=m.draft_backend, **kw)[0].token_ids

    short, long = list(range(40, 52)), list(range(40, 64))  # 12 tokens (the switch comes while decoding) and 24
    stats = SpeculationStats()
    assert run(short, speculative={"draft": "onnx", "num_tokens": 4}, spec_stats=stats) == run(short)
    assert stats.accepted > 0
    assert run(long, prefill_chunk=8) == run(long) == run(long, prefill_chunk=3)
    cache = PrefixCache(max_bytes=1 << 30, block_size=4)
    run(long[:10], prefix_cache=cache)  # short: its blocks are rotated with the short factors
    assert run(long, prefix_cache=cache) == run(long)
    assert run(long + [5], prefix_cache=cache) == run(long + [5]) and cache.hit_tokens >= 24  # long ones reused


def test_longrope_random_schedules(longrope):
    for seed, config in enumerate([dict(speculative="ngram", prefix_blocks=30, chunk=5), dict(chunk=1, n=6)]):
        run_schedule(longrope, 200 + seed, **config)
