"""The generation loop on real backends: seeds, stops, min_new_tokens, logprobs, streaming, batching."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import inferneo_runtime
from conftest import PROMPTS
from inferneo_runtime import RequestError, SamplingParams

TARGETS = ["onnx", "torchscript"]


@pytest.fixture(scope="module", params=TARGETS)
def model(request, tiny_artifact):
    with inferneo_runtime.load(tiny_artifact("llama"), target=request.param) as m:
        yield m


def test_seeded_sampling(model, tiny_artifact):
    kw = dict(max_new_tokens=24, temperature=1.0, ignore_eos=True)
    a = model.generate(PROMPTS[0], seed=11, **kw).token_ids
    assert model.generate(PROMPTS[0], seed=11, **kw).token_ids == a
    assert model.generate(PROMPTS[0], seed=12, **kw).token_ids != a
    other = "torchscript" if model.target == "onnx" else "onnx"
    with inferneo_runtime.load(tiny_artifact("llama"), target=other) as m2:  # same seed, other backend
        assert m2.generate(PROMPTS[0], seed=11, **kw).token_ids == a
    greedy = model.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True).token_ids
    assert model.generate(PROMPTS[0], top_k=1, seed=3, **kw).token_ids == greedy


def test_stop_token_and_min_new_tokens(model):
    greedy = model.generate(PROMPTS[1], max_new_tokens=16, ignore_eos=True).token_ids
    t = greedy[3]
    first = greedy.index(t)
    stopped = model.generate(PROMPTS[1], max_new_tokens=16, stop_token_ids=[t])
    assert stopped.finish_reason == "stop" and stopped.token_ids == greedy[: first + 1]
    held = model.generate(PROMPTS[1], max_new_tokens=16, stop_token_ids=[t], min_new_tokens=first + 2)
    assert t not in held.token_ids[: first + 2]
    assert model.generate(PROMPTS[1], max_new_tokens=5, ignore_eos=True).finish_reason == "length"


def test_stop_string_across_token_boundary(model):
    ids = model.generate(PROMPTS[2], max_new_tokens=20, ignore_eos=True).token_ids
    pieces = [model.tokenizer.decode([t]) for t in ids]
    full = model.generate(PROMPTS[2], max_new_tokens=20, ignore_eos=True).text
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    assert stop in full
    out = model.generate(PROMPTS[2], max_new_tokens=20, ignore_eos=True, stop=[stop, "never-appears"])
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)] and stop not in out.text
    streamed = "".join(model.stream(PROMPTS[2], max_new_tokens=20, ignore_eos=True, stop=[stop]))
    assert streamed == out.text


def test_logprobs_match_the_reference_softmax(model, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    out = model.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True, logprobs=3)
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    seq = torch.tensor([out.prompt_ids + out.token_ids])
    with torch.inference_mode():
        logp = torch.log_softmax(hf(seq).logits[0].double(), -1).numpy()
    n = len(out.prompt_ids)
    for k, lp in enumerate(out.logprobs):
        row = logp[n - 1 + k]
        assert lp.token_id == out.token_ids[k]
        assert lp.logprob == pytest.approx(row[lp.token_id], abs=1e-4)
        assert [t for t, _ in lp.top] == list(np.argsort(-row)[:3])
        assert np.exp([v for _, v in lp.top]).sum() <= 1.0 + 1e-6


def test_streaming_equals_full_text(model):
    kw = dict(max_new_tokens=24, temperature=0.8, seed=5, ignore_eos=True)
    deltas = list(model.stream(PROMPTS[1], **kw))
    full = model.generate(PROMPTS[1], **kw)
    assert "".join(deltas) == full.text == model.tokenizer.decode(full.token_ids)
    assert len(deltas) > 1


def test_batch_of_four_equals_alone(model):
    prompts = ["a", PROMPTS[0], PROMPTS[2], PROMPTS[1] + " and more words here"]
    lengths = {len(model.tokenizer.encode(p)) for p in prompts}
    assert len(lengths) == 4
    batched = model.generate(prompts, max_new_tokens=16)
    for p, b in zip(prompts, batched):
        assert b.token_ids == model.generate(p, max_new_tokens=16).token_ids


def test_requests_join_a_running_batch(model):
    """Continuous batching: prompts beyond max_batch (4) and per-request lengths; each equals its solo run."""
    prompts = [PROMPTS[i % 3] + " x" * i for i in range(7)]
    params = [SamplingParams(max_new_tokens=3 + 2 * i, ignore_eos=True) for i in range(7)]
    ids = [model.tokenizer.encode(p) for p in prompts]
    together = model.generate_ids(ids, params)
    for i in range(7):
        assert together[i].token_ids == model.generate_ids([ids[i]], params[i])[0].token_ids


def test_decode_steps_that_read_no_logits_take_only_tokens_from_the_backend(model, monkeypatch):
    """A decode step whose rows read nothing of the logits but the draw (greedy, or sampled with temperature,
    top-k, top-p, min-p) asks the backend for the tokens (on a GPU only they cross to the host); any row that
    reads its logits (logprobs, a penalty, a banned EOS) keeps the whole step on logits. Either way the tokens,
    seeded draws included, are the logits path's."""
    calls = {"forward": 0, "forward_tokens": 0}
    for name in calls:
        method = getattr(model.backend, name)

        def counted(*args, _method=method, _name=name, **kw):
            calls[_name] += 1
            return _method(*args, **kw)
        monkeypatch.setattr(model.backend, name, counted)
    ids = [model.tokenizer.encode(p) for p in PROMPTS]
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
    sampled = [SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=t, top_k=k, top_p=p, min_p=m, seed=s)
               for t, k, p, m, s in [(0.9, 0, 0.95, 0.0, 1), (1.2, 20, 1.0, 0.05, 2)]]
    for batch in ([greedy] * 3, [greedy, *sampled], [*sampled, greedy]):
        calls.update(forward=0, forward_tokens=0)
        fast = model.generate_ids(ids, batch)
        assert calls == {"forward": 3, "forward_tokens": 7}  # three prefills, then seven steps of three rows
        slow = model.generate_ids(ids, batch, keep_logits=True)  # keep_logits: every step returns the logits
        assert [o.token_ids for o in fast] == [o.token_ids for o in slow]
    assert len({tuple(o.token_ids) for o in fast}) == 3
    fast = model.generate_ids(ids, greedy)
    for other in (SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=0),
                  SamplingParams(max_new_tokens=8, ignore_eos=True, repetition_penalty=1.3),
                  SamplingParams(max_new_tokens=8, min_new_tokens=8, stop_token_ids=[fast[1].token_ids[2]])):
        calls.update(forward=0, forward_tokens=0)
        mixed = model.generate_ids(ids, [greedy, other, greedy])
        assert calls["forward_tokens"] == 0
        assert mixed[0].token_ids == fast[0].token_ids and mixed[2].token_ids == fast[2].token_ids
    # once min_new_tokens is reached nothing is banned: the steps after it take tokens again
    stop = next(t for t in fast[1].token_ids[4:] if t not in fast[1].token_ids[:4])
    calls.update(forward=0, forward_tokens=0)
    held = model.generate_ids([ids[1]], SamplingParams(max_new_tokens=8, min_new_tokens=4, ignore_eos=True,
                                                       stop_token_ids=[stop]))[0]
    assert held.token_ids == fast[1].token_ids[:fast[1].token_ids.index(stop) + 1]
    assert calls["forward_tokens"] == len(held.token_ids) - 4 >= 1


