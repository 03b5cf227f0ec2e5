"""The build pipeline: recipe → source → export each target → validate through the runtime → manifest →
atomic publish. Everything is written into a staging directory; nothing reaches the output path unless
every required target passed validation."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from inferneo_runtime.backends import backend_class
from inferneo_runtime.manifest import GenerationDefaults, Golden, ModelDims, ShapeBounds, TargetEntry, Tolerances
from inferneo_runtime.signing import sign_artifact
from inferneo_runtime.tokenizer import Tokenizer

from . import build_cache
from . import source as sources
from .architectures import DecoderSpec, UnsupportedArchitecture, decoder_spec
from .canonical_weights import canonical_weights
from .exporters import Exporter, exporter_for
from .pipeline import (BuildError, BuildResult, Progress, ValidationFailed, build_task,  # noqa: F401
                       dist_version, reference_label, toolchain_versions, validation_chart)
from .publish import check_output, staged
from .recipe import Recipe
from .evaluation import EvaluationReference
from .validate import TargetReport, compare_target, run_reference


class UnusableCheckpoint(BuildError):
    """The checkpoint cannot be compiled as given: weights missing for its model class, or a foreign tokenizer."""

    exit_code = 2


class ShapesExceedModel(BuildError):
    """The recipe's shapes.max_sequence is longer than the model's max_position_embeddings."""

    exit_code = 2

    def __init__(self, max_sequence: int, max_positions: int):
        super().__init__(f"shapes.max_sequence {max_sequence} exceeds the model's max_position_embeddings "
                         f"{max_positions}; set shapes.max_sequence to at most {max_positions} in the recipe")


class QuantizedCheckpoint(BuildError):
    """The source is already quantized (GPTQ, AWQ, bitsandbytes, ...): its packed weights cannot be exported."""

    exit_code = 2


def check_not_quantized(config, directory: Path) -> dict:
    """Refuse a quantized checkpoint, except MXFP4 (gpt-oss's release format: its experts in 4-bit floats with a
    power-of-two scale per 32), which transformers' own de-quantizer expands exactly. Returns the load options
    that do so."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return {}
    method = (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) or "unknown"
    method = getattr(method, "value", method)
    if method == "mxfp4":
        from transformers import Mxfp4Config

        # explicit, so a host with MXFP4 kernels (a GPU with triton) does not keep the experts packed
        return {"quantization_config": Mxfp4Config(dequantize=True)}
    raise QuantizedCheckpoint(
        f"{directory}: the checkpoint is quantized (quantization_config.quant_method={method}); Inferneo exports "
        "unquantized checkpoints only: float32/float16/bfloat16 weights as safetensors (or .bin with allow_pickle) "
        "(source.path or source.hf), MXFP4 (gpt-oss) or GGUF (source.gguf), both dequantized on load. Build from "
        "the original model and add a target with `precision: int4` or `precision: int8` to quantize it for "
        "deployment.")


def _generic_exporter() -> Exporter:
    from .generic import export_generic_torchscript
    return export_generic_torchscript


def _with_adapters(key: str, checkpoint) -> str:
    """Fold the adapters' hashes into the build key: the same base with other adapters is another build."""
    if not checkpoint.info.adapters:
        return key
    return hashlib.sha256((key + "".join(a.sha256 for a in checkpoint.info.adapters)).encode()).hexdigest()


def resolve_and_key(recipe: Recipe, log: Callable[[str], None] = lambda _: None):
    """(checkpoint, its LoRA adapters, build key): the recipe's source resolved (cached), its adapters read
    (pickled ones only with allow_pickle) and recorded in the checkpoint info, and the key build() looks up."""
    checkpoint = sources.resolve_checkpoint(recipe, log)
    adapters = []
    if recipe.source.adapters:
        from .lora import read_adapter

        adapters = [read_adapter(p, recipe.allow_pickle) for p in recipe.source.adapters]
        checkpoint = replace(checkpoint, info=checkpoint.info.model_copy(
            update={"adapters": [a.info for a in adapters]}))
    key = _with_adapters(build_cache.build_key(recipe, checkpoint, key_toolchain(recipe)), checkpoint)
    return checkpoint, adapters, key


