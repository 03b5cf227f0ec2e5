"""Prefix caching and chunked prefill on real backends: answers token-identical to plain prefill, eviction and
batches of requests sharing a prefix, and running streams that keep decoding between a long prompt's chunks."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import inferneo_runtime
from conftest import PROMPTS
from inferneo_runtime import RequestError, SamplingParams
from inferneo_runtime.backends.base import KVCache
from inferneo_runtime.generation import Engine, generate_ids
from inferneo_runtime.prefix_cache import PrefixCache

TARGETS = ["onnx", "torchscript"]
SYSTEM = "You are a helpful assistant. " + PROMPTS[2] + " " + PROMPTS[0]


@pytest.fixture(scope="module", params=TARGETS)
def model(request, tiny_artifact):
    with inferneo_runtime.load(tiny_artifact("llama"), target=request.param) as m:
        yield m


def _run(model, ids, params, **kw):
    return generate_ids(model.backend, ids, params, model.eos_ids, tokenizer=model.tokenizer, **kw)


def _prompts(model, n=4):
    return [model.tokenizer.encode(SYSTEM + f" Question {i}: " + PROMPTS[i % 3]) for i in range(n)]


# -- prefix caching -----------------------------------------------------------------------------------------------
def test_cached_and_uncached_answers_are_token_identical(model):
    prompts = _prompts(model)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=1)
    plain = [_run(model, [p], params)[0] for p in prompts]
    cache = PrefixCache(max_bytes=1 << 30, block_size=4)
    first = _run(model, [prompts[0]], params, prefix_cache=cache)[0]
    assert cache.hit_tokens == 0 and len(cache) > 0
    for p, expect in zip(prompts, plain):  # the first again (all but its last partial block hit), then the others
        before = cache.hit_tokens
        got = _run(model, [p], params, prefix_cache=cache)[0]
        assert got.token_ids == expect.token_ids
        assert [lp.logprob for lp in got.logprobs] == pytest.approx([lp.logprob for lp in expect.logprobs], abs=1e-4)
        assert cache.hit_tokens - before >= len(model.tokenizer.encode(SYSTEM)) - 8  # the shared prefix was reused
    assert first.token_ids == plain[0].token_ids
    # a prompt that is exactly whole blocks still computes its last token (the hit stops one block short)
    whole = prompts[1][: len(prompts[1]) // 4 * 4]
    assert _run(model, [whole], params, prefix_cache=cache)[0].token_ids == _run(model, [whole], params)[0].token_ids


def test_next_chat_turn_reuses_the_previous_answer(model):
    cache = PrefixCache(max_bytes=1 << 30, block_size=4)
    p = _prompts(model, 1)[0]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    answer = _run(model, [p], params, prefix_cache=cache)[0].token_ids
    follow = p + answer + model.tokenizer.encode(" and then?")
    before = cache.hit_tokens
    got = _run(model, [follow], params, prefix_cache=cache)[0].token_ids
    assert cache.hit_tokens - before > len(p)  # blocks of the answer were cached too
    assert got == _run(model, [follow], params)[0].token_ids


def test_a_batch_sharing_a_prefix_under_eviction(model):
    prompts = _prompts(model, 7)
    params = [SamplingParams(max_new_tokens=5 + 3 * i, ignore_eos=True) for i in range(7)]
    plain = _run(model, prompts, params)
    block_bytes = 2 * 2 * 2 * 4 * 16 * 4  # layers × (k, v) × kv_heads × block × head_dim × float32
    cache = PrefixCache(max_bytes=5 * block_bytes, block_size=4)  # far less than one prompt: evicts all along
    for _ in range(2):
        got = _run(model, prompts, params, prefix_cache=cache)  # requests admitted together read each other's blocks
        assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert cache.hit_tokens > 0 and cache.evictions > 0 and 0 < cache.nbytes <= cache.max_bytes


def test_model_api_shares_its_prefix_cache(model):
    model.prefix_cache = PrefixCache(max_bytes=1 << 30, block_size=8)
    try:
        a = model.generate(SYSTEM + " first", max_new_tokens=8, ignore_eos=True)
        b = model.generate(SYSTEM + " first", max_new_tokens=8, ignore_eos=True)
        assert a.token_ids == b.token_ids and model.prefix_cache.hit_tokens > 0
    finally:
        model.prefix_cache = None


def test_lru_evicts_a_prefix_from_its_end():
    layers, heads, dim, bs = 1, 1, 2, 2
    cache = KVCache(lambda shape: np.zeros(shape, np.float32), layers, heads, dim, batch=2, capacity=16, max_capacity=16)
    cache.data[:] = np.random.default_rng(0).random(cache.data.shape)
    block = layers * 2 * heads * bs * dim * 4
    pc = PrefixCache(max_bytes=3 * block, block_size=bs)
    pc.store(cache, 0, [1, 2, 3, 4, 5, 6, 7], 7)  # three whole blocks
    assert len(pc) == 3
    pc.store(cache, 1, [9, 9, 9], 3)  # one more block: the chain's deepest block goes, not its first
    into = KVCache(lambda shape: np.zeros(shape, np.float32), layers, heads, dim, batch=1, capacity=16, max_capacity=16)
    assert pc.load(into, 0, [1, 2, 3, 4, 5, 6, 7, 8]) == 4 and pc.evictions == 1
    np.testing.assert_array_equal(into.data[:, :, 0, :, :4], cache.data[:, :, 0, :, :4])
    assert not into.data[:, :, 0, :, 4:].any()
    assert pc.load(into, 0, [1, 2, 3]) == 2  # never the whole prompt's last token


def test_bad_prefix_settings_are_clear():
    with pytest.raises(RequestError, match="block_size"):
        PrefixCache(1 << 20, block_size=0)
    with pytest.raises(RequestError, match="prefill_chunk"):
        Engine.__new__(Engine).__init__(None, prefill_chunk=0)


# -- chunked prefill -----------------------------------------------------------------------------------------------
def test_chunked_prefill_is_token_identical(model):
    prompts = _prompts(model, 5)
    params = [SamplingParams(max_new_tokens=4 + 5 * i, ignore_eos=True) for i in range(5)]
    plain = _run(model, prompts, params)
    for chunk in (3, 16):
        for cache in (None, PrefixCache(1 << 30, block_size=4)):
            got = _run(model, prompts, params, prefill_chunk=chunk, prefix_cache=cache)
            assert [o.token_ids for o in got] == [o.token_ids for o in plain], (chunk, cache)
    # prompt logits are whole when a prompt is prefilled in chunks
    full = _run(model, prompts[:1], params[0], keep_logits=True)[0].prompt_logits
    chunked = _run(model, prompts[:1], params[0], keep_logits=True, prefill_chunk=5)[0].prompt_logits
    assert chunked.shape == full.shape == (len(prompts[0]), model.backend.dims.vocab)
    np.testing.assert_allclose(chunked, full, atol=1e-4)


def _count_mixed_forwards(backend) -> list:
    """Record each run of the onnx backend's mixed-step session (a chunk in the decode step's forward)."""
    runs = []
    session = backend._mixed_session
    backend._mixed_session = SimpleNamespace(io_binding=session.io_binding,
                                             run_with_iobinding=lambda b: runs.append(session.run_with_iobinding(b)))
    return runs


def test_running_streams_decode_between_chunks_of_a_long_prompt(model):
    engine = Engine(model.backend, model.eos_ids, model.tokenizer, prefill_chunk=8)
    # onnx: each chunk runs in the streams' decode forward (the mixed-step graph); torchscript: two forwards
    assert model.backend.mixes_steps == (model.backend.format == "onnx")
    mixed = _count_mixed_forwards(model.backend) if model.backend.mixes_steps else []
    short = [model.tokenizer.encode(PROMPTS[0]), model.tokenizer.encode(PROMPTS[1])]
    running = [engine.add(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(short, (6, 60))]
    while len(engine.active) < 2:
        engine.step()
    long_ids = _prompts(model, 1)[0] * 2
    assert len(long_ids) > 40
    before = len(mixed)  # the second short prompt's chunks ran beside the first one's decode
    late = engine.add(long_ids, SamplingParams(max_new_tokens=10, ignore_eos=True))
    interleaved = 0
    while not late.out.token_ids:
        events = engine.step()
        if engine.prefilling is late:
            # one chunk of the long prompt went in, and the running stream got its token in the same step
            assert late.past == 8 * (interleaved + 1)
            assert [e.request_id for e in events if e.request_id == running[1].id] == [running[1].id]
            interleaved += 1
    assert interleaved == (len(long_ids) - 1) // 8  # the first running request finished mid-prefill: its slot moved
    assert running[0].finished
    # every chunk of the long prompt, the last (which completed it) too
    assert len(mixed) - before == (interleaved + 1 if model.backend.mixes_steps else 0)
    while engine.has_work:
        engine.step()
    for req, p in zip(running + [late], short + [long_ids]):
        assert req.out.token_ids == _run(model, [p], req.params)[0].token_ids


def test_a_prompt_cancelled_mid_prefill_frees_its_slot(model):
    engine = Engine(model.backend, model.eos_ids, model.tokenizer, prefill_chunk=8)
    short = model.tokenizer.encode(PROMPTS[1])
    running = engine.add(short, SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.step()
    doomed = engine.add(_prompts(model, 1)[0] * 2, SamplingParams(max_new_tokens=5, ignore_eos=True))
    engine.step()
    assert engine.prefilling is doomed and 0 < doomed.past < len(doomed.out.prompt_ids)
    engine.cancel(doomed)
    after = engine.add(_prompts(model, 2)[1], SamplingParams(max_new_tokens=6, ignore_eos=True))
    while engine.has_work:
        engine.step()
    assert doomed.out.finish_reason == "cancelled" and not doomed.out.token_ids
    assert running.out.token_ids == _run(model, [short], running.params)[0].token_ids
    assert after.out.token_ids == _run(model, [after.out.prompt_ids], after.params)[0].token_ids


def test_a_request_cancelled_while_waiting_ends_cancelled(model):
    """Cancelled before it got a slot, a request ends as one cancelled mid-prefill or mid-decode does: finished,
    with finish_reason "cancelled" (it stayed unfinished forever: a loop waiting for it never ended)."""
    engine = Engine(model.backend, model.eos_ids, model.tokenizer, prefill_chunk=8)
    running = engine.add(model.tokenizer.encode(PROMPTS[1]), SamplingParams(max_new_tokens=6, ignore_eos=True))
    doomed = engine.add(_prompts(model, 1)[0], SamplingParams(max_new_tokens=5, ignore_eos=True))
    engine.cancel(doomed)
    assert doomed.finished and doomed.out.finish_reason == "cancelled"
    while engine.has_work:
        engine.step()
    assert not doomed.out.token_ids and doomed.out.finish_reason == "cancelled"
    assert running.out.token_ids == _run(model, [running.out.prompt_ids], running.params)[0].token_ids


def test_prompt_logprobs_are_the_same_chunked_cached_or_whole(model):
    """vLLM's prompt_logprobs: every prompt token scored given those before it, whatever way the prompt is
    prefilled; a prefix-cache hit does not skip scoring (the prompt is then prefilled whole)."""
    from inferneo_runtime.goldens import prefill_logits
    from inferneo_runtime.sampling import log_softmax

    prompt = _prompts(model, 1)[0]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, prompt_logprobs=2)
    logits = prefill_logits(model.backend, prompt)
    expected = [float(log_softmax(logits[i - 1])[prompt[i]]) for i in range(1, len(prompt))]
    cache = PrefixCache(max_bytes=1 << 30, block_size=4)
    _run(model, [prompt], SamplingParams(max_new_tokens=3), prefix_cache=cache)  # the prompt is cached now
    for kw in ({}, {"prefill_chunk": 5}, {"prefix_cache": cache}):
        out = _run(model, [prompt], params, **kw)[0]
        scored = out.prompt_logprobs
        assert len(scored) == len(prompt) and scored[0] is None, kw
        assert [lp.token_id for lp in scored[1:]] == prompt[1:]
        assert [lp.logprob for lp in scored[1:]] == pytest.approx(expected, abs=1e-4), kw
        assert all(len(lp.top) == 2 and lp.rank >= 1 for lp in scored[1:])


def test_a_servers_memory_budget_counts_the_mixed_step_session(tiny_artifact):
    """An engine with a prefill budget loads the onnx target's mixed-step graph as a second session, with its own
    copy of the weights: the server's budget counts it from then on (and not otherwise)."""
    from inferneo_runtime import preflight
    from inferneo_runtime.manager import ModelManager
    from inferneo_runtime.registry import ArtifactSource

    sources = [ArtifactSource(str(tiny_artifact("llama")), "onnx")]
    for options, extra in (({}, 0), ({"prefill_chunk": 8}, 1)):
        manager = ModelManager(sources, engine_options=options)
        try:
            manager.load("tiny-llama")
            entry = manager.entry("tiny-llama")
            weights = preflight.weights_bytes(entry.resolved.manifest.targets["onnx"])
            assert entry.mixed_step_bytes == extra * weights
            assert manager.memory_used() == entry.weight_bytes + entry.cache_bytes + extra * weights
            assert manager.describe(entry)["memory"]["mixed_step_weights_bytes"] == extra * weights
        finally:
            manager.close()