def test_chat_uses_the_template(model):
    msgs = [{"role": "user", "content": "Hello"}]
    text = model.tokenizer.apply_chat_template(msgs)
    assert text == "<s>user: Hello</s><s>assistant: "
    assert model.chat(msgs, max_new_tokens=6).token_ids == model.generate_ids(
        [model.tokenizer.encode(text, add_special_tokens=False)], SamplingParams(max_new_tokens=6))[0].token_ids


def test_bad_requests_fail_before_compute(model):
    with pytest.raises(RequestError, match="temperature"):
        model.generate("hi", temperature=-1)
    with pytest.raises(RequestError, match="max_sequence 128"):
        model.generate(["hi", "hello " * 100], max_new_tokens=8)
    with pytest.raises(RequestError, match="role"):
        model.chat([{"content": "x"}])


def test_cache_grows_slots_and_positions_in_one_copy():
    """A long prompt joining a running batch needs more slots and more positions: one reallocation (the copy
    costs a step's latency), the running slots' keys and values kept, the new room zeroed."""
    from inferneo_runtime.backends.base import KVCache

    cache = KVCache(np.zeros, layers=2, kv_heads=1, head_dim=2, batch=2, capacity=256, max_capacity=1024)
    cache.data[:] = np.random.default_rng(0).standard_normal(cache.data.shape)
    before = cache.data.copy()
    cache.ensure(3, 300)
    assert (cache.batch, cache.capacity, cache.version) == (3, 512, 1)
    np.testing.assert_array_equal(cache.data[:, :, :2, :, :256], before)
    assert not cache.data[:, :, 2].any() and not cache.data[:, :, :, :, 256:].any()
    cache.ensure(2, 400)  # fits already: nothing moves
    assert cache.version == 1
    with pytest.raises(RequestError, match="1025 tokens exceeds the artifact's max_sequence 1024"):
        cache.ensure(3, 1025)
    # `keep`: only the positions the slots hold are copied (the rest is never read); the copy is what costs
    held = cache.data.copy()
    cache.ensure(4, 600, keep=100)
    assert (cache.batch, cache.capacity, cache.version) == (4, 768, 2)
    np.testing.assert_array_equal(cache.data[:, :, :3, :, :100], held[:, :, :, :, :100])
    assert not cache.data[:, :, :, :, 100:].any()


