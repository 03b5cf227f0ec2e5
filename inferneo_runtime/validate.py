"""Re-check a built artifact on this host: what `inferneo validate` runs.

The signature (when keys are set), every checksum, then each target's goldens: greedy tokens that must
reproduce exactly (float32), or teacher-forced top-1 agreement against the build's tolerance (reduced
precisions, whose kernels differ by CPU). A target this host cannot run (preflight: versions, GPU, extras,
memory) is reported unavailable with the reason; it fails the check only when it was asked for by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from . import preflight
from .artifact import Model, check_signature
from .backends import backend_class
from .errors import GoldenMismatch, InferneoError, MissingExtraError, RequestError
from .manifest import Manifest, read_manifest, verify_files
from .s3 import TransferBar  # rich bars with bytes and rate; drawn only on a terminal
from .tokenizer import Tokenizer


@dataclass
class ValidationReport:
    artifact: str
    signed_by: Optional[str]
    root_files: int
    targets: dict[str, dict] = field(default_factory=dict)  # name -> {"status": passed|failed|unavailable, ...}
    failure: Optional[InferneoError] = None  # the first failure that fails the check (its exit code is the command's)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def to_dict(self) -> dict:
        return {"ok": self.ok, "artifact": self.artifact, "checksums": "verified", "signed_by": self.signed_by,
                "targets": self.targets}


def validate_artifact(artifact: Union[str, Path], target: Optional[str] = None, device: str = "cpu",
                      trusted_keys: Optional[Sequence] = None, show_progress: bool = True) -> ValidationReport:
    """Check `artifact` on this host. Raises for a bad signature, manifest or root file; a target whose
    checksums or goldens fail is recorded in the report (and `report.failure`)."""
    artifact = Path(artifact)
    try:  # a device no target could run on is a bad argument, not a host that cannot vouch for a target
        preflight.parse_device(device)
    except ValueError as e:
        raise RequestError(f"--device: {e}") from None
    signed_by = check_signature(artifact, trusted_keys)
    m = read_manifest(artifact)
    if target and target not in m.targets:
        raise RequestError(f"artifact {m.name!r} has no target {target!r}; it has: {', '.join(m.targets)}")
    verify_files(artifact, m.root_files)
    report = ValidationReport(str(artifact), signed_by, len(m.root_files))
    for name in [target] if target else m.valid_targets():
        try:
            preflight.check(m, name, device).raise_for_errors()  # before any of the target's files is read
            files = m.targets[name].files
            with TransferBar(show_progress, f"sha256 {name}", sum(f.size for f in files)) as bar:
                verify_files(artifact, files, on_bytes=bar.advance)
            model = _open_for_goldens(artifact, m, name, device)
        except (MissingExtraError, preflight.IncompatibleHost) as e:
            report.targets[name] = {"status": "unavailable", "reason": str(e)}
            if target:  # asked for by name: this host cannot vouch for it
                report.failure = report.failure or e
            continue
        with model:
            try:
                report.targets[name] = {"status": "passed", **_golden_summary(m, name, model.check_goldens())}
            except GoldenMismatch as e:
                report.targets[name] = {"status": "failed", "reason": str(e)}
                report.failure = report.failure or e
    return report


def describe_result(result: dict) -> str:
    """One target's line of detail: why it failed or was unavailable, or what its goldens showed."""
    if result.get("reason"):
        return result["reason"]
    if result.get("criterion") != "tolerance":
        return f"{result.get('goldens')} goldens"
    return (f"top-1 agreement {result['top1_agreement']:.4f} ≥ {result['min_top1_agreement']:g} over "
            f"{result['positions']} teacher-forced positions of {result['goldens']} goldens; "
            f"{result['exact_goldens']} reproduce exactly; kernel path {result['kernel_path']} "
            f"(build: {result['build_kernel_path'] or 'not recorded'})")


def _golden_summary(m: Manifest, name: str, results: list[dict]) -> dict:
    """What is reported for a target whose goldens held; reduced precisions add their tolerance figures."""
    summary = {"goldens": len(results)}
    if results and "positions" in results[0]:
        from .cpu_kernels import quantized_kernel_path

        positions = sum(r["positions"] for r in results)
        summary.update(criterion="tolerance", positions=positions,
                       top1_agreement=sum(r["agree"] for r in results) / max(positions, 1),
                       min_top1_agreement=m.targets[name].validation.tolerance.top1_agreement,
                       exact_goldens=sum(r["match"] for r in results), kernel_path=quantized_kernel_path(),
                       build_kernel_path=m.targets[name].validation.kernel_path)
    return summary


def _open_for_goldens(root: Path, m: Manifest, name: str, device: str):
    """A loaded model with `check_goldens()`: the generation loop for decoders, the embedder for encoders."""
    if m.task != "text-generation":
        from .embedding import EmbeddingModel

        return EmbeddingModel.open(root, m, name, device=device)
    entry = m.targets[name]
    # the artifact's own files, not this host's packed copy of them: validate judges what was shipped
    backend = backend_class(entry.format)(root, entry, m.model, device=device, host_cache=False).load()
    return Model(root, m, name, backend, Tokenizer(root, listed=m.listed_root_files()))
