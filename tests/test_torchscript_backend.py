"""TorchScript target: export tiny checkpoints, run them through TorchScriptBackend, compare with HF."""
from __future__ import annotations

import gc
import warnings
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from inferneo_build.architectures import decoder_spec  # noqa: E402
from inferneo_build.canonical_weights import canonical_weights  # noqa: E402
from inferneo_build.exporters.torchscript import export_torchscript  # noqa: E402
from inferneo_runtime.backends.base import KVCache  # noqa: E402
from inferneo_runtime.backends.torchscript import TorchScriptBackend  # noqa: E402
from inferneo_runtime.generation import generate_ids  # noqa: E402
from inferneo_runtime.sampling import SamplingParams  # noqa: E402
from inferneo_runtime.manifest import ModelDims, ShapeBounds, TargetEntry, ValidationSummary, file_entry  # noqa: E402

from static_decode import (assert_caches_taking_turns_keep_their_steps, assert_padded_batches_leave_other_slots_alone,  # noqa: E402
                           assert_static_decode_matches, assert_static_decode_survives_cache_growth)
from tiny_models import make_tiny_checkpoint  # noqa: E402

MODEL_TYPES = ["llama", "qwen2", "mistral", "gpt2"]
NEW_TOKENS = 16
SHAPES = SimpleNamespace(max_batch=4, max_sequence=512)
PROMPTS = [[5, 17, 300, 42, 7, 99, 250, 3, 11], [8, 401, 66], [120, 9, 9, 31, 400, 77, 2, 14, 150, 19, 22, 5, 61]]


def export_and_load(spec, weights, out_dir: Path) -> TorchScriptBackend:
    result = export_torchscript(spec, weights, None, SHAPES, out_dir)
    files = [file_entry(out_dir, f) for f in result.files]
    target = TargetEntry(format="torchscript", status="valid", files=files, io=result.io, dtype=result.dtype,
                         shapes=ShapeBounds(max_batch=SHAPES.max_batch, max_sequence=SHAPES.max_sequence),
                         toolchain=result.toolchain, validation=ValidationSummary(status="skipped"))
    dims = ModelDims(model_type=spec.model_type, family=spec.family, num_layers=spec.num_layers, hidden=spec.hidden,
                     heads=spec.heads, kv_heads=spec.kv_heads, head_dim=spec.head_dim, vocab=spec.vocab,
                     max_positions=spec.max_positions)
    return TorchScriptBackend(out_dir, target, dims, threads=2).load()


class Case(SimpleNamespace):
    """One exported checkpoint: `hf` (the reference), `backend`, `out_dir`."""


def make_case(hf, out_dir: Path) -> Case:
    spec = decoder_spec(hf.config)
    weights = canonical_weights(spec, hf.state_dict())
    return Case(hf=hf, spec=spec, backend=export_and_load(spec, weights, out_dir), out_dir=out_dir)


