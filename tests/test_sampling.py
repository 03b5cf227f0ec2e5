"""Sampling functions on fixed logits: distributions are right (chi-square), filters hold, bad params fail early."""
from __future__ import annotations

import numpy as np
import pytest

from inferneo_runtime import RequestError, SamplingParams
from inferneo_runtime.sampling import choose_token, token_logprobs

LOGITS = np.array([2.0, 1.5, 1.0, 0.2, -1.0, -3.0], dtype=np.float32)
# chi-square 0.999 quantiles by degrees of freedom: a correct sampler fails this 1 time in 1000
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def _expected(temperature, top_p=1.0, top_k=0, min_p=0.0):
    """The target distribution, computed independently of the code under test (sorted, explicit loops)."""
    p = np.exp(LOGITS.astype(np.float64) / temperature)
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = set(order[:top_k]) if top_k else set(order)
    mass, nucleus = 0.0, set()
    for i in order:
        if i in keep and mass < top_p:
            nucleus.add(i)
            mass += p[i]
    keep &= nucleus
    keep = {i for i in keep if p[i] >= min_p * max(p)}
    q = np.array([p[i] if i in keep else 0.0 for i in range(len(p))])
    return q / q.sum()


def _draw(params, n=20000, seed=1234):
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(LOGITS))
    for _ in range(n):
        counts[choose_token(LOGITS, params, rng, [], [])] += 1
    return counts


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_k=3),
                                dict(temperature=1.0, min_p=0.2)])
def test_sampler_draws_from_the_right_distribution(kw):
    n = 20000
    counts = _draw(SamplingParams(**kw), n)
    expected = _expected(**kw) * n
    support = expected > 0
    assert counts[~support].sum() == 0, "a filtered-out token was drawn"
    chi2 = float((((counts - expected) ** 2)[support] / expected[support]).sum())
    assert chi2 < CHI2_999[int(support.sum()) - 1], (chi2, counts, expected)


def test_a_wrong_distribution_would_fail_the_check():
    # the check is not vacuous: samples at temperature 1 are far off a temperature-0.5 target
    n = 20000
    counts = _draw(SamplingParams(temperature=1.0), n)
    expected = _expected(0.5) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 > CHI2_999[5]


def test_top_k_1_is_greedy_and_seed_reproducible():
    rng = np.random.default_rng(0)
    assert all(choose_token(LOGITS, SamplingParams(temperature=1.0, top_k=1), rng, [], []) == 0 for _ in range(50))
    a = _draw(SamplingParams(temperature=1.0), n=200, seed=7)
    b = _draw(SamplingParams(temperature=1.0), n=200, seed=7)
    c = _draw(SamplingParams(temperature=1.0), n=200, seed=8)
    assert (a == b).all() and not (a == c).all()


def test_penalties():
    rng = np.random.default_rng(0)
    greedy = SamplingParams()
    assert choose_token(LOGITS, greedy, rng, [0], [0]) == 0
    # repetition penalty 2 halves token 0's positive logit (2.0 → 1.0), so token 1 (1.5) wins
    assert choose_token(LOGITS, SamplingParams(repetition_penalty=2.0), rng, [0], []) == 1
    # presence 0.3 + frequency 0.2 × 2 occurrences = 0.7 off token 0 → 1.3 < 1.5
    assert choose_token(LOGITS, SamplingParams(presence_penalty=0.3, frequency_penalty=0.2), rng, [], [0, 0]) == 1
    # banned ids (EOS before min_new_tokens) are never chosen
    assert choose_token(LOGITS, greedy, rng, [], [], banned=[0, 1]) == 2
    assert LOGITS[0] == 2.0  # inputs are not modified in place


def test_logprobs_are_the_models_softmax():
    lp = token_logprobs(LOGITS, 2, top_n=3)
    p = np.exp(LOGITS.astype(np.float64))
    p /= p.sum()
    assert lp.logprob == pytest.approx(np.log(p[2]))
    assert [t for t, _ in lp.top] == [0, 1, 2]
    assert sum(np.exp(v) for _, v in lp.top) == pytest.approx(p[:3].sum())


@pytest.mark.parametrize("kw,needle", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(min_p=2.0), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(min_new_tokens=10, max_new_tokens=5), "min_new_tokens"), (dict(logprobs=50), "logprobs"),
    (dict(seed=-1), "seed"), (dict(stop=("",)), "stop"),
])
def test_bad_parameters_are_clear(kw, needle):
    with pytest.raises(RequestError, match=needle):
        SamplingParams(**kw)


