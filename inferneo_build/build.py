"""The build pipeline: recipe → source → export each target → validate through the runtime → manifest →
atomic publish. Everything is written into a staging directory; nothing reaches the output path unless
every required target passed validation."""
from __future__ import annotations

import json
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Optional

from inferneo_runtime.backends import backend_class
from inferneo_runtime.manifest import (MANIFEST_NAME, SCHEMA_VERSION, VALIDATION_NAME, GenerationDefaults, Golden,
                                       Manifest, ModelDims, ShapeBounds, TargetEntry, ValidationSummary, file_entry)
from inferneo_runtime.signing import sign_artifact
from inferneo_runtime.tokenizer import Tokenizer

from . import build_cache
from . import source as sources
from .architectures import DecoderSpec, canonical_weights, decoder_spec
from .exporters import TargetUnavailable, exporter_for
from .publish import publish, staging_dir
from .recipe import Recipe
from .validate import TargetReport, compare_target, run_reference


class BuildError(RuntimeError):
    exit_code = 1


class ValidationFailed(BuildError):
    """A required target did not match the reference; nothing was published."""

    exit_code = 7

    def __init__(self, message: str, reports: list[TargetReport]):
        super().__init__(message)
        self.reports = reports

    @property
    def details(self) -> list[dict]:
        return [{"target": r.target, "passed": r.passed, "reason": r.reason,
                 "max_abs_logits_error": r.max_abs_logits_error, "logits_atol": r.logits_atol,
                 "first_divergence": [p.first_divergence for p in r.prompts]} for r in self.reports]


@dataclass
class BuildResult:
    output: Path
    manifest: Manifest
    reports: list[TargetReport] = field(default_factory=list)
    seconds: float = 0.0
    cached: Optional[str] = None  # "output" or the cache URI when nothing was rebuilt


