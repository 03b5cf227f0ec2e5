"""Reduced-precision ONNX targets (`precision: int8 | int4 | fp16`), made from a float32 graph with
onnxruntime's own tools. The graph keeps its IO exactly (names, float32 logits and KV buffers), so the runtime's
ONNX backend runs it unchanged.

- int8: int8 weights. By default weight-only MatMulNBits (8-bit blocks of 32, activations int8 per block inside
  the kernel: `accuracy_level: 0` keeps them float32, closer but without a fast CPU kernel); `method: dynamic` uses `quantize_dynamic`
  (MatMulInteger, activations quantized per tensor on every call), which small LLMs with activation outliers do
  not survive (SmolLM2: perplexity +106%; it fails closed).
- int4: weight-only MatMulNBits, 4-bit blocks of `block_size` along the input axis, `accuracy_level` 4 = int8
  activations inside the MatMul. `algorithm`: `rtn` (onnxruntime's MatMulNBitsQuantizer; symmetric is the
  layout onnxruntime-genai ships), `hqq` (its half-quadratic optimizer: closer, minutes instead of seconds),
  `mse` (int4_mse.py) or `affine` (nbits.py: each block's range with a float minimum, llama.cpp's Q4_1).
  `head_bits: 8` keeps the output head at 8 bits.
- fp16: weights and compute in float16 (`onnxruntime.transformers.float16`), IO kept float32 by Casts at the
  graph edges; the RMSNorms written out in standard ops (q/k norms, norms on a branch's output) stay float32.
  Meant for GPU hosts (onnxruntime 1.32's CPU provider runs it, slowly); a host whose CPU provider cannot run
  the float16 graph raises TargetUnavailable (skippable with `optional: true`).
Only MatMuls are quantized: a Gather (the embedding, also a tied lm_head's weight) keeps its float32 table.
A MatMul whose input width K the block size does not divide (SmolLM2's 576 in blocks of 128) is quantized too:
ceil(K / block_size) blocks per column, the last one partial (MatMulNBits' own definition; every algorithm pads it).
The target's toolchain records what was done to every MatMul with a constant weight (`matmul_census`): how many
are quantized at which bits, and how many stay float32 and why (the recipe's `exclude`, or not quantized, with
the weight's shape).
The quantizers work on any float32 ONNX file, so encoder exports use them too.
"""
from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx import numpy_helper

from . import ExportResult, TargetUnavailable, TargetUnsupported

MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
_STAGE = ".fp32"  # the float32 graph is written here first, then removed


@contextmanager
def _quiet_quantizer():
    """onnxruntime's quantization modules configure the root logger when imported and log every node at INFO
    (and advice at WARNING on the root logger): silence them while they run, and leave the process's logging
    configuration as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:  # the import is what calls logging.basicConfig; do it before setting levels
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401
    except ImportError:  # needs onnx_ir (inferneo[build]); the int4 path reports it where it is used
        pass
    ours = logging.getLogger("onnxruntime.quantization")
    ours_level = ours.level
    root.setLevel(logging.ERROR)
    ours.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        ours.setLevel(ours_level)


def _matmuls(model: onnx.ModelProto, patterns: list[str]) -> list[str]:
    """Names of the MatMul nodes whose name contains any of `patterns`."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(p in n.name for p in patterns)]


def _save(model: onnx.ModelProto, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    path, data = out_dir / MODEL_NAME, out_dir / DATA_NAME
    for p in (path, data):
        p.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_NAME, size_threshold=1024)
    files = [path] + ([data] if data.is_file() else [])
    for f in files:
        os.chmod(f, 0o644)  # some onnx/ORT writers create 0600 files; artifacts are read by other users
    return [f.resolve() for f in files]


def _nbits(src: Path, bits: int, block_size: int, symmetric: bool, accuracy_level: int, exclude: list[str],
           algorithm: str = "rtn") -> onnx.ModelProto:
    """onnxruntime's MatMulNBitsQuantizer: round-to-nearest or HQQ."""
    with _quiet_quantizer():
        try:
            from onnxruntime.quantization import matmul_nbits_quantizer as nbits
        except ImportError as e:  # it needs onnx_ir
            from inferneo_runtime.errors import MissingExtraError

            raise MissingExtraError(f"{bits}-bit ONNX quantization", "build", e.name or "onnx_ir") from None
        model = onnx.load(str(src))
        algo = nbits.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits) if algorithm == "hqq" else None
        quantizer = nbits.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                               accuracy_level=accuracy_level, nodes_to_exclude=_matmuls(model, exclude),
                                               algo_config=algo)
        quantizer.process()
        return quantizer.model.model


