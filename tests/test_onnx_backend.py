"""The ONNX exporter and OnnxBackend against HF transformers on tiny random checkpoints (seconds)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from inferneo_build.architectures import DecoderSpec, decoder_spec
from inferneo_build.canonical_weights import canonical_weights
from inferneo_build.exporters import exporter_for
from inferneo_runtime.backends import backend_class
from inferneo_runtime.backends.onnx import MIXED_GRAPH, OnnxBackend
from inferneo_runtime.errors import RequestError
from inferneo_runtime.manifest import ModelDims, ShapeBounds, TargetEntry, ValidationSummary, file_entry
from tiny_models import make_tiny_checkpoint

MODEL_TYPES = ["llama", "qwen2", "mistral", "gpt2"]
SHAPES = ShapeBounds(max_batch=4, max_sequence=512)
NEW_TOKENS = 16
ATOL = 1e-4


@dataclass
class Built:
    spec: DecoderSpec
    hf: torch.nn.Module
    artifact: Path
    target: TargetEntry
    eos: set[int]

    def backend(self, **kw) -> OnnxBackend:
        dims = ModelDims(**{k: getattr(self.spec, k) for k in ModelDims.model_fields if hasattr(self.spec, k)})
        return OnnxBackend(self.artifact, self.target, dims, threads=1, **kw).load()


def build(ckpt: Path, out: Path, config=None) -> Built:
    config = config or AutoConfig.from_pretrained(ckpt)
    spec = decoder_spec(config)
    weights = canonical_weights(spec, safetensors.torch.load_file(ckpt / "model.safetensors"))
    result = exporter_for("onnx")(spec, weights, SimpleNamespace(opset=17), SHAPES, out)
    target = TargetEntry(format="onnx", status="valid", files=[file_entry(out, f) for f in result.files],
                         io=result.io, shapes=SHAPES, toolchain=result.toolchain,
                         validation=ValidationSummary(status="skipped"))
    hf = AutoModelForCausalLM.from_pretrained(ckpt, config=config).eval()
    eos = hf.generation_config.eos_token_id
    return Built(spec, hf, out, target, set(eos if isinstance(eos, list) else [eos]))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {t: make_tiny_checkpoint(t, root / t) for t in MODEL_TYPES}


@pytest.fixture(scope="module", params=MODEL_TYPES)
def built(request, checkpoints, tmp_path_factory) -> Built:
    return build(checkpoints[request.param], tmp_path_factory.mktemp(f"onnx_{request.param}"))


def prompts(lengths, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, n).tolist() for n in lengths]


def hf_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(hf, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


def greedy(backend, prompt: list[int], eos: set[int], n: int = NEW_TOKENS, capacity: int | None = None):
    """Prefill then one-token steps, stopping after EOS like HF generate."""
    cache = backend.allocate_cache(1, capacity or len(prompt) + n)
    logits = backend.forward(cache, 0, np.array([prompt]), np.array([0]))
    tokens = [int(logits[0, -1].argmax())]
    while len(tokens) < n and tokens[-1] not in eos:
        logits = backend.forward(cache, 0, np.array([[tokens[-1]]]), np.array([len(prompt) + len(tokens) - 1]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, cache


# -- export ----------------------------------------------------------------------------------------
def test_export_files_io_and_names(built):
    files = [built.artifact / f.path for f in built.target.files]
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data", MIXED_GRAPH]
    assert all(f.parent == built.artifact for f in files)  # the target folder itself (exporters/__init__.py)
    io = built.target.io
    assert io.kv_layout == "per_layer"
    names = [t.name for t in io.inputs]
    learned = built.spec.positions == "learned"
    assert names[:3 if learned else 2] == ["input_ids", "attention_mask"] + (["position_ids"] if learned else [])
    assert [t.name for t in io.outputs][:3] == ["logits", "present.0.key", "present.0.value"]
    kv = next(t for t in io.inputs if t.name == "past_key_values.1.value")
    assert kv.shape == ["batch", built.spec.kv_heads, "max_cache", built.spec.head_dim]

    model = onnx.load(str(files[0]), load_external_data=False)
    assert [i.name for i in model.graph.input] == names
    node_names = [n.name for n in model.graph.node]
    assert len(node_names) == len(set(node_names))
    assert "/model/layers.0/attn/qkv/MatMul" in node_names
    ops = {n.op_type for n in model.graph.node}
    assert "GroupQueryAttention" in ops and "Concat" not in ops
    assert ("SkipSimplifiedLayerNormalization" if built.spec.norm == "rms" else "SkipLayerNormalization") in ops


def test_export_is_deterministic(checkpoints, tmp_path):
    a, b = (build(checkpoints["llama"], tmp_path / d) for d in "ab")
    digest = {d: [hashlib.sha256((x.artifact / f.path).read_bytes()).hexdigest() for f in x.target.files]
              for d, x in (("a", a), ("b", b))}
    assert digest["a"] == digest["b"]


@pytest.mark.parametrize("rows", [1, 3])
def test_mixed_step_equals_its_two_forwards(built, rows):
    """Rows [0, n) decode and slot n takes a prompt chunk in one forward of the mixed-step graph: the same
    logits and the same cache as the decode step and the chunk run apart (learned positions included)."""
    backend = built.backend()
    backend.prepare_mixed_steps()
    assert backend.mixes_steps
    runs, session = [], backend._mixed_session
    backend._mixed_session = SimpleNamespace(io_binding=session.io_binding,
                                             run_with_iobinding=lambda b: runs.append(session.run_with_iobinding(b)))
    rows_prompts, long = prompts([7, 12, 5][:rows], seed=1), prompts([30], seed=2)[0]
    ids = np.array([[p[-1]] for p in rows_prompts])
    past = np.array([len(p) for p in rows_prompts])
    chunk = np.array([long[10:25]])
    caches = []
    for _ in range(2):
        cache = backend.allocate_cache(rows + 1, 64)
        for slot, p in enumerate(rows_prompts):
            backend.forward(cache, slot, np.array([p]), np.array([0]))
        backend.forward(cache, rows, np.array([long[:10]]), np.array([0]))
        caches.append(cache)
    mixed_rows, mixed_chunk = backend.forward_mixed(caches[0], ids, past, rows, chunk, 10)
    assert len(runs) == 1  # one forward, of the mixed graph
    apart_chunk = backend.forward(caches[1], rows, chunk, np.array([10]), last_only=True)
    apart_rows = backend.forward(caches[1], 0, ids, past)
    assert mixed_rows.shape == apart_rows.shape == (rows, 1, built.spec.vocab)
    assert mixed_chunk.shape == apart_chunk.shape == (1, 1, built.spec.vocab)
    # (0.0 on an AVX-512 host; the tolerance leaves room for another CPU's GEMM and GEMV rounding apart)
    np.testing.assert_allclose(mixed_rows, apart_rows, atol=ATOL)
    np.testing.assert_allclose(mixed_chunk, apart_chunk, atol=ATOL)
    np.testing.assert_allclose(caches[0].data, caches[1].data, atol=1e-5)  # both wrote the same keys/values
    assert np.abs(caches[0].data[:, :, rows, :, 10:25]).sum() > 0  # the chunk's positions were written
    with pytest.raises(RequestError, match=f"chunk slot 0 of rows \\[0, {rows}\\)"):
        backend.forward_mixed(caches[0], ids, past, 0, chunk, 10)


def test_a_mixed_step_its_validation_did_not_cover_is_not_used(built):
    passed = built.target.model_copy(update={"validation": ValidationSummary(status="passed")})
    dims = ModelDims(**{k: getattr(built.spec, k) for k in ModelDims.model_fields if hasattr(built.spec, k)})
    backend = OnnxBackend(built.artifact, passed, dims, threads=1).load()
    backend.prepare_mixed_steps()
    assert not backend.mixes_steps  # a chunk then runs as a forward of its own


def test_backend_registered():
    assert backend_class("onnx") is OnnxBackend


# -- numerics against HF ----------------------------------------------------------------------------
def test_prefill_logits_match_hf(built):
    backend = built.backend()
    for prompt in prompts([1, 9, 23]):
        cache = backend.allocate_cache(1, len(prompt))
        logits = backend.forward(cache, 0, np.array([prompt]), np.array([0]))
        assert logits.dtype == np.float32 and logits.shape == (1, len(prompt), built.spec.vocab)
        np.testing.assert_allclose(logits[0], hf_logits(built.hf, prompt), atol=ATOL, rtol=0)


def test_greedy_decode_matches_hf_generate(built):
    backend = built.backend()
    for prompt in prompts([5, 11], seed=1):
        tokens, _ = greedy(backend, prompt, built.eos)
        assert tokens == hf_greedy(built.hf, prompt)


def test_batched_decode_with_ragged_lengths(built):
    backend = built.backend()
    batch = prompts([4, 13, 8], seed=2)
    expected = [hf_greedy(built.hf, p) for p in batch]
    cache = backend.allocate_cache(3, 32)
    first = [int(backend.forward(cache, slot, np.array([p]), np.array([0]))[0, -1].argmax())
             for slot, p in enumerate(batch)]
    tokens = [[t] for t in first]
    past = np.array([len(p) for p in batch])
    for _ in range(NEW_TOKENS - 1):
        logits = backend.forward(cache, 0, np.array([[t[-1]] for t in tokens]), past)
        assert logits.shape == (3, 1, built.spec.vocab)
        for row, t in enumerate(tokens):
            t.append(int(logits[row, 0].argmax()))
        past = past + 1
    for got, want in zip(tokens, expected):  # HF stops at EOS; the batch keeps going
        assert got[:len(want)] == want


def test_cache_grows_mid_generation(built):
    backend = built.backend()
    prompt = prompts([250], seed=3)[0]
    tokens, cache = greedy(backend, prompt, built.eos, capacity=1)
    assert cache.version >= 1 and cache.capacity == 512  # 256 -> 512 while decoding
    assert tokens == hf_greedy(built.hf, prompt)


def test_multi_token_step_on_filled_cache(built):
    """Chunked prefill (n=1, S>1, past>0) and the batched form, which runs row by row."""
    backend = built.backend()
    full = prompts([20, 20, 18], seed=4)
    ref = [hf_logits(built.hf, ids) for ids in full]
    cache = backend.allocate_cache(3, 32)
    cut = [7, 10, 3]
    for slot, (ids, c) in enumerate(zip(full, cut)):
        backend.forward(cache, slot, np.array([ids[:c]]), np.array([0]))
    logits = backend.forward(cache, 1, np.array([full[1][10:15]]), np.array([10]))
    np.testing.assert_allclose(logits[0], ref[1][10:15], atol=ATOL, rtol=0)
    cut[1] = 15
    logits = backend.forward(cache, 0, np.array([ids[c:c + 3] for ids, c in zip(full, cut)]), np.array(cut))
    for row, c in enumerate(cut):
        np.testing.assert_allclose(logits[row], ref[row][c:c + 3], atol=ATOL, rtol=0)


def test_sliding_window_matches_hf(checkpoints, tmp_path):
    config = AutoConfig.from_pretrained(checkpoints["mistral"])
    config.sliding_window = 5
    b = build(checkpoints["mistral"], tmp_path, config)
    backend = b.backend()
    ids = prompts([14], seed=5)[0]
    ref = hf_logits(b.hf, ids)
    cache = backend.allocate_cache(1, 16)
    np.testing.assert_allclose(backend.forward(cache, 0, np.array([ids[:9]]), np.array([0]))[0], ref[:9], atol=ATOL)
    for k in range(9, 14):
        logits = backend.forward(cache, 0, np.array([[ids[k]]]), np.array([k]))
        np.testing.assert_allclose(logits[0, 0], ref[k], atol=ATOL, rtol=0)


def test_cuda_is_refused_clearly(built):
    dims = ModelDims(**{k: getattr(built.spec, k) for k in ModelDims.model_fields if hasattr(built.spec, k)})
    with pytest.raises(ValueError, match="cpu only"):
        OnnxBackend(built.artifact, built.target, dims, device="cuda").load()


# -- fast paths --------------------------------------------------------------------------------------
def test_last_only_logits_equal_the_full_last_row(built):
    backend = built.backend()
    assert backend.supports_last_only
    prompt = prompts([17], seed=6)[0]
    full = backend.forward(backend.allocate_cache(1, 32), 0, np.array([prompt]), np.array([0]))
    last = backend.forward(backend.allocate_cache(1, 32), 0, np.array([prompt]), np.array([0]), last_only=True)
    assert last.shape == (1, 1, built.spec.vocab)
    np.testing.assert_allclose(last[0, 0], full[0, -1], atol=1e-5, rtol=0)


def test_engine_fast_path_gives_the_full_logits_path_tokens(built):
    """The Engine's last-position-only prefill (default) and its keep_logits path pick the same greedy tokens."""
    from inferneo_runtime.generation import generate_ids
    from inferneo_runtime.sampling import SamplingParams

    backend = built.backend()
    batch = prompts([5, 19, 11, 2], seed=7)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    fast = generate_ids(backend, batch, params)
    simple = generate_ids(backend, batch, params, keep_logits=True)
    assert [o.token_ids for o in fast] == [o.token_ids for o in simple]
    assert [len(o.token_ids) for o in fast] == [NEW_TOKENS] * len(batch)


