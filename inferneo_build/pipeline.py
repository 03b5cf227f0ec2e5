"""What every build task (decoder, encoder) shares: its errors, its result, progress on stderr, the toolchain it
records, the validation chart, the fail-closed rule on validation reports, and the build itself
(`build_task`): one template over a small task strategy (`Task`) that knows its own reference, exports and
validation."""
from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Optional, Protocol

from inferneo_runtime.manifest import (MANIFEST_NAME, SCHEMA_VERSION, VALIDATION_NAME, Manifest, ShapeBounds,
                                       TargetEntry, ValidationSummary, file_entry)
from inferneo_runtime.toolchain import onnxruntime_distribution

from .exporters import ExportResult, TargetUnavailable
from .validate import TargetReport


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
        out = []
        for r in self.reports:
            d = {"target": r.target, "passed": r.passed, "reason": r.reason}
            if getattr(r, "target_kind", None) == "encoder":
                d.update(min_cosine=r.min_cosine, tolerance=r.tolerance, max_abs_error=r.max_abs_error)
            else:
                d.update(max_abs_logits_error=r.max_abs_logits_error, logits_atol=r.logits_atol,
                         first_divergence=[p.first_divergence for p in r.prompts], criterion=r.criterion,
                         precision=r.precision, tolerance=r.tolerance, top1_agreement=r.top1_agreement,
                         mean_kl=r.mean_kl, perplexity_delta=r.perplexity_delta)
            out.append(d)
        return out


@dataclass
class BuildResult:
    output: Path
    manifest: Manifest
    reports: list[TargetReport] = field(default_factory=list)
    seconds: float = 0.0
    cached: Optional[str] = None  # "output" or the cache URI when nothing was rebuilt


class Progress:
    """Step-by-step progress on stderr; `quiet` for library use (and under INFERNEO_PROGRESS=0). The spinner of a
    running step is drawn on a terminal only; elsewhere (a CI log) each step is one line when it ends."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        from inferneo_runtime.progress import progress_off

        self.console = Console(stderr=True, quiet=quiet or progress_off())

    def log(self, message: str) -> None:
        self.console.print(f"  [dim]{message}[/dim]")

    @contextmanager
    def step(self, message: str):
        t0 = time.perf_counter()
        if self.console.is_terminal and not self.console.quiet:
            with self.console.status(message):
                yield
        else:
            yield
        self.console.print(f"[green]✓[/green] {message} [dim]({time.perf_counter() - t0:.1f}s)[/dim]")


def toolchain_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "inferneo": dist_version("inferneo")}
    for dist in ("torch", "transformers", "onnx", "tokenizers", "numpy"):
        out[dist] = dist_version(dist)
    # whichever wheel provides the onnxruntime package (onnxruntime, onnxruntime-gpu, ...)
    out["onnxruntime"] = onnxruntime_distribution()[1] or "not installed"
    return out


def dist_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def validation_chart(staging: Path, validation: dict, name: str, log: Callable[[str], None]) -> list[Path]:
    """Write validation.svg (the chart of `validation`) into `staging`: [its path], or [] with a log line when
    matplotlib is not installed or the chart could not be drawn. A chart never fails a build."""
    from inferneo_runtime import charts

    if not charts.available():
        log(f"no {charts.VALIDATION_CHART_NAME}: matplotlib is not installed ({charts.PLOT_INSTALL})")
        return []
    try:
        path = charts.write_validation_chart(validation, staging / charts.VALIDATION_CHART_NAME, name)
    except Exception as e:  # a drawing problem is not a validation problem
        (staging / charts.VALIDATION_CHART_NAME).unlink(missing_ok=True)
        log(f"no {charts.VALIDATION_CHART_NAME}: {type(e).__name__}: {e}")
        return []
    return [path] if path is not None else []


def require_valid_targets(reports, targets: dict[str, TargetEntry]) -> None:
    """Fail closed: any target that missed its tolerances fails the build, and so does having no target at all."""
    failed = [r for r in reports if not r.passed]
    if failed:
        lines = [f"{r.target}: {r.reason}" for r in failed]
        raise ValidationFailed("validation failed; nothing was published:\n  " + "\n  ".join(lines), reports)
    if not any(t.status == "valid" for t in targets.values()):
        raise BuildError("no target was built (all were skipped)")


def skipped_target(fmt: str, reason: str) -> TargetEntry:
    """The manifest entry of an optional target that could not be built on this host."""
    return TargetEntry(format=fmt, status="skipped", validation=ValidationSummary(status="skipped", reason=reason))


def reference_label(checkpoint) -> str:
    """What every target was validated against, as validation.json records it."""
    return "transformers (PyTorch, float32)" + (" + merged LoRA adapters" if checkpoint.info.adapters else "")


class Task(Protocol):
    """What a build task (decoder, encoder) supplies to `build_task`."""

    bounds: ShapeBounds  # the shape bounds every target's entry records

    def stage(self, staging: Path, progress: Progress) -> list[Path]:
        """Copy the root files into `staging` and compute the reference outputs; returns the root files."""

    def export(self, target, out_dir: Path) -> ExportResult:
        """Write `target`'s files into `out_dir` (TargetUnavailable: this host cannot build it)."""

    def validate(self, name: str, target, entry: TargetEntry, staging: Path) -> tuple[TargetReport, dict]:
        """Run the exported target through the runtime against the reference: (report, entry updates)."""

    def describe(self, report) -> str:
        """The report's one log line."""

    def validation(self, reports: list) -> dict:
        """validation.json's contents."""

    def manifest_fields(self) -> dict:
        """The manifest's task-specific fields (architecture, model, generation, goldens, ...)."""

    def close(self) -> None:
        """Release what the reference holds, once every target is validated."""