def test_cpu_cache_memory_is_zeroed_small_pages():
    """A CPU cache lives in anonymous 4 KiB-page memory (numpy's huge pages make a scattered first write
    zero the whole array): zeroed, writable and contiguous, of any element type (16-bit caches are uint16)."""
    import mmap

    from inferneo_runtime.backends.base import small_page_zeros

    big = small_page_zeros((2, 2, 3, 4, 512, 64))
    assert big.dtype == np.float32 and big.flags.c_contiguous and big.flags.writeable and not big.any()
    root = big
    while isinstance(root, np.ndarray):
        root = root.base
    assert isinstance(root.obj, mmap.mmap)  # not numpy's allocator
    big[1, 0, 2, 3, 100] = 7.0
    assert big.sum() == 7.0 * 64
    half = small_page_zeros((4, 512, 1024), np.uint16)
    assert half.dtype == np.uint16 and half.nbytes == 4 * 512 * 1024 * 2 and not half.any()
    small = small_page_zeros((2, 3))
    assert small.shape == (2, 3) and not small.any()


def test_generate_cli_prints_the_text_as_generated(tiny_artifact):
    """`inferneo generate` (no --json) writes the completion's text itself: not wrapped to a console width, nor with
    its control characters dropped or `:name:` codes turned into emoji, when stdout is a file or a pipe."""
    import json

    from conftest import run_cli

    args = ("generate", str(tiny_artifact("llama")), PROMPTS[2], "--max-new-tokens", "96", "--target", "onnx")
    r = run_cli(*args, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    text = json.loads(r.stdout)["text"]
    assert len(text) > 80, text  # longer than the width a console assumes when stdout is not a terminal
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == text + "\n"
    r = run_cli(*args, "--stream")
    assert r.returncode == 0 and r.stdout == text + "\n", r.stderr
