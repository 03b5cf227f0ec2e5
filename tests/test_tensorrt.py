"""The TensorRT target's CPU-testable parts: the standard-ops ONNX graph it builds engines from, the runtime
backend's step logic (KV binding, new-token scatter, profile choice) driven through ONNX Runtime in place of
an engine, and the exporter's refusals on a host without TensorRT or the requested GPUs.

What needs TensorRT and a GPU (the Polygraphy build, deserialize, execute_async_v3) is in tests/test_gpu.py.
"""
from __future__ import annotations

import importlib.machinery
import shutil
import sys
import types

import numpy as np
import onnx
import pytest
import torch

from inferneo_build.exporters import TargetUnavailable
from inferneo_build.exporters import tensorrt as trt_export
from inferneo_runtime.backends.tensorrt import TensorRTBackend, engine_for
from inferneo_runtime.generation import GenerationParams, generate_ids
from inferneo_runtime.manifest import ShapeBounds, TargetEntry, ValidationSummary, file_entry, read_manifest

_TORCH_DTYPES = {"int64": torch.int64, "float32": torch.float32, "float16": torch.float16}


def _spec_and_weights(checkpoint):
    from transformers import AutoConfig, AutoModelForCausalLM

    from inferneo_build.architectures import decoder_spec
    from inferneo_build.canonical_weights import canonical_weights

    spec = decoder_spec(AutoConfig.from_pretrained(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return spec, canonical_weights(spec, model.state_dict())


class OrtEngine(TensorRTBackend):
    """The TensorRT backend with ONNX Runtime (CPU) running the graph the engine would be built from.

    Everything but `_load_impl`, `_on_stream` and `_execute` is the real backend's code."""

    def _load_impl(self) -> None:
        import onnxruntime as ort

        io = self.target.io
        self._device = torch.device("cpu")
        self._session = ort.InferenceSession(str(self.model_file(".onnx")), providers=["CPUExecutionProvider"])
        self._dtypes = {t.name: _TORCH_DTYPES[t.dtype] for t in io.inputs + io.outputs}
        self._kv_names = [(io.kv_input.format(l, kv), io.kv_output.format(l, kv))
                          for l in range(self.dims.num_layers) for kv in ("key", "value")]
        self._cache_dtype = self._dtypes[self._kv_names[0][0]]
        b, s = self.target.shapes.max_batch, self.target.shapes.max_sequence
        self._profiles = [((1, 1), (b, 1)), ((1, 2), (b, s))]  # what profile_shapes() declares
        self.engine_path = self.model_file(".onnx")
        self.profiles_used: list[int] = []

    def _close_impl(self) -> None:
        self._session = None

    def _on_stream(self):
        return torch.inference_mode()

    def _execute(self, profile, inputs, outputs) -> None:
        self.profiles_used.append(profile)
        for name, t in inputs.items():
            assert t.dtype == self._dtypes[name] and t.is_contiguous(), name  # what TensorRT would be given
        for name, t in inputs.items():  # 256-byte aligned in place, or a fresh (CUDA: aligned) allocation
            assert t.data_ptr() % 256 == 0 or t.data_ptr() == t.untyped_storage().data_ptr(), name
        for name, t in outputs.items():  # views into the staging buffer start 256 bytes apart
            assert (t.data_ptr() - t.untyped_storage().data_ptr()) % 256 == 0, name
        results = self._session.run(list(outputs), {name: t.numpy() for name, t in inputs.items()})
        for t, array in zip(outputs.values(), results):
            t.copy_(torch.from_numpy(array))


def _trt_target(artifact, tmp_path, model_type, tiny_checkpoint, precision="fp32", max_sequence=None):
    """A copy of the tiny artifact with a `tensorrt` entry whose files are the exporter's ONNX graph."""
    root = tmp_path / "art"
    shutil.copytree(artifact, root)
    manifest = read_manifest(root)
    spec, weights = _spec_and_weights(tiny_checkpoint(model_type))
    shapes = manifest.targets["onnx"].shapes
    shapes = shapes.model_copy(update={"max_sequence": max_sequence or shapes.max_sequence})
    onnx_path = trt_export.OnnxFromDecoder(spec, weights, shapes.max_sequence, precision,
                                           root / "tensorrt" / trt_export.ONNX_NAME)()
    files = [root / "tensorrt" / trt_export.ONNX_NAME, root / "tensorrt" / trt_export.DATA_NAME]
    entry = TargetEntry(format="tensorrt", status="valid", files=[file_entry(root, f) for f in files],
                        dtype=trt_export.PRECISION_DTYPES[precision], io=trt_export.io_signature(spec, precision),
                        shapes=ShapeBounds(max_batch=shapes.max_batch, max_sequence=shapes.max_sequence),
                        validation=ValidationSummary(status="skipped"))
    return root, manifest, entry, onnx_path


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "mistral"])
def test_graph_uses_standard_ops_with_dynamic_shapes(model_type, tiny_artifact, tiny_checkpoint, tmp_path):
    _, _, entry, onnx_path = _trt_target(tiny_artifact(model_type), tmp_path, model_type, tiny_checkpoint)
    model = onnx.load(onnx_path, load_external_data=False)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # no com.microsoft: TensorRT parses it
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"}.isdisjoint(n.op_type for n in model.graph.node)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)}
    for t in entry.io.inputs + entry.io.outputs:  # the manifest's IO is the graph's IO
        assert dims[t.name] == t.shape, t.name
    assert [i.name for i in model.graph.input] == [t.name for t in entry.io.inputs]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "mistral"])