HEAD = "/lm_head"  # the decoder exporters' output-head MatMuls: /lm_head, /lm_head/chunk.N
ROUTER = "/mlp/router"  # a mixture of experts' router MatMuls: /model/layers.N/mlp/router


def quantize_int4(src: Path, out_dir: Path, block_size: int = 32, symmetric: bool = True, accuracy_level: int = 4,
                  exclude: list[str] = (), algorithm: str = "rtn", head_bits: int = 4) -> list[Path]:
    """MatMulNBits 4-bit weight-only quantization of every MatMul with a constant weight (except `exclude`):
    round-to-nearest per block (`rtn`), half-quadratic optimization of scales and zero points (`hqq`), a
    least-squares scale search per block with integer zero points (`mse`, int4_mse.py), or each block's own
    range with a float minimum (`affine`, nbits.py; what a mostly 4-bit source holds at more bits, e.g. Q4_K_M's
    Q6_K tensors, in 8-bit affine blocks). `head_bits: 8` quantizes the output head to 8 bits (symmetric blocks
    of 32) instead."""
    exclude = list(exclude)
    skip = exclude + ([HEAD] if head_bits == 8 else [])  # an 8-bit head is quantized in a second pass
    if algorithm in ("mse", "affine"):
        from .int4_mse import mse_blocks
        from .nbits import affine_blocks, quantize_matmuls

        blocks = {"mse": mse_blocks, "affine": affine_blocks}[algorithm]
        model = onnx.load(str(src))
        finer = _finer_in_4_bit_source(model, skip) if algorithm == "affine" else set()

        def plan(name, w):
            if _named(name, skip):
                return None
            return affine_blocks(w, block_size, 8) if name in finer else blocks(w, block_size)

        model = quantize_matmuls(model, plan, block_size, accuracy_level)
    else:
        model = _nbits(src, 4, block_size, symmetric, accuracy_level, skip, algorithm)
    if head_bits == 8:
        from .nbits import quantize_matmuls, symmetric_blocks

        model = quantize_matmuls(model, lambda name, w: symmetric_blocks(w, 32, 8)
                                 if HEAD in name and not _named(name, exclude) else None, 32, accuracy_level)
    return _save(model, Path(out_dir))


def _finer_in_4_bit_source(model: onnx.ModelProto, skip: list[str]) -> set[str]:
    """The MatMuls that a mostly 4-bit source holds at more bits: a GGUF's Q4_K_M keeps attn_v and ffn_down in
    Q6_K (and other mixes Q5_x or Q8_0) where 4 bits lose too much. `affine` keeps those at 8 bits instead of
    re-rounding them to 4. Empty unless at least half of the MatMuls are on 4-bit grids (a float or Q8_0 source
    is quantized to 4 bits throughout, as asked)."""
    from .nbits import float_weight, source_grid

    inits = {i.name: i for i in model.graph.initializer}
    grids: dict[str, str] = {}
    for node in model.graph.node:
        weight = float_weight(node, inits)
        if weight is not None and not _named(node.name, skip):
            grids[node.name] = source_grid(numpy_helper.to_array(weight).T)
    if sum(g == "4-bit" for g in grids.values()) * 2 < len(grids):
        return set()
    return {name for name, grid in grids.items() if grid == "finer"}


def _named(name: str, patterns: list[str]) -> bool:
    return any(p in name for p in patterns)