class Progress:
    """Step-by-step progress on stderr; `quiet` for library use."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, quiet=quiet)

    def log(self, message: str) -> None:
        self.console.print(f"  [dim]{message}[/dim]")

    @contextmanager
    def step(self, message: str):
        t0 = time.perf_counter()
        with self.console.status(message):
            yield
        self.console.print(f"[green]✓[/green] {message} [dim]({time.perf_counter() - t0:.1f}s)[/dim]")


def toolchain_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "inferneo": _version("inferneo")}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy"):
        out[dist] = _version(dist)
    return out


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


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
    return ModelDims(model_type=spec.model_type, family=spec.family, num_layers=spec.num_layers, hidden=spec.hidden,
                     heads=spec.heads, kv_heads=spec.kv_heads, head_dim=spec.head_dim, vocab=spec.vocab,
                     max_positions=spec.max_positions)


def build(recipe: Recipe, output: Optional[Path] = None, progress: Optional[Progress] = None,
          recipe_text_sha256: Optional[str] = None, force: bool = False, cache: Optional[str] = None,
          sign_key: Optional[Path] = None) -> BuildResult:
    """Build `recipe` into `output`. Unless `force`, an output (or an entry in the `cache` s3:// prefix) built
    from the same build key is reused instead of rebuilt; a fresh build is pushed to `cache` when given."""
    progress = progress or Progress(quiet=True)
    output = Path(output or recipe.output_dir).absolute()
    t_start = time.perf_counter()

    with progress.step(f"resolve source ({next(iter(recipe.source.model_dump(exclude={'tokenizer'}).values()))})"):
        checkpoint = sources.resolve(recipe, progress.log)
    key = build_cache.build_key(recipe, checkpoint, toolchain_versions())

    if not force:
        hit = build_cache.reuse(key, output, cache, progress)
        if hit is not None:
            manifest, where = hit
            if sign_key:
                sign_artifact(output, sign_key)
            return BuildResult(output=output, manifest=manifest, seconds=time.perf_counter() - t_start, cached=where)

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint.directory, trust_remote_code=False)
    spec = decoder_spec(config)  # fails fast on an unsupported architecture, before loading weights
    if recipe.shapes.max_sequence > spec.max_positions:
        raise BuildError(f"shapes.max_sequence {recipe.shapes.max_sequence} exceeds the model's "
                         f"max_position_embeddings {spec.max_positions}")

    with progress.step("load reference model (PyTorch)"):
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint.directory, dtype=torch.float32, trust_remote_code=False)
        model.eval()
        weights = canonical_weights(spec, model.state_dict())

    staging = staging_dir(output)
    try:
        result = _build_in(staging, recipe, checkpoint, spec, model, weights, progress, recipe_text_sha256, key)
        if sign_key:  # the signature goes in with the manifest, inside the atomic publish
            progress.log(f"signed with key {sign_artifact(staging, sign_key)}")
        with progress.step(f"publish {output}"):
            publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if cache:
        with progress.step(f"store in build cache {cache}"):
            build_cache.store(key, output, cache)
    result.output = output
    result.seconds = time.perf_counter() - t_start
    return result


def _build_in(staging: Path, recipe: Recipe, checkpoint, spec: DecoderSpec, model, weights, progress: Progress,
              recipe_text_sha256: Optional[str], key: str) -> BuildResult:
    from .reference import TorchReference

    root_files = sources.copy_root_files(checkpoint, staging)
    tokenizer = Tokenizer(staging)
    eos_ids = _eos_ids(staging, tokenizer)
    dims = _dims(spec)
    bounds = ShapeBounds(max_batch=recipe.shapes.max_batch, max_sequence=recipe.shapes.max_sequence)
    val = recipe.validation
    prompt_ids = [tokenizer.encode(p) for p in val.prompts]

    with progress.step(f"reference greedy decode ({len(prompt_ids)} prompts × {val.max_new_tokens} tokens)"):
        reference = run_reference(TorchReference(model, dims, bounds).load(), prompt_ids, val.max_new_tokens, eos_ids)

    targets: dict[str, TargetEntry] = {}
    reports: list[TargetReport] = []
    for target in recipe.targets:
        name = recipe.target_name(target)
        try:
            with progress.step(f"export {name}"):
                exported = exporter_for(target.format)(spec, weights, target, recipe.shapes, staging / name)
        except TargetUnavailable as e:
            if not target.optional:
                raise
            progress.log(f"skipped {name}: {e}")
            targets[name] = TargetEntry(format=target.format, status="skipped",
                                        validation=ValidationSummary(status="skipped", reason=str(e)))
            continue
        entry = TargetEntry(format=target.format, status="valid", files=[file_entry(staging, p) for p in exported.files],
                            dtype=exported.dtype, io=exported.io, shapes=bounds, toolchain=exported.toolchain,
                            compatibility=exported.compatibility, validation=ValidationSummary(status="skipped"))
        with progress.step(f"validate {name} against the reference"):
            with backend_class(target.format)(staging, entry, dims) as backend:
                report = compare_target(name, backend, val.prompts, prompt_ids, reference, val.max_new_tokens,
                                        val.logits_atol, eos_ids)
        reports.append(report)
        diverged = sum(p.first_divergence is not None for p in report.prompts)
        progress.log(f"{name}: max-abs logits error {report.max_abs_logits_error:.2e} (atol {val.logits_atol:g}); "
                     f"greedy tokens {'match' if not diverged else f'diverge on {diverged} prompts'}")
        targets[name] = entry.model_copy(update={"validation": report.summary(val.max_new_tokens)})

    failed = [r for r in reports if not r.passed]
    if failed:
        lines = [f"{r.target}: {r.reason}" for r in failed]
        raise ValidationFailed("validation failed; nothing was published:\n  " + "\n  ".join(lines), reports)
    if not any(t.status == "valid" for t in targets.values()):
        raise BuildError("no target was built (all were skipped)")

    (staging / VALIDATION_NAME).write_text(json.dumps({
        "reference": "transformers (PyTorch, float32)",
        "max_new_tokens": val.max_new_tokens,
        "targets": [r.to_dict() for r in reports],
    }, indent=2) + "\n")
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, name=recipe.name, task=recipe.task, architecture=spec.model_type, model=dims,
        source=checkpoint.info,
        generation=GenerationDefaults(eos_token_ids=eos_ids, bos_token_id=tokenizer.bos_id,
                                      pad_token_id=getattr(model.config, "pad_token_id", None)),
        root_files=[file_entry(staging, p) for p in root_files + [staging / VALIDATION_NAME]],
        targets=targets,
        goldens=[Golden(prompt=p, prompt_ids=ids, tokens=ref.token_ids)
                 for p, ids, ref in zip(val.prompts, prompt_ids, reference)],
        toolchain=toolchain_versions(),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        recipe_sha256=recipe_text_sha256 or recipe.sha256(),
        inferneo_version=_version("inferneo"),
        build_key=key,
    )
    (staging / MANIFEST_NAME).write_text(manifest.to_json())  # written last
    return BuildResult(output=staging, manifest=manifest, reports=reports)
