"""`.pt2` target: the project's decoder (`exporters.torch_decoder.Decoder`) through torch.export and AOTInductor.

TorchScript's successor: `torch.export` captures the decoder as an ATen graph with every size dynamic, and
AOTInductor compiles it into a package (`model.pt2`) of generated C++ (or CUDA) kernels for the host's device.
The package is machine code for one torch minor and one device type, so the manifest records both and preflight
refuses a mismatch before loading.

Signature (`kv_layout: stacked`, the runtime's whole cache):

    logits, kv_new = model(input_ids[n, S], position_ids[n, S], attention_mask[n, T],
                           kv_cache[layers, 2, slots, kv_heads, capacity, head_dim], logit_positions[K],
                           slot_offset[first_slot + 2])

The graph reads slots [first_slot, first_slot + n) of the cache and returns the step's keys/values,
kv_new [layers, 2, n, kv_heads, S, head_dim], which the runtime writes at position_ids. Two things a compiled
graph cannot do decide this shape:
- it assumes each input's strides follow from its sizes, so it is given the whole (contiguous) cache, not a
  slice; the first slot arrives as a *size* (slot_offset's length; +2 because export treats sizes 0 and 1 as
  constants), so slicing at it stays plain index arithmetic, with no data-dependent shape;
- written inside the graph, the in-place update of a view of an input became a copy of every layer's cache per
  call (150 ms per SmolLM2 decode step instead of 40); read-only, the attention matmuls read the cache directly.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch
from torch import nn

from inferneo_runtime.backends.pt2 import SLOT_OFFSET_BIAS
from inferneo_runtime.manifest import IOSignature, TensorSpec

from . import ExportResult, TargetUnavailable, TargetUnsupported
from .torch_decoder import Decoder, example_inputs, table_length, token_inputs
from .torchscript_reduced import DTYPES, ReducedDecoder

FILE_NAME = "model.pt2"


class SlotRangeDecoder(nn.Module):
    """The decoder (built with `writes_cache=False`) over slots [first_slot, first_slot + n) of the whole cache."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, position_ids, attention_mask, kv_cache, logit_positions, slot_offset):
        slots = kv_cache.narrow(2, slot_offset.shape[0] - SLOT_OFFSET_BIAS, input_ids.shape[0])  # a view, only read
        return self.decoder(input_ids, position_ids, attention_mask, slots, logit_positions)


def io_signature(spec, cache_dtype: str = "float32") -> IOSignature:
    cache = TensorSpec(name="kv_cache", dtype=cache_dtype,
                       shape=[spec.num_layers, 2, "slots", spec.kv_heads, "capacity", spec.head_dim])
    return IOSignature(
        inputs=[
            *token_inputs(),
            cache,
            TensorSpec(name="logit_positions", dtype="int64", shape=["logit_positions"]),
            TensorSpec(name="slot_offset", dtype="uint8", shape=["first_slot_plus_2"]),
        ],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", "logit_positions", spec.vocab]),
                 TensorSpec(name="kv_new", dtype=cache_dtype,
                            shape=[spec.num_layers, 2, "batch", spec.kv_heads, "sequence", spec.head_dim])],
        kv_layout="stacked",
    )


def _compiler() -> str:
    """The C++ compiler AOTInductor calls (its first line of `--version`), for the manifest."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return "none"
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return cxx


def export_pt2(spec, weights, target, shapes, out_dir: Path) -> ExportResult:
    """Export, compile and package the decoder into `out_dir/model.pt2` for `target.device`."""
    if target.device == "cuda" and not torch.cuda.is_available():
        raise TargetUnavailable(f"a cuda .pt2 target is compiled on a CUDA GPU; torch {torch.__version__} sees none "
                                "on this host (build it on the GPU host, or use device: cpu)")
    if target.device == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        raise TargetUnavailable("AOTInductor compiles the .pt2 target with a C++ compiler; none (g++ or c++) is on "
                                "PATH (apt install g++)")
    if any(spec.moe_layers):
        raise TargetUnsupported("mixture of experts: torch.export traces the experts' grouped matmul only in bfloat16 "
                                f"(torch {torch.__version__}); the onnx and torchscript targets take this model")
    device = torch.device(target.device)
    precision = getattr(target, "precision", "fp32")
    dtype = DTYPES.get(precision, torch.float32)
    path = Path(out_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        decoder = Decoder(spec, weights, table_length(spec, shapes.max_sequence), writes_cache=False).eval()
        model = SlotRangeDecoder(ReducedDecoder(decoder, dtype) if precision != "fp32" else decoder).eval().to(device)
        example = list(example_inputs(spec, cache_dtype=dtype))
        # a cache of more slots than the batch, the batch at slot 1: slots, batch and offset all differ
        layers, two, n, *tail = example[3].shape
        example[3] = torch.zeros(layers, two, n + 3, *tail, dtype=dtype)
        example.append(torch.empty(1 + SLOT_OFFSET_BIAS, dtype=torch.uint8))
        example = tuple(t.to(device) for t in example)
        try:
            model(*[t.clone() for t in example])
        except RuntimeError as e:  # e.g. a kernel without this dtype on this host's torch build
            raise TargetUnavailable(f"torch {torch.__version__} cannot run the decoder in {precision} on "
                                    f"{target.device}: {str(e).splitlines()[0][:200]}") from None
        # every size dynamic: batch, step length, total length, cache slots and capacity, logit positions, first slot
        dynamic = torch.export.Dim.DYNAMIC
        dims = ({0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic},
                {2: dynamic, 4: dynamic}, {0: dynamic}, {0: dynamic})
        program = torch.export.export(model, example, dynamic_shapes=dims, strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    dtype_name = str(dtype).removeprefix("torch.")
    toolchain = {"torch": torch.__version__, "device": target.device, "compiler": _compiler()}
    compatibility = {"device": target.device}
    if target.device == "cpu":  # inductor's vector ISA: the package's kernels need it on the deploy host's CPU
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = str(pick_vec_isa())  # "" when inductor found no vector ISA: plain C++ runs anywhere
        if isa:
            compatibility["cpu_isa"] = isa
    if target.device == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        toolchain["cuda"] = str(torch.version.cuda)
        compatibility["cuda_arch"] = f"{major}.{minor}"
    if precision != "fp32":
        toolchain |= {"compute_dtype": dtype_name, "kv_cache": dtype_name}
    return ExportResult(files=[path.resolve()], io=io_signature(spec, cache_dtype=dtype_name), dtype=dtype_name,
                        toolchain=toolchain, compatibility=compatibility)