def quantize_int8(src: Path, out_dir: Path, method: str = "weight_only", accuracy_level: int = 4,
                  exclude: list[str] = (), algorithm: str = "rtn") -> list[Path]:
    """int8 weights for every MatMul with a constant weight (except `exclude`): MatMulNBits 8-bit blocks of 32
    (`weight_only`: symmetric `rtn`, or `affine` blocks with the head symmetric) or onnxruntime's
    quantize_dynamic (`dynamic`, MatMulInteger, per-tensor activations)."""
    if method == "weight_only" and algorithm == "affine":
        from .nbits import affine_blocks, quantize_matmuls, symmetric_blocks

        def plan(name, w):
            if _named(name, list(exclude)):
                return None
            return symmetric_blocks(w, 32, 8) if HEAD in name else affine_blocks(w, 32, 8)

        return _save(quantize_matmuls(onnx.load(str(src)), plan, 32, accuracy_level), Path(out_dir))
    if method == "weight_only":
        return _save(_nbits(src, 8, 32, True, accuracy_level, list(exclude)), Path(out_dir))
    with _quiet_quantizer():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        names = _matmuls(onnx.load(str(src), load_external_data=False), list(exclude))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / ".quantized"
        tmp.mkdir(exist_ok=True)
        try:
            quantize_dynamic(src, tmp / MODEL_NAME, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             nodes_to_exclude=names, use_external_data_format=True,
                             # contrib ops (GroupQueryAttention, ...) have no ONNX shape inference: their outputs
                             # are float32, which is what the quantizer needs to know
                             extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
            files = _save(onnx.load(str(tmp / MODEL_NAME)), out_dir)  # one data file with a fixed name
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return files


def rms_norm_chains(model: onnx.ModelProto) -> list[list[str]]:
    """Node names of every RMSNorm written out in standard ops (exporters.onnx._rms_norm: the q/k norms, the norms
    on a branch's output, the first layer's), one list per norm: x * x, ReduceMean, Add eps, Sqrt, Reciprocal,
    x * rstd, and the Mul by its weight."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {i.name for i in model.graph.initializer}

    def only(tensor: str, op: str, also: str | None = None) -> onnx.NodeProto | None:
        found = [n for n in consumers.get(tensor, []) if n.op_type == op and (also is None or also in n.input)]
        return found[0] if len(found) == 1 else None

    chains = []
    for square in model.graph.node:
        if square.op_type != "Mul" or len(square.input) != 2 or square.input[0] != square.input[1]:
            continue
        x, chain, node = square.input[0], [square], square
        for op in ("ReduceMean", "Add", "Sqrt", "Reciprocal"):
            node = only(node.output[0], op)
            if node is None:
                break
            chain.append(node)
        else:
            normalize = only(node.output[0], "Mul", also=x)
            scale = normalize and only(normalize.output[0], "Mul")
            if scale is not None and any(i in weights for i in scale.input):
                chains.append([n.name for n in (*chain, normalize, scale)])
    return chains


def _float32_norms(model: onnx.ModelProto, chains: list[list[str]]) -> None:
    """In a float16 graph, compute each norm of `chains` (rms_norm_chains of its float32 graph) in float32: its input
    cast up, its eps and weight float32, its output cast back to float16."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    up: dict[str, str] = {}  # float16 initializer -> its float32 copy
    before: dict[str, onnx.NodeProto] = {}
    after: dict[str, onnx.NodeProto] = {}
    for chain in chains:
        nodes = [by_name[n] for n in chain]
        square, scale = nodes[0], nodes[-1]
        x = square.input[0]
        x32 = f"{square.name}/float32"
        before[square.name] = helper.make_node("Cast", [x], [x32], name=f"{square.name}/float32/Cast",
                                               to=TensorProto.FLOAT)
        for node in nodes:
            for k, name in enumerate(node.input):
                if name == x:
                    node.input[k] = x32
                elif name in inits and inits[name].data_type == TensorProto.FLOAT16:
                    if name not in up:
                        up[name] = f"{name}/float32"
                        array = numpy_helper.to_array(inits[name]).astype(np.float32)
                        graph.initializer.append(numpy_helper.from_array(array, up[name]))
                    node.input[k] = up[name]
        y = scale.output[0]
        scale.output[0] = f"{y}/float32"
        after[scale.name] = helper.make_node("Cast", [scale.output[0]], [y], name=f"{scale.name}/float16/Cast",
                                             to=TensorProto.FLOAT16)
    nodes = []
    for node in graph.node:
        nodes += [n for n in (before.get(node.name), node, after.get(node.name)) if n is not None]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def convert_fp16(src: Path, out_dir: Path) -> list[Path]:
    """Float16 weights and compute; float32 graph inputs and outputs. The RMSNorms written out in standard ops stay
    float32 (their input cast up, their output back), as transformers computes every norm: in float16, x * x overflows
    once |x| > 256 (Gemma 2/3 and OLMo 2 normalize each branch's output, Qwen3, Gemma 3 and OLMo 2 their queries and
    keys), and the norm returns x * 0. The fused Skip*Normalization ops are onnxruntime's own kernels."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    chains = rms_norm_chains(model)
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    _float32_norms(model, chains)
    return _save(model, Path(out_dir))


def check_runs_on_cpu(model_path: Path, precision: str) -> None:
    """Raise TargetUnavailable when onnxruntime's CPU provider cannot create a session for the graph."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # NOT_IMPLEMENTED / INVALID_GRAPH from the provider, as a plain onnxruntime error
        raise TargetUnavailable(f"the {precision} ONNX graph cannot run on onnxruntime {ort.__version__}'s CPU "
                                f"provider on this host ({str(e).splitlines()[0][:200]}); validate it where it runs, "
                                f"or mark the target `optional: true`") from None


def reduce_onnx(src: Path, out_dir: Path, target, keep_float: list[str] = ()) -> tuple[list[Path], dict, str]:
    """Write `target.precision`'s version of the float32 graph `src` into out_dir; MatMuls named by `keep_float`
    stay float32 besides the recipe's `exclude`. Returns (files, toolchain entries, weight dtype)."""
    import onnxruntime as ort

    precision = target.precision
    kept = ""
    if precision == "int4":
        o = target.int4 or _defaults("int4")
        files = quantize_int4(src, out_dir, o.block_size, o.symmetric, o.accuracy_level, [*o.exclude, *keep_float],
                              o.algorithm, o.head_bits)
        layout = {"hqq": "asymmetric", "mse": "asymmetric", "affine": "float minimum"}.get(
            o.algorithm, "symmetric" if o.symmetric else "asymmetric")
        method = (f"MatMulNBits bits=4 {o.algorithm} block_size={o.block_size} {layout} "
                  f"accuracy_level={o.accuracy_level}" + (", lm_head bits=8 symmetric" if o.head_bits == 8 else "")
                  + (", bits=8 where a mostly 4-bit source holds more bits" if o.algorithm == "affine" else ""))
        kept, dtype = [*o.exclude, *keep_float], "int4"
    elif precision == "int8":
        o = target.int8 or _defaults("int8")
        files = quantize_int8(src, out_dir, o.method, o.accuracy_level, [*o.exclude, *keep_float], o.algorithm)
        layout = "affine (float minimum), lm_head symmetric" if o.algorithm == "affine" else "symmetric"
        method = (f"MatMulNBits bits=8 block_size=32 {layout} accuracy_level={o.accuracy_level}"
                  if o.method == "weight_only" else "quantize_dynamic MatMulInteger per-tensor")
        kept, dtype = [*o.exclude, *keep_float], "int8"
    elif precision == "fp16":
        files = convert_fp16(src, out_dir)
        method, dtype = "float16 weights and compute, float32 IO", "float16"
    else:
        raise ValueError(f"onnx precision {precision!r} is not a reduced precision; known: int8, int4, fp16")
    if precision == "fp16":  # int8/int4 kernels exist on every CPU onnxruntime supports
        check_runs_on_cpu(files[0], precision)
    tool = {"onnxruntime_quantization": ort.__version__, "quantization": method}
    if precision != "fp16":
        tool.update(census_entries(matmul_census(onnx.load(str(files[0]), load_external_data=False), kept)))
    return files, tool, dtype


_QUANTIZED_OPS = ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul")


def matmul_census(model: onnx.ModelProto, exclude: list[str] = ()) -> dict:
    """What a reduced graph holds for each MatMul with a constant weight: {"quantized": {bits: count},
    "float32": {reason: [node names]}, "partial_block_k": sorted K values whose last block is partial}. The
    offset-correction MatMuls nbits.py adds beside an `affine` MatMulNBits are part of that node, not weights."""
    from onnx import helper

    from .nbits import correction_matmuls, nbits_node_name

    inits = {i.name: i for i in model.graph.initializer}
    quantized: dict[int, int] = {}
    partial: set[int] = set()
    helpers: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in _QUANTIZED_OPS:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits = attrs.get("bits", 8)
        quantized[bits] = quantized.get(bits, 0) + 1
        if node.op_type == "MatMulNBits":
            if attrs["K"] % attrs["block_size"]:
                partial.add(attrs["K"])
            matmul = node.name.removesuffix(nbits_node_name("", bits))  # the MatMul it replaced
            helpers |= set(correction_matmuls(matmul))
    floats: dict[str, list[str]] = {}
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT or node.name in helpers:
            continue
        patterns = [p for p in exclude if p in node.name]
        reason = (f"exclude: {', '.join(patterns)}" if patterns
                  else f"not quantized: weight {'x'.join(map(str, weight.dims))}")
        floats.setdefault(reason, []).append(node.name)
    return {"quantized": dict(sorted(quantized.items())), "float32": floats, "partial_block_k": sorted(partial)}


def census_entries(census: dict) -> dict[str, str]:
    """The census as toolchain strings: `quantized_matmuls` ("168 of 169: 144 at 4 bits, 24 at 8 bits", and the
    widths quantized with a partial last block), `float32_matmuls` ("1: /lm_head/MatMul (exclude: /lm_head)")."""
    n_quantized = sum(census["quantized"].values())
    n_float = sum(len(v) for v in census["float32"].values())
    text = f"{n_quantized} of {n_quantized + n_float}"
    if census["quantized"]:
        text += ": " + ", ".join(f"{n} at {bits} bits" for bits, n in census["quantized"].items())
    if census["partial_block_k"]:
        text += (f"; last block partial (zero-padded) where block_size does not divide K = "
                 f"{', '.join(map(str, census['partial_block_k']))}")
    out = {"quantized_matmuls": text}
    if n_float:
        def names(v):
            return ", ".join(v[:4]) + (f", ... ({len(v)} in all)" if len(v) > 4 else "")

        out["float32_matmuls"] = f"{n_float}: " + "; ".join(f"{names(v)} ({reason})"
                                                            for reason, v in census["float32"].items())
    return out


def _defaults(precision: str):
    from ..recipe import Int4Options, Int8Options

    return {"int4": Int4Options, "int8": Int8Options}[precision]()


def _expert_quantization(spec, target):
    """QMoE's layout for a mixture of experts' experts: int4 in the target's blocks, int8 per output row (its
    8-bit kernel is exact per row; in blocks it is not, as measured against the blocks' own weights)."""
    from .onnx import ExpertQuantization

    if target.precision == "int8":
        return ExpertQuantization(8, None)
    if target.precision != "int4":
        raise TargetUnsupported(f"mixture of experts: the onnx {target.precision} target is not built (onnxruntime's "
                                "MoE kernels take float32 or 4/8-bit experts); use int4, int8 or float32")
    block = (target.int4 or _defaults("int4")).block_size
    widths = {spec.hidden, spec.expert_intermediate}
    if any(k % block for k in widths):
        raise TargetUnsupported(f"mixture of experts: int4 experts in blocks of {block} need the hidden size and "
                                f"the experts' width ({spec.hidden}, {spec.expert_intermediate}) to be multiples of it")
    return ExpertQuantization(4, block)


def export_onnx_reduced(spec, weights, target, shapes, out_dir: Path) -> ExportResult:
    """The decoder's float32 graph (exporters.onnx), then reduced to the target's precision; same IO."""
    from dataclasses import replace

    from ..canonical_weights import head_matrix
    from .onnx import export_onnx
    from .onnx_mixed import write_mixed_graph

    experts = _expert_quantization(spec, target) if any(spec.moe_layers) else None
    out_dir = Path(out_dir)
    stage = out_dir / _STAGE
    if spec.tied:  # the quantizers reduce MatMuls: give the head its own [hidden, vocab] MatMul to quantize
        weights = {**weights, "lm_head.weight": head_matrix(spec, weights)}
        spec = replace(spec, tied=False)
    try:
        base = export_onnx(spec, weights, target, shapes, stage, experts)
        src = next(p for p in base.files if p.suffix == ".onnx")
        # a router quantized could pick other experts: the routing stays float32
        files, tool, dtype = reduce_onnx(src, out_dir, target, keep_float=[ROUTER] if experts else [])
        if experts:  # the bench's roofline counts the bytes of the experts a token reads
            tool["quantization"] += f", {experts.describe()}, router float32"
            tool["expert_bytes_per_parameter"] = f"{experts.bytes_per_parameter():g}"
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    mixed = write_mixed_graph(next(p for p in files if p.suffix == ".onnx"))
    files = [*files, *([mixed] if mixed else [])]
    return ExportResult(files=files, io=base.io, dtype=dtype, toolchain={**base.toolchain, **tool},
                        compatibility=dict(base.compatibility))
