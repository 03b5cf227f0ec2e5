"""`.pt2` target: the project's decoder (`exporters.torchscript.Decoder`) through torch.export and AOTInductor.

TorchScript's successor: `torch.export` captures the decoder as an ATen graph with every size dynamic, and
AOTInductor compiles it into a package (`model.pt2`) of generated C++ (or CUDA) kernels for the host's device.
The package is machine code for one torch minor and one device type, so the manifest records both and preflight
refuses a mismatch before loading.

Signature (`kv_layout: slot_major`):

    logits = model(input_ids[n, S], position_ids[n, S], attention_mask[n, T],
                   kv_cache[n, layers, 2, kv_heads, capacity, head_dim], logit_positions[K])

The cache is slot-major, not the TorchScript target's layer-major stack: a compiled graph assumes each input's
strides follow from its sizes, and the runtime passes slots [start, start + n) of a bigger cache, which are one
contiguous block only when the slot axis comes first. (Passed a layer-major slice, the compiled scatter writes
past the slice, into other requests' slots.) The graph writes the new keys/values into that block in place.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch
from torch import nn

from inferneo_runtime.manifest import IOSignature, TensorSpec

from . import ExportResult, TargetUnavailable
from .torchscript import Decoder, example_inputs, table_length
from .torchscript_reduced import DTYPES, ReducedDecoder

FILE_NAME = "model.pt2"


class SlotMajorDecoder(nn.Module):
    """The decoder over a slot-major cache [n, layers, 2, kv_heads, capacity, head_dim]; logits only (the cache
    is written in place, so returning it would only make the compiled graph copy it)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, position_ids, attention_mask, kv_cache, logit_positions):
        layer_major = kv_cache.permute(1, 2, 0, 3, 4, 5)  # a view: the decoder's writes land in kv_cache
        logits, _ = self.decoder(input_ids, position_ids, attention_mask, layer_major, logit_positions)
        return logits


def io_signature(spec, cache_dtype: str = "float32") -> IOSignature:
    cache = TensorSpec(name="kv_cache", dtype=cache_dtype,
                       shape=["batch", spec.num_layers, 2, spec.kv_heads, "capacity", spec.head_dim])
    return IOSignature(
        inputs=[
            TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"]),
            TensorSpec(name="position_ids", dtype="int64", shape=["batch", "sequence"]),
            TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "total_sequence"]),
            cache,
            TensorSpec(name="logit_positions", dtype="int64", shape=["logit_positions"]),
        ],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", "logit_positions", spec.vocab])],
        kv_layout="slot_major",
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
    device = torch.device(target.device)
    precision = getattr(target, "precision", "fp32")
    dtype = DTYPES.get(precision, torch.float32)
    path = Path(out_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        decoder = Decoder(spec, weights, table_length(spec, shapes)).eval()
        model = SlotMajorDecoder(ReducedDecoder(decoder, dtype) if precision != "fp32" else decoder).eval().to(device)
        example = list(example_inputs(spec, cache_dtype=dtype))
        example[3] = example[3].permute(2, 0, 1, 3, 4, 5).contiguous()
        example = tuple(t.to(device) for t in example)
        try:
            model(*[t.clone() for t in example])
        except RuntimeError as e:  # e.g. a kernel without this dtype on this host's torch build
            raise TargetUnavailable(f"torch {torch.__version__} cannot run the decoder in {precision} on "
                                    f"{target.device}: {str(e).splitlines()[0][:200]}") from None
        # every size dynamic: batch, step length, total length, capacity and the number of logit positions
        dynamic = torch.export.Dim.DYNAMIC
        dims = ({0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic},
                {0: dynamic, 4: dynamic}, {0: dynamic})
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