def key_toolchain(recipe: Recipe) -> dict[str, str]:
    """What the build key hashes besides the recipe and the source: the toolchain versions and, for a recipe
    with tensorrt targets, the TensorRT version and the compute capabilities its engines are built for (an engine
    tuned on one GPU architecture is a different artifact from one tuned on another)."""
    out = toolchain_versions()
    trt = [t for t in recipe.targets if t.format == "tensorrt"]
    if trt:
        from .exporters import TargetUnavailable
        from .exporters.tensorrt import cuda_gpus, tensorrt_version

        try:
            out["tensorrt"] = tensorrt_version()
        except TargetUnavailable:
            out["tensorrt"] = "not installed"
        gpus = cuda_gpus()
        archs = {a for t in trt for a in t.gpu_archs}
        if any(not t.gpu_archs for t in trt):  # "the build host's first GPU"
            archs.add(gpus[0].compute_capability if gpus else "none")
        out["tensorrt_compute_capabilities"] = ",".join(sorted(archs))
    return out


def _eos_ids(root: Path, tokenizer: Tokenizer) -> list[int]:
    ids: list[int] = []
    gen = root / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids += value if isinstance(value, list) else ([value] if value is not None else [])
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return sorted(set(int(i) for i in ids))


def _dims(spec: DecoderSpec) -> ModelDims:
    sparse = sum(map(bool, getattr(spec, "moe_layers", ())))  # the generic path's spec has no routing fields
    moe = dict(experts=spec.experts, experts_per_token=spec.experts_per_token,
               expert_parameters=sparse * spec.experts * 3 * spec.hidden * spec.expert_intermediate) if sparse else {}
    return ModelDims(model_type=spec.model_type, family=spec.family, num_layers=spec.num_layers, hidden=spec.hidden,
                     heads=spec.heads, kv_heads=spec.kv_heads, head_dim=spec.head_dim, vocab=spec.vocab,
                     max_positions=spec.max_positions, tied_embeddings=bool(spec.tied), **moe)


def build(recipe: Recipe, output: Optional[Path] = None, progress: Optional[Progress] = None,
          recipe_text_sha256: Optional[str] = None, force: bool = False, cache: Optional[str] = None,
          sign_key: Optional[Path] = None) -> BuildResult:
    """Build `recipe` into `output`. Unless `force`, an output (or an entry in the `cache` s3:// prefix) built
    from the same build key is reused instead of rebuilt; a fresh build is pushed to `cache` when given."""
    progress = progress or Progress(quiet=True)
    output = Path(output or recipe.output_dir).absolute()
    check_output(output, force)  # before any work: never replace what is not an artifact
    if cache:  # a bad --cache or --sign is refused before the build, not after it published
        from inferneo_runtime.s3 import parse_uri

        parse_uri(cache)
    if sign_key:
        from inferneo_runtime.signing import load_private_key

        load_private_key(sign_key)
    t_start = time.perf_counter()

    with progress.step(f"resolve source ({next(iter(recipe.source.model_dump(exclude={'tokenizer'}).values()))})"):
        checkpoint, adapters, key = resolve_and_key(recipe, progress.log)

    if not force:
        hit = build_cache.reuse(key, output, cache, progress)
        if hit is not None:
            manifest, where = hit
            if sign_key:
                sign_artifact(output, sign_key)
            return BuildResult(output=output, manifest=manifest, seconds=time.perf_counter() - t_start, cached=where)

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint.directory, trust_remote_code=recipe.trust_remote_code)
    dequantize = check_not_quantized(config, checkpoint.directory)
    if recipe.is_encoder:
        from .encoder import EncoderTask, encoder_spec

        encoder = encoder_spec(config, recipe, checkpoint.directory)  # fails fast, before loading weights
        with progress.step("load reference model (PyTorch)"):
            model = encoder.load_model(checkpoint.directory, **sources.load_options(recipe))
            _merge(model, adapters, progress)

        def build_in(staging: Path) -> BuildResult:
            return build_task(EncoderTask(recipe, checkpoint, encoder, model), staging, recipe, checkpoint, progress,
                              recipe_text_sha256, key)
    else:
        try:
            spec = decoder_spec(config)  # fails fast on a bad setting, before loading weights
            generic_reason = None
        except UnsupportedArchitecture as e:  # no fused entry: transformers' own modeling code, validated alike
            spec, generic_reason = None, str(e)
        if spec is not None and recipe.shapes.max_sequence > spec.max_positions:
            raise ShapesExceedModel(recipe.shapes.max_sequence, spec.max_positions)

        with progress.step("load reference model (PyTorch)"):
            import torch
            from transformers import AutoModelForCausalLM

            # transformers' sdpa path drops attention soft-capping (Gemma 2): the reference then runs eager attention
            eager = {"attn_implementation": "eager"} if spec is not None and spec.attn_softcap is not None else {}
            model, loading = AutoModelForCausalLM.from_pretrained(
                checkpoint.directory, dtype=torch.float32, output_loading_info=True,
                **sources.load_options(recipe), **eager, **dequantize)
            if dequantize:  # transformers 4.57 leaves de-quantized MXFP4 experts in bfloat16 (exact: 4-bit floats)
                model = model.float()
                progress.log("MXFP4 experts de-quantized to float32 (transformers' own de-quantizer)")
            if loading.get("missing_keys"):  # transformers filled them with random values: nothing to compile
                missing = sorted(loading["missing_keys"])
                raise UnusableCheckpoint(f"{checkpoint.directory}: model_type {config.model_type!r} loaded as "
                                 f"{type(model).__name__} lacks {len(missing)} weight(s) in the checkpoint "
                                 f"({', '.join(missing[:4])}{', …' if len(missing) > 4 else ''}); "
                                 "is it a causal language model?")
            model.eval()
            _merge(model, adapters, progress)
            if spec is not None:
                weights = canonical_weights(spec, model.state_dict(), config=model.config)
            else:
                from .generic import generic_spec

                spec, weights = generic_spec(model, generic_reason), None
                progress.log(f"generic path for model_type {config.model_type!r} ({generic_reason}): "
                             "transformers' own modeling code, traced into the torchscript target")
                if recipe.shapes.max_sequence > spec.max_positions:
                    raise ShapesExceedModel(recipe.shapes.max_sequence, spec.max_positions)

        def build_in(staging: Path) -> BuildResult:
            return build_task(DecoderTask(recipe, checkpoint, spec, model, weights), staging, recipe, checkpoint,
                              progress, recipe_text_sha256, key)

    with staged(output, progress.step) as staging:
        result = build_in(staging)
        if sign_key:  # the signature goes in with the manifest, inside the atomic publish
            progress.log(f"signed with key {sign_artifact(staging, sign_key)}")
    if cache:
        with progress.step(f"store in build cache {cache}"):
            build_cache.store(key, output, cache)
    result.output = output
    result.seconds = time.perf_counter() - t_start
    return result