# Rows that exercise every filter and its edges: ties at top-k's k-th value, top-k past the vocabulary, top-p
# small enough to keep one token, min-p (1.0: only the tied top tokens), greedy rows (temperature 0, top_k 1).
DRAW_PARAMS = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
               for t, k, p, m in [(1.0, 0, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.3, 40, 1.0, 0.0), (1.0, 7, 0.8, 0.05),
                                  (0.0, 0, 1.0, 0.0), (2.0, 5000, 0.95, 0.0), (1.0, -1, 0.3, 0.0), (0.5, 1, 1.0, 0.0),
                                  (1.1, 3, 1.0, 0.0), (0.9, 0, 1.0, 0.3), (1.0, 0, 0.001, 0.0), (1.0, 0, 1.0, 1.0)]]


def _draw_inputs(seed: int, vocab: int = 3000):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((len(DRAW_PARAMS), vocab)) * 3).astype(np.float32)
    logits[:, 100:140] = logits.max(-1, keepdims=True)  # 40 more tokens tied at each row's top
    logits[:, 500:520] = np.sort(logits, axis=-1)[:, -5:-4]  # ties at the 5th-largest value
    return logits, rng.random(len(DRAW_PARAMS))


@pytest.mark.parametrize("seed", range(12))
def test_draw_tokens_is_choose_token_at_the_requests_uniform(seed):
    """The backends' token-only step draws as choose_token does with the request's generator."""
    from inferneo_runtime.sampling import draw_tokens

    logits, _ = _draw_inputs(seed)
    uniforms, expected = [], []
    for i, (row, p) in enumerate(zip(logits, DRAW_PARAMS)):  # each row its own request's generator
        uniforms.append(0.0 if p.greedy else np.random.default_rng([seed, i]).random())
        expected.append(choose_token(row, p, np.random.default_rng([seed, i]), [], []))
    assert draw_tokens(logits, DRAW_PARAMS, np.array(uniforms)).tolist() == expected


@pytest.mark.parametrize("seed", range(12))
def test_the_devices_draw_is_the_host_samplers(seed):
    """torch_sampling (what a torch backend on a GPU runs where its logits are; the same code on the CPU here)
    gives the numpy sampler's tokens at the same uniforms, from float32 and from bfloat16 logits."""
    torch = pytest.importorskip("torch")
    from inferneo_runtime.backends.torch_sampling import draw_tokens as device_draw
    from inferneo_runtime.sampling import draw_tokens

    logits, uniforms = _draw_inputs(seed)
    host = draw_tokens(logits, DRAW_PARAMS, uniforms)
    assert device_draw(torch.from_numpy(logits), DRAW_PARAMS, uniforms).tolist() == host.tolist()
    half = torch.from_numpy(logits).bfloat16()
    assert (device_draw(half, DRAW_PARAMS, uniforms).tolist()
            == draw_tokens(half.float().numpy(), DRAW_PARAMS, uniforms).tolist())
    assert len(set(host.tolist())) > 5  # the rows' tokens differ: the comparison is not of constants


def _nucleus_by_full_sort(probs, top_p):
    """Top-p as the sampler first wrote it: a stable argsort of every token, then the prefix reaching top_p."""
    order = np.argsort(-probs, kind="stable")
    cut = int(np.searchsorted(np.cumsum(probs[order]), top_p, side="left")) + 1
    mask = np.zeros(probs.size, dtype=bool)
    mask[order[:cut]] = True
    return mask


def test_nucleus_sorts_few_candidates_and_keeps_what_a_full_sort_keeps():
    """Top-p sorts only the likeliest tokens (growing the set while its mass falls short): the same mask as a
    full stable sort, for nuclei of one token up to nearly the whole vocabulary, with ties at the cut."""
    from inferneo_runtime.sampling import nucleus

    rng = np.random.default_rng(0)
    sizes = set()
    for temperature in (0.3, 1.0, 4.0, 50.0):
        for trial in range(10):
            x = rng.standard_normal(5000) / temperature
            x[rng.integers(0, 5000, 300)] = np.sort(x)[-rng.integers(1, 200)]  # 300 tokens tied at one rank
            probs = np.exp(x - x.max())
            probs /= probs.sum()
            for top_p in (0.05, 0.5, 0.9, 0.99, 0.999999):
                expected = _nucleus_by_full_sort(probs, top_p)
                assert (nucleus(probs, top_p) == expected).all(), (temperature, trial, top_p)
                sizes.add(int(expected.sum()))
    assert min(sizes) <= 64 and max(sizes) > 4096  # inside the first candidates, and past two growths
