"""The decode step the CUDA path captures as a graph (`inferneo_runtime.backends.decode_graph`), run uncaptured
on the CPU, against the step it replaces: what can be checked of the GPU path without a GPU."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from inferneo_runtime.backends.base import KVCache
from inferneo_runtime.generation import generate_ids
from inferneo_runtime.sampling import SamplingParams


@contextmanager
def decode_graph_mode(backend, mode: str):
    before = backend.decode_graphs.mode
    backend.decode_graphs.mode = mode
    try:
        yield backend.decode_graphs
    finally:
        backend.decode_graphs.mode = before


def assert_static_decode_matches(backend, prompts: list[list[int]], new_tokens: list[int]) -> None:
    """Greedy runs of `prompts` (requests of different lengths, so the batch shrinks as they finish; one long
    enough to grow the cache) give the same tokens and step logits with the static step as without it."""
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in new_tokens]
    assert backend.decode_graphs.mode == "off"  # the CPU's default: the per-length step
    plain = generate_ids(backend, prompts, params, keep_logits=True)
    with decode_graph_mode(backend, "static") as graphs:
        static = generate_ids(backend, prompts, params, keep_logits=True)
        greedy = generate_ids(backend, prompts, params)  # the engine's token-only steps (forward_tokens)
        assert graphs.captured == 0 and graphs.error is None  # nothing is captured on the CPU
    for a, b, c in zip(plain, static, greedy):
        assert a.token_ids == b.token_ids == c.token_ids
        np.testing.assert_allclose(np.stack(b.step_logits), np.stack(a.step_logits), atol=2e-5, rtol=0)


def greedy_on_a_growing_cache(backend, prompt: list[int], new_tokens: int) -> list[np.ndarray]:
    """Each step's logits of a greedy run in slot 1 of a cache that starts 3 positions past the prompt, so it
    is replaced (grown) after the first decode steps: a graph kept from before would read the old one."""
    d = backend.dims
    cache = KVCache(backend._zeros, d.num_layers, d.kv_heads, d.head_dim, batch=2, capacity=len(prompt) + 3,
                    max_capacity=backend.target.shapes.max_sequence)
    steps = [backend.forward(cache, 1, np.array([prompt]), np.array([0]), last_only=True)[0, -1]]
    for past in range(len(prompt), len(prompt) + new_tokens - 1):
        token = int(steps[-1].argmax())
        steps.append(backend.forward(cache, 1, np.array([[token]]), np.array([past]))[0, -1])
    assert cache.version >= 1  # it grew
    return steps


def assert_static_decode_survives_cache_growth(backend, prompt: list[int], new_tokens: int = 16) -> None:
    plain = greedy_on_a_growing_cache(backend, prompt, new_tokens)
    with decode_graph_mode(backend, "static"):
        static = greedy_on_a_growing_cache(backend, prompt, new_tokens)
    np.testing.assert_allclose(np.stack(static), np.stack(plain), atol=2e-5, rtol=0)


def assert_caches_taking_turns_keep_their_steps(backend, prompt: list[int], steps: int = 6) -> None:
    """Two caches decoding in turn on one backend (as each request's draft-model cache does) each keep their
    step: set up once per cache, not once per turn (on a GPU, a capture each turn would cost more than the step).
    The logits are the per-length step's."""
    def run(mode):
        with decode_graph_mode(backend, mode) as graphs:
            built = graphs.built
            caches = [backend.allocate_cache(batch=1, capacity=len(prompt) + steps) for _ in range(2)]
            logits = [[backend.forward(c, 0, np.array([prompt]), np.array([0]), last_only=True)[0, -1]]
                      for c in caches]
            for past in range(len(prompt), len(prompt) + steps):
                for cache, seen in zip(caches, logits):
                    seen.append(backend.forward(cache, 0, np.array([[int(seen[-1].argmax())]]), np.array([past]))[0, -1])
            return logits, graphs.built - built

    plain, _ = run("off")
    static, built = run("static")
    assert built == 2
    np.testing.assert_allclose(np.array(static), np.array(plain), atol=2e-5, rtol=0)


def assert_padded_batches_leave_other_slots_alone(backend, prompts: list[list[int]], steps: int = 6) -> None:
    """The engine's layout: three rows decode while the fourth slot holds a prompt part-way through prefill. The
    three run as a batch bucket of four (the padding row writes a dummy token at the fourth slot's last position):
    their logits are the per-length step's, the fourth slot's keys and values below its length are untouched, its
    prefill then goes on to the same logits, and a step of four rows after it replays the same (start, 4) step."""
    import torch

    d = backend.dims

    def run(mode):
        with decode_graph_mode(backend, mode) as graphs:
            built = graphs.built
            cache = KVCache(backend._zeros, d.num_layers, d.kv_heads, d.head_dim, batch=4, capacity=64,
                            max_capacity=backend.target.shapes.max_sequence)
            rows = [backend.forward(cache, r, np.array([p]), np.array([0]), last_only=True)[0, -1]
                    for r, p in enumerate(prompts[:3])]
            head, tail = prompts[3][:len(prompts[3]) // 2], prompts[3][len(prompts[3]) // 2:]
            backend.forward(cache, 3, np.array([head]), np.array([0]), last_only=True)
            before = cache.data[:, :, 3, :, :len(head)].clone()
            logits, past = [np.stack(rows)], np.array([len(p) for p in prompts[:3]])
            for _ in range(steps):
                logits.append(backend.forward(cache, 0, logits[-1].argmax(-1)[:, None], past)[:, -1])
                past += 1
            untouched = torch.equal(cache.data[:, :, 3, :, :len(head)], before)
            rest = backend.forward(cache, 3, np.array([tail]), np.array([len(head)]), last_only=True)[:, -1]
            ids = np.concatenate([logits[-1].argmax(-1), rest.argmax(-1)])[:, None]
            four = backend.forward(cache, 0, ids, np.append(past, len(prompts[3])))[:, -1]
            return np.stack(logits), rest, four, untouched, graphs.built - built

    plain, plain_rest, plain_four, untouched, _ = run("off")
    static, static_rest, static_four, untouched_static, built = run("static")
    assert untouched and untouched_static
    assert built == 1  # three rows padded to four, then four rows: one step set up
    for a, b in ((static, plain), (static_rest, plain_rest), (static_four, plain_four)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