def _merge(model, adapters, progress: Progress) -> None:
    """Merge LoRA adapters into the reference model, so the reference and every export carry them."""
    if adapters:
        from .lora import merge_adapters

        modules = merge_adapters(model, adapters)
        progress.log(f"merged {len(adapters)} LoRA adapter(s) into {len(modules)} modules")


class DecoderTask:
    """The decoder task for `build_task`: greedy decodes of the validation prompts by the PyTorch model are the
    reference; float32 targets must reproduce its logits, reduced precisions stay within the recipe's tolerances."""

    def __init__(self, recipe: Recipe, checkpoint, spec: DecoderSpec, model, weights):
        self.recipe, self.checkpoint, self.spec, self.model, self.weights = recipe, checkpoint, spec, model, weights
        self.dims = _dims(spec)
        self.bounds = ShapeBounds(max_batch=recipe.shapes.max_batch, max_sequence=recipe.shapes.max_sequence)
        self.evaluation: Optional[EvaluationReference] = None

    def stage(self, staging: Path, progress: Progress) -> list[Path]:
        from .reference import TorchReference

        recipe, dims = self.recipe, self.dims
        root_files = sources.copy_root_files(self.checkpoint, staging)
        self.tokenizer = tokenizer = Tokenizer(staging)
        self.eos_ids = _eos_ids(staging, tokenizer)
        val = recipe.validation
        self.prompt_ids = prompt_ids = [tokenizer.encode(p) for p in val.prompts]
        for i, ids in enumerate(prompt_ids, 1):
            if not ids:  # nothing to condition the reference's decode on
                raise UnusableCheckpoint(f"validation.prompts.{i - 1}: {val.prompts[i - 1]!r} encodes to no tokens; "
                                         "give each validation prompt some text")
            if max(ids) >= dims.vocab:  # a tokenizer from another model: the reference would index past its table
                raise UnusableCheckpoint(f"validation prompt {i} encodes to token id {max(ids)}, but the checkpoint's vocabulary "
                                 f"has {dims.vocab} entries: its tokenizer belongs to another model")

        with progress.step(f"reference greedy decode ({len(prompt_ids)} prompts × {val.max_new_tokens} tokens)"):
            torch_reference = TorchReference(self.model, dims, self.bounds).load()
            self.reference = run_reference(torch_reference, prompt_ids, val.max_new_tokens, self.eos_ids)
        if any(getattr(t, "precision", "fp32") != "fp32" for t in recipe.targets):  # what reduced precisions are judged on
            with progress.step("reference logits over the evaluation text"):
                # its logits live in a temporary directory, removed by close() or when the object is collected
                self.evaluation = EvaluationReference.run(torch_reference, tokenizer, val, recipe.shapes.max_sequence)
        return root_files

    def export(self, target, out_dir: Path):
        if self.weights is None:  # no fused entry: every target takes the generic path
            return _generic_exporter()(self.spec, None, target, self.recipe.shapes, out_dir)
        if getattr(target, "path", "fused") == "generic":  # asked for, beside the fused targets
            from .generic import generic_spec

            return _generic_exporter()(generic_spec(self.model, "path: generic in the recipe"), None, target,
                                       self.recipe.shapes, out_dir)
        return exporter_for(target.format, getattr(target, "precision", "fp32"))(
            self.spec, self.weights, target, self.recipe.shapes, out_dir)

    def validate(self, name: str, target, entry: TargetEntry, staging: Path) -> tuple[TargetReport, dict]:
        val, precision = self.recipe.validation, getattr(target, "precision", "fp32")
        # float32 must reproduce the reference exactly; reduced precisions are held to stated tolerances
        tolerance = None if precision == "fp32" else Tolerances(**self.recipe.tolerance_for(target).model_dump(exclude={"cosine"}))
        # engines and cuda .pt2 packages are validated on the GPU that built them
        device = "cuda" if target.format == "tensorrt" or getattr(target, "device", "cpu") == "cuda" else "cpu"
        with backend_class(target.format)(staging, entry, self.dims, device=device, host_cache=False) as backend:
            report = compare_target(name, backend, val.prompts, self.prompt_ids, self.reference, val.max_new_tokens,
                                    val.logits_atol, self.eos_ids, tolerance=tolerance, precision=precision,
                                    evaluation=self.evaluation, kernel_path=_kernel_path(target, precision))
        update = {"validation": report.summary(val.max_new_tokens)}
        if tolerance is not None:  # its greedy tokens may differ from the reference's: record its own goldens
            update["goldens"] = [Golden(prompt=c.prompt, prompt_ids=ids, tokens=c.target_tokens)
                                 for c, ids in zip(report.prompts, self.prompt_ids)]
        return report, update

    def describe(self, report: TargetReport) -> str:
        return _describe_report(report, self.recipe.validation.logits_atol)

    def close(self) -> None:
        if self.evaluation is not None:
            self.evaluation.close()

    def validation(self, reports: list[TargetReport]) -> dict:
        evaluation = self.evaluation
        return {
            "reference": reference_label(self.checkpoint),
            "max_new_tokens": self.recipe.validation.max_new_tokens,
            "evaluation_text": None if evaluation is None else {
                "source": evaluation.label, "tokens": evaluation.tokens, "windows": len(evaluation.windows),
                "reference_perplexity": evaluation.reference.perplexity},
            "targets": [r.to_dict() for r in reports],
        }

    def manifest_fields(self) -> dict:
        prompts = self.recipe.validation.prompts
        return dict(
            architecture=self.spec.model_type, model=self.dims,
            generation=GenerationDefaults(eos_token_ids=self.eos_ids, bos_token_id=self.tokenizer.bos_id,
                                          pad_token_id=getattr(self.model.config, "pad_token_id", None)),
            goldens=[Golden(prompt=p, prompt_ids=ids, tokens=ref.token_ids)
                     for p, ids, ref in zip(prompts, self.prompt_ids, self.reference)])