def test_chunked_head_matches_hf(checkpoints, tmp_path, monkeypatch):
    """A vocabulary-sized head is split into column chunks (bounded memory while ORT pre-packs it)."""
    import inferneo_build.exporters.onnx as onnx_exporter

    monkeypatch.setattr(onnx_exporter, "_HEAD_CHUNK_BYTES", 40_000)  # the tiny head is 64 x 512 floats: 4 chunks
    b = build(checkpoints["qwen2"], tmp_path)
    model = onnx.load(str(b.artifact / "model.onnx"), load_external_data=False)
    names = {n.name for n in model.graph.node}
    # the tiny qwen2 ties its head: Gemm(transB) over row ranges of the embedding
    assert {f"/lm_head/chunk.{i}/Gemm" for i in range(4)} <= names and "/lm_head/Concat" in names
    backend = b.backend()
    ids = prompts([12], seed=8)[0]
    logits = backend.forward(backend.allocate_cache(1, 16), 0, np.array([ids]), np.array([0]))
    np.testing.assert_allclose(logits[0], hf_logits(b.hf, ids), atol=ATOL, rtol=0)


def test_tied_head_is_stored_once(checkpoints, tmp_path):
    """A tied lm_head reads the embedding's own bytes in the data file (issue 21: it was stored twice)."""
    b = build(checkpoints["qwen2"], tmp_path)
    model = onnx.load(str(b.artifact / "model.onnx"), load_external_data=False)

    def extent(t):
        info = {e.key: e.value for e in t.external_data}
        return int(info.get("offset", 0)), int(info["length"])

    external = {t.name: extent(t) for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    start, length = external["model.embed_tokens.weight"]
    heads = [v for k, v in external.items() if k.startswith("lm_head.weight")]
    assert heads and all(start <= o and o + n <= start + length for o, n in heads)
    assert sum(n for _, n in heads) == length  # the whole table, once
    others = sum(n for k, (_, n) in external.items() if not k.startswith("lm_head.weight"))
    assert (b.artifact / "model.onnx.data").stat().st_size < others + 4096 * len(external)  # page alignment only