def test_backend_step_logic_reproduces_goldens(model_type, tiny_artifact, tiny_checkpoint, tmp_path):
    """The backend's binding + scatter, over the exporter's graph, gives the reference's greedy tokens,
    one prompt at a time and all prompts batched (slots compacted as sequences finish)."""
    root, manifest, entry, _ = _trt_target(tiny_artifact(model_type), tmp_path, model_type, tiny_checkpoint)
    goldens = manifest.goldens
    with OrtEngine(root, entry, manifest.model) as backend:
        for g in goldens:
            out = generate_ids(backend, [g.prompt_ids], GenerationParams(max_new_tokens=len(g.tokens)))[0]
            assert out.token_ids == g.tokens, g.prompt
        batched = generate_ids(backend, [g.prompt_ids for g in goldens],
                               [GenerationParams(max_new_tokens=len(g.tokens) - i) for i, g in enumerate(goldens)])
        for i, (g, out) in enumerate(zip(goldens, batched)):
            assert out.token_ids == g.tokens[:len(g.tokens) - i], g.prompt
        assert set(backend.profiles_used) == {0, 1}  # prefill ran on the prefill profile, decode on decode


def test_unaligned_cache_slots_are_copied(tiny_artifact, tiny_checkpoint, tmp_path):
    """max_sequence 127: a slot is 127 positions × 128 bytes, so most slot ranges do not start 256-byte aligned;
    the backend hands TensorRT an aligned copy of those (read-only) inputs and the results stay right."""
    root, manifest, entry, _ = _trt_target(tiny_artifact("llama"), tmp_path, "llama", tiny_checkpoint, max_sequence=127)
    goldens = manifest.goldens
    with OrtEngine(root, entry, manifest.model) as backend:
        cache = backend.allocate_cache(3, 100)
        assert cache.capacity == 127 and (cache.data[0, 1, 0:3].data_ptr() - cache.data.data_ptr()) % 256 != 0
        outs = generate_ids(backend, [g.prompt_ids for g in goldens], GenerationParams(max_new_tokens=8))
    assert [o.token_ids for o in outs] == [g.tokens[:8] for g in goldens]


def test_backend_logits_match_onnx_target(tiny_artifact, tiny_checkpoint, tmp_path):
    from inferneo_runtime.backends import backend_class

    root, manifest, entry, _ = _trt_target(tiny_artifact("llama"), tmp_path, "llama", tiny_checkpoint)
    ids = manifest.goldens[0].prompt_ids
    params = GenerationParams(max_new_tokens=8)
    with OrtEngine(root, entry, manifest.model) as backend:
        ours = generate_ids(backend, [ids], params, keep_logits=True)[0]
    with backend_class("onnx")(root, manifest.targets["onnx"], manifest.model) as onnx_backend:
        ref = generate_ids(onnx_backend, [ids], params, keep_logits=True)[0]
    assert ours.token_ids == ref.token_ids
    assert np.abs(ours.prompt_logits - ref.prompt_logits).max() < 1e-4
    assert max(np.abs(a - b).max() for a, b in zip(ours.step_logits, ref.step_logits)) < 1e-4


def test_fp16_graph_keeps_a_half_cache(tiny_artifact, tiny_checkpoint, tmp_path):
    root, manifest, entry, onnx_path = _trt_target(tiny_artifact("llama"), tmp_path, "llama", tiny_checkpoint, "fp16")
    model = onnx.load(onnx_path, load_external_data=False)
    types_ = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert types_["past_key_values.0.key"] == types_["present.1.value"] == onnx.TensorProto.FLOAT16
    assert types_["logits"] == onnx.TensorProto.FLOAT and types_["input_ids"] == onnx.TensorProto.INT64
    g = manifest.goldens[0]
    with OrtEngine(root, entry, manifest.model) as backend:
        cache = backend.allocate_cache(1, 64)
        assert cache.data.dtype == torch.float16
        out = generate_ids(backend, [g.prompt_ids], GenerationParams(max_new_tokens=4), keep_logits=True)[0]
    assert out.prompt_logits.dtype == np.float32 and np.isfinite(out.prompt_logits).all()
    assert out.token_ids[0] == g.tokens[0]