@pytest.fixture(scope="module", params=MODEL_TYPES)
def case(request, tmp_path_factory) -> Case:
    ckpt = make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(f"ckpt-{request.param}"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    yield make_case(hf, tmp_path_factory.mktemp(f"ts-{request.param}"))


def hf_greedy(hf, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    hf.generation_config.eos_token_id = None  # run the full length; EOS handling is the generation loop's job
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def backend_greedy(backend, prompt: list[int], cache: KVCache | None = None, slot: int = 0,
                   new_tokens: int = NEW_TOKENS) -> list[int]:
    cache = cache or backend.allocate_cache(batch=1, capacity=len(prompt) + new_tokens)
    logits = backend.forward(cache, slot, np.array([prompt]), np.array([0]))
    tokens = [int(logits[0, -1].argmax())]
    while len(tokens) < new_tokens:
        past = len(prompt) + len(tokens) - 1
        logits = backend.forward(cache, slot, np.array([[tokens[-1]]]), np.array([past]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def test_prefill_logits_match_hf(case):
    ids = PROMPTS[0]
    with torch.no_grad():
        ref = case.hf(torch.tensor([ids])).logits.numpy()
    cache = case.backend.allocate_cache(batch=1, capacity=len(ids))
    logits = case.backend.forward(cache, 0, np.array([ids]), np.array([0]))
    assert logits.dtype == np.float32 and logits.shape == (1, len(ids), case.spec.vocab)
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


def test_greedy_decode_matches_hf_generate(case):
    assert backend_greedy(case.backend, PROMPTS[0]) == hf_greedy(case.hf, PROMPTS[0])


def test_batched_decode_matches_single_runs(case):
    backend = case.backend
    singles = [backend_greedy(backend, p) for p in PROMPTS]
    cache = backend.allocate_cache(batch=3, capacity=64)
    tokens = []
    for slot, prompt in enumerate(PROMPTS):  # prefill each prompt into its own slot
        logits = backend.forward(cache, slot, np.array([prompt]), np.array([0]))
        tokens.append([int(logits[0, -1].argmax())])
    past = np.array([len(p) for p in PROMPTS])
    for _ in range(NEW_TOKENS - 1):  # then decode all three rows in one call
        logits = backend.forward(cache, 0, np.array([[t[-1]] for t in tokens]), past)
        for row, t in enumerate(tokens):
            t.append(int(logits[row, -1].argmax()))
        past += 1
    assert tokens == singles


def test_cache_growth_mid_generation(case):
    backend, prompt = case.backend, PROMPTS[0]
    expected = backend_greedy(backend, prompt)
    # Start below the prompt + new tokens so the cache must grow (and be re-sliced) during decode.
    cache = KVCache(backend._zeros, case.spec.num_layers, case.spec.kv_heads, case.spec.head_dim,
                    batch=2, capacity=len(prompt) + 3, max_capacity=SHAPES.max_sequence)
    assert backend_greedy(backend, prompt, cache=cache, slot=1) == expected
    assert cache.version == 1 and cache.capacity > len(prompt) + NEW_TOKENS
    assert not cache.data[:, :, 0].any()  # slot 0 untouched: writes landed only in the bound slot


def test_load_and_export_show_no_deprecation_warnings(case, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TorchScriptBackend(case.out_dir, case.backend.target, case.backend.dims).load()
        export_torchscript(case.spec, canonical_weights(case.spec, case.hf.state_dict()), None, SHAPES, tmp_path)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], [str(w.message) for w in caught]


def test_sliding_window_matches_hf(tmp_path):
    config = transformers.AutoConfig.for_model(
        "mistral", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, sliding_window=5, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    case = make_case(hf, tmp_path)
    assert case.spec.sliding_window == 5
    prompt = PROMPTS[2]  # longer than the window
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits.numpy()
    cache = case.backend.allocate_cache(batch=1, capacity=len(prompt))
    np.testing.assert_allclose(case.backend.forward(cache, 0, np.array([prompt]), np.array([0])), ref, atol=1e-4, rtol=0)
    assert backend_greedy(case.backend, prompt) == hf_greedy(hf, prompt)


def test_cuda_request_without_cuda_is_a_clear_error(case):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from inferneo_runtime.errors import InferneoError

    with pytest.raises(InferneoError, match="no CUDA device"):
        TorchScriptBackend(case.out_dir, case.backend.target, case.backend.dims, device="cuda").load()


def test_last_only_logits_equal_the_full_last_row(case):
    backend, ids = case.backend, PROMPTS[2]
    assert backend.supports_last_only
    full = backend.forward(backend.allocate_cache(batch=1, capacity=32), 0, np.array([ids]), np.array([0]))
    last = backend.forward(backend.allocate_cache(batch=1, capacity=32), 0, np.array([ids]), np.array([0]),
                           last_only=True)
    assert last.shape == (1, 1, case.spec.vocab)
    np.testing.assert_allclose(last[0, 0], full[0, -1], atol=1e-5, rtol=0)


def test_engine_fast_path_gives_the_full_logits_path_tokens(case):
    """The Engine's last-position-only prefill (default) and its keep_logits path pick the same greedy tokens."""
    from inferneo_runtime.generation import generate_ids
    from inferneo_runtime.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    fast = generate_ids(case.backend, PROMPTS, params)
    simple = generate_ids(case.backend, PROMPTS, params, keep_logits=True)
    assert [o.token_ids for o in fast] == [o.token_ids for o in simple]
    assert fast[0].token_ids == backend_greedy(case.backend, PROMPTS[0])


def test_static_decode_step_gives_the_per_length_steps_tokens_and_logits(case):
    """The step a CUDA graph replays (mask over the whole capacity, computed from the rows' positions) while the
    batch shrinks from 3 rows to 1 and the cache grows past 256 positions: graphs are per batch bucket and are
    dropped with the cache they were captured over (a stale one would attend over the old capacity); a batch
    padded to its bucket leaves the other slots' keys and values alone."""
    assert_static_decode_matches(case.backend, PROMPTS, [12, 300, 40])
    assert_static_decode_survives_cache_growth(case.backend, PROMPTS[0])
    assert_caches_taking_turns_keep_their_steps(case.backend, PROMPTS[2])
    assert_padded_batches_leave_other_slots_alone(case.backend, [*PROMPTS, PROMPTS[2][::-1]])


def test_cuda_graphs_are_on_for_cuda_unless_turned_off(monkeypatch):
    from inferneo_runtime.backends.decode_graph import default_mode

    monkeypatch.delenv("INFERNEO_CUDA_GRAPHS", raising=False)
    assert default_mode(torch.device("cpu")) == "off" and default_mode(torch.device("cuda")) == "cuda"
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv("INFERNEO_CUDA_GRAPHS", off)
        assert default_mode(torch.device("cuda:1")) == "off"
    monkeypatch.setenv("INFERNEO_CUDA_GRAPHS", "1")
    assert default_mode(torch.device("cuda")) == "cuda"


def test_close_lets_go_of_the_module_and_decode_graphs_at_once(case):
    """close() drops what the backend made (the module's weights, the decode graphs and their static buffers:
    on a GPU, device memory) right away: the graphs' steps are bound to the backend, a reference cycle that
    would otherwise keep them until the next garbage collection."""
    backend = TorchScriptBackend(case.out_dir, case.backend.target, case.backend.dims, threads=2).load()
    backend.decode_graphs.mode = "static"  # builds the per-step buffers on the CPU, as mode "cuda" does on a GPU
    generate_ids(backend, PROMPTS[:2], SamplingParams(max_new_tokens=4, ignore_eos=True))
    graphs = backend.decode_graphs
    steps = [g for per_cache in graphs._graphs.values() for g in per_cache.values()]
    assert graphs.built > 0 and steps
    made = [backend._module, graphs, backend._last_position, *steps, *(t for g in steps for t in (g.ids, g.positions))]
    refs = [weakref.ref(x) for x in made]
    del made, steps, graphs
    gc.disable()  # what close() lets go of must go now, not when a collection happens to run
    try:
        backend.close()
        assert [r for r in refs if r() is not None] == []
        backend.close()  # a second close is a no-op
    finally:
        gc.enable()
    with pytest.raises(RuntimeError, match="before load"):
        backend.forward(None, 0, np.array([[1]]), np.array([0]))


def test_a_load_that_fails_half_way_keeps_nothing(case):
    """The module loads, then its warm-up step fails (the manifest's dims do not match it): the backend drops the
    module and its half-made state with the error, so they are freed at once, not at the next collection."""
    dims = case.backend.dims.model_copy(update={"kv_heads": case.backend.dims.kv_heads + 1})
    backend = TorchScriptBackend(case.out_dir, case.backend.target, dims, threads=2)
    failed = False
    gc.disable()
    try:
        try:
            backend.load()
        except Exception:  # noqa: BLE001 - whatever torch raises for the mismatched cache
            failed = True
        assert failed and not backend._loaded and backend._module is None
        freed = weakref.ref(backend)
        del backend
        assert freed() is None
    finally:
        gc.enable()