def build_task(task: Task, staging: Path, recipe, checkpoint, progress: Progress, recipe_text_sha256: Optional[str],
               key: str) -> BuildResult:
    """Build `recipe` into `staging`: root files and reference, each target exported (an optional one this host
    cannot build is recorded as skipped) and validated through the runtime, validation.json and its chart, then
    the manifest, written last. Fails closed (`require_valid_targets`) before anything but the targets is written."""
    root_files = task.stage(staging, progress)
    targets: dict[str, TargetEntry] = {}
    reports: list = []
    try:
        for target in recipe.targets:
            name = recipe.target_name(target)
            try:
                with progress.step(f"export {name}"):
                    exported = task.export(target, staging / name)
            except TargetUnavailable as e:
                if not target.optional:
                    raise
                progress.log(f"skipped {name}: {e}")
                targets[name] = skipped_target(target.format, str(e))
                continue
            precision = getattr(target, "precision", "fp32")
            entry = TargetEntry(format=target.format, status="valid",
                                files=[file_entry(staging, p) for p in exported.files], dtype=exported.dtype,
                                io=exported.io, shapes=task.bounds, toolchain=exported.toolchain,
                                compatibility=exported.compatibility, validation=ValidationSummary(status="skipped"),
                                precision=None if precision == "fp32" else precision)
            with progress.step(f"validate {name} against the reference"):
                report, update = task.validate(name, target, entry, staging)
            reports.append(report)
            progress.log(task.describe(report))
            targets[name] = entry.model_copy(update=update)
    finally:
        task.close()  # the reference's outputs, held until every target is judged
    require_valid_targets(reports, targets)

    validation = task.validation(reports)
    (staging / VALIDATION_NAME).write_text(json.dumps(validation, indent=2) + "\n")
    chart = validation_chart(staging, validation, recipe.name, progress.log)  # written before it is hashed below
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, name=recipe.name, task=recipe.task, source=checkpoint.info,
        root_files=[file_entry(staging, p) for p in root_files + [staging / VALIDATION_NAME] + chart],
        targets=targets, toolchain=toolchain_versions(),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        recipe_sha256=recipe_text_sha256 or recipe.sha256(), inferneo_version=dist_version("inferneo"), build_key=key,
        **task.manifest_fields())
    (staging / MANIFEST_NAME).write_text(manifest.to_json())  # written last
    return BuildResult(output=staging, manifest=manifest, reports=reports)