def test_profiles_cover_the_recipe_bounds():
    from inferneo_build.recipe import Shapes

    spec = types.SimpleNamespace(kv_heads=3, head_dim=64, num_layers=2)
    decode, prefill = trt_export.profile_shapes(spec, Shapes(max_batch=8, max_sequence=2048))
    assert decode["input_ids"] == {"min": [1, 1], "opt": [8, 1], "max": [8, 1]}
    assert prefill["input_ids"] == {"min": [1, 2], "opt": [1, 128], "max": [8, 2048]}
    assert decode["attention_mask"]["max"] == [8, 2048] and prefill["attention_mask"]["min"] == [1, 2]
    assert decode["past_key_values.1.value"] == {"min": [1, 3, 1, 64], "opt": [8, 3, 512, 64], "max": [8, 3, 2048, 64]}
    assert set(decode) == set(prefill) == {"input_ids", "position_ids", "attention_mask"} | {
        f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
    small = trt_export.profile_shapes(spec, Shapes(max_batch=1, max_sequence=16))[1]
    assert small["input_ids"] == {"min": [1, 2], "opt": [1, 16], "max": [1, 16]}  # opt clipped to the bounds


# -- refusals on a host without TensorRT / the GPUs ----------------------------------------------------------
L4 = trt_export.GPU(0, "NVIDIA L4", "8.9")
A100 = trt_export.GPU(1, "NVIDIA A100-SXM4-80GB", "8.0")


def test_gpu_archs_need_those_gpus_here():
    assert trt_export.build_devices([], [L4, A100]) == [L4]
    assert trt_export.build_devices(["8.0", "8.9", "8.0"], [L4, A100]) == [A100, L4]
    with pytest.raises(TargetUnavailable) as info:
        trt_export.build_devices(["8.0", "9.0"], [L4, A100])
    msg = str(info.value)
    assert "9.0" in msg and "NVIDIA L4 (compute capability 8.9)" in msg and "8.0" not in msg.split("but")[0]
    with pytest.raises(TargetUnavailable, match="no CUDA GPU"):
        trt_export.build_devices(["9.0"], [])


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """A `tensorrt` module that imports (as on a host with the wheel installed) but has no builder to reach."""
    module = types.ModuleType("tensorrt")
    module.__version__ = "10.9.0.34"
    module.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo looks modules up by spec
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def _export_args(tiny_checkpoint, **target_fields):
    from inferneo_build.recipe import Shapes, TensorRTTarget

    spec = types.SimpleNamespace()  # the exporter refuses before it looks at the model
    return spec, {}, TensorRTTarget(format="tensorrt", **target_fields), Shapes(max_batch=2, max_sequence=64)


def test_exporter_without_tensorrt(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, whatever is installed
    with pytest.raises(TargetUnavailable, match="TensorRT is not installed.*inferneo\\[tensorrt\\]"):
        trt_export.export_tensorrt(*_export_args(tiny_checkpoint), tmp_path / "tensorrt")
    assert not (tmp_path / "tensorrt").exists()  # nothing written, no fake engine


def test_exporter_without_gpu(tmp_path, tiny_checkpoint, fake_tensorrt):
    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA GPU")
    with pytest.raises(TargetUnavailable, match=r"no CUDA GPU on this host \(torch .*(CPU-only build|sees no CUDA)"):
        trt_export.export_tensorrt(*_export_args(tiny_checkpoint), tmp_path / "tensorrt")
    assert not (tmp_path / "tensorrt").exists()


def test_exporter_with_other_gpus(tmp_path, tiny_checkpoint, fake_tensorrt, monkeypatch):
    monkeypatch.setattr(trt_export, "cuda_gpus", lambda: [L4])
    with pytest.raises(TargetUnavailable, match="compute capability 8.0, 9.0, but this host has cuda:0 NVIDIA L4"):
        trt_export.export_tensorrt(*_export_args(tiny_checkpoint, gpu_archs=["8.0", "9.0"]), tmp_path / "tensorrt")
    assert not (tmp_path / "tensorrt").exists()


def test_engine_choice_names_what_exists():
    from inferneo_runtime.errors import InferneoError
    from inferneo_runtime.manifest import FileEntry

    entry = TargetEntry(format="tensorrt", status="valid", validation=ValidationSummary(status="passed"),
                        files=[FileEntry(path=f"tensorrt/model.sm{a}.plan", sha256="0" * 64, size=1) for a in ("80", "89")],
                        compatibility={"engines": [{"file": "model.sm80.plan", "compute_capability": "8.0", "gpu": "A100"},
                                                   {"file": "model.sm89.plan", "compute_capability": "8.9", "gpu": "L4"}]})
    assert engine_for(entry, "8.9") == "tensorrt/model.sm89.plan"
    bare = entry.model_copy(update={"compatibility": {}, "files": entry.files[:1]})  # a served model.plan
    assert engine_for(bare, "9.0") == "tensorrt/model.sm80.plan"
    with pytest.raises(InferneoError, match=r"compute capability 9.0.*8.0 \(A100\), 8.9 \(L4\)"):
        engine_for(entry, "9.0")


def test_backend_without_tensorrt_names_the_extra(tiny_artifact, tiny_checkpoint, tmp_path, monkeypatch):
    from inferneo_runtime.errors import InferneoError, MissingExtraError

    root, manifest, entry, _ = _trt_target(tiny_artifact("llama"), tmp_path, "llama", tiny_checkpoint)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    for device in ("cuda", "cpu"):  # the missing extra first: `inferneo validate` reports it as unavailable
        with pytest.raises(MissingExtraError, match=r"TensorRT engines needs the 'tensorrt' package.*inferneo\[tensorrt\]"):
            TensorRTBackend(root, entry, manifest.model, device=device).load()
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(InferneoError, match="TensorRT engines run on CUDA GPUs only; asked for device 'cpu'"):
        TensorRTBackend(root, entry, manifest.model, device="cpu").load()


def test_build_key_covers_tensorrt_version_and_gpu_archs(tiny_checkpoint, fake_tensorrt, monkeypatch):
    """The build cache must not hand out an engine tuned for another GPU architecture or TensorRT release."""
    from inferneo_build import build_cache
    from inferneo_build.build import key_toolchain
    from inferneo_build.recipe import Recipe
    from inferneo_build.source import resolve_checkpoint as resolve

    def recipe(**trt):
        return Recipe.model_validate({"name": "t", "source": {"path": str(tiny_checkpoint("llama"))},
                                      "targets": [{"format": "onnx"}, {"format": "tensorrt", "optional": True, **trt}],
                                      "validation": {"prompts": ["hi"]}})

    monkeypatch.setattr(trt_export, "cuda_gpus", lambda: [L4])
    checkpoint = resolve(recipe())

    def key(r):
        return build_cache.build_key(r, checkpoint, key_toolchain(r))

    host_gpu = key_toolchain(recipe())
    assert host_gpu["tensorrt"] == "10.9.0.34" and host_gpu["tensorrt_compute_capabilities"] == "8.9"
    assert key_toolchain(recipe(gpu_archs=["9.0", "8.0"]))["tensorrt_compute_capabilities"] == "8.0,9.0"
    assert key(recipe(gpu_archs=["8.9"])) != key(recipe(gpu_archs=["9.0"]))
    before = key(recipe())
    fake_tensorrt.__version__ = "10.13.0.35"
    assert key(recipe()) != before
    monkeypatch.setattr(trt_export, "cuda_gpus", lambda: [A100])  # same recipe, another build host's GPU
    assert key(recipe()) != key(recipe(gpu_archs=["8.9"]))
    # recipes without tensorrt targets do not depend on TensorRT or the GPU at all
    plain = Recipe.model_validate({"name": "t", "source": {"path": str(tiny_checkpoint("llama"))},
                                   "targets": [{"format": "onnx"}], "validation": {"prompts": ["hi"]}})
    assert "tensorrt" not in key_toolchain(plain)


def test_reduced_precision_engines_are_judged_by_tolerances():
    """fp16/bf16 engines are validated like other reduced-precision targets, not held to float32 exactness."""
    from inferneo_build.recipe import DEFAULT_TOLERANCES, Recipe

    r = Recipe.model_validate({"name": "t", "source": {"path": "."}, "validation": {"prompts": ["hi"]}, "targets": [
        {"format": "tensorrt"}, {"format": "tensorrt", "name": "trt-bf16", "precision": "bf16",
                                  "tolerance": {"top1_agreement": 0.9}}]})
    fp16, bf16 = r.targets
    assert fp16.reduced and r.tolerance_for(fp16) == DEFAULT_TOLERANCES["fp16"]
    assert r.tolerance_for(bf16).top1_agreement == 0.9 and r.tolerance_for(bf16).mean_kl == DEFAULT_TOLERANCES["bf16"].mean_kl