def _kernel_path(target, precision: str) -> Optional[str]:
    """int8/int4 ONNX figures depend on which of onnxruntime's int8-activation CPU kernels ran them."""
    if target.format == "onnx" and precision in ("int8", "int4"):
        from inferneo_runtime.cpu_kernels import quantized_kernel_path

        return quantized_kernel_path()
    return None


def _describe_report(r: TargetReport, atol: float) -> str:
    diverged = sum(p.first_divergence is not None for p in r.prompts)
    tokens = "match" if not diverged else f"diverge on {diverged} prompts"
    if r.criterion == "exact":
        return f"{r.target}: max-abs logits error {r.max_abs_logits_error:.2e} (atol {atol:g}); greedy tokens {tokens}"
    tol = r.tolerance or {}
    ppl = "" if r.perplexity_delta is None else (f"; perplexity {r.perplexity:.3f} vs {r.reference_perplexity:.3f} "
                                                 f"({r.perplexity_delta:+.2%}, max +{tol.get('perplexity_delta', 0):.0%})")
    sample = f"{r.positions} positions" + (f", {r.evaluation_tokens} of them evaluation text" if r.evaluation_tokens else "")
    path = f"; measured on {r.kernel_path}" if r.kernel_path else ""
    return (f"{r.target} ({r.precision}): top-1 agreement {r.top1_agreement:.4f} (min {tol.get('top1_agreement', 0):g}) "
            f"over {sample}; mean KL {r.mean_kl:.4f} (max {tol.get('mean_kl', float('inf')):g}){ppl}; "
            f"greedy tokens {tokens}{path}")
