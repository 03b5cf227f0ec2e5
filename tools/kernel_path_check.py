"""A quantized artifact's accuracy on another CPU kernel path than this host's, by emulation.

onnxruntime's MatMulNBits (`accuracy_level: 4`) quantizes activations with kernels that MLAS picks by CPUID, and
no onnxruntime option makes one CPU run another path's kernel (README, "CPU kernel paths"). qemu-user can:
`qemu-x86_64 -cpu Haswell-v4` runs this same Python and onnxruntime on an emulated AVX2 CPU (no AVX-512, no
VNNI), so MLAS takes its AVX2 kernels, 60-140x slower than native (the path is reported from CPUID, which is
what the kernels follow).

    .venv/bin/python tools/kernel_path_check.py ARTIFACT [--targets onnx-int8,onnx-int4] [--cpu Haswell-v4]

Native: the logits of the artifact's float32 `onnx` target over the shipped evaluation text (the float32 target
matches the PyTorch reference within the build's logits_atol), and each listed target's figures against them on
this host's path. Emulated: the same figures, and `inferneo validate` of each target (the deploy-host check), on
the emulated CPU. Prints a table, or JSON with --json. Needs qemu-user (Debian: apt-get install qemu-user);
13-16 minutes per SmolLM2-135M target on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_reference(artifact: Path, reference_target: str, out: Path) -> None:
    """The reference target's logits for every evaluation window (the build's windows of the shipped text, within
    the target's sequence bound), as out/{i}.npy, and the windows."""
    import inferneo_runtime
    from inferneo_build.evaluation import MAX_WINDOW, EvaluationReference
    from inferneo_build.recipe import Validation

    with inferneo_runtime.load(artifact, target=reference_target) as model:
        shapes = model.manifest.targets[model.target].shapes
        reference = EvaluationReference.run(model.backend, model.tokenizer, Validation(prompts=["(unused)"]),
                                            shapes.max_sequence if shapes else MAX_WINDOW)
    try:
        for i, logits in enumerate(reference.logits):
            np.save(out / f"{i}.npy", logits)
        (out / "windows.json").write_text(json.dumps(reference.windows))
    finally:
        reference.close()


def score(artifact: Path, target: str, reference: Path) -> dict:
    """Top-1 agreement, mean KL and perplexity change of `target` against the saved reference, on this CPU."""
    import inferneo_runtime
    from inferneo_build.evaluation import EvaluationReference
    from inferneo_runtime.cpu_kernels import quantized_kernel_path

    wins = json.loads((reference / "windows.json").read_text())
    logits = [np.load(reference / f"{i}.npy", mmap_mode="r") for i in range(len(wins))]
    saved = EvaluationReference(str(reference), wins, logits, tmp=None)  # the files are the caller's to remove
    t0 = time.perf_counter()
    with inferneo_runtime.load(artifact, target=target, verify=False) as model:
        s = saved.score(model.backend)
    ref = saved.reference.perplexity
    return {"target": target, "kernel_path": quantized_kernel_path(), "positions": s.positions,
            "top1_agreement": s.agree / s.positions, "mean_kl": s.kl_sum / s.positions, "perplexity": s.perplexity,
            "reference_perplexity": ref, "perplexity_delta": s.perplexity / ref - 1,
            "seconds": time.perf_counter() - t0}


def _emulated(cpu: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    # the venv's python by its own path (not resolved), so that the emulated interpreter finds the venv
    return subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--targets", default="onnx-int8,onnx-int4", help="comma-separated targets to check")
    p.add_argument("--reference", default="onnx", help="the float32 target whose logits are the reference")
    p.add_argument("--cpu", default="Haswell-v4", help="qemu's CPU model: Haswell-v4 is AVX2 + FMA, no AVX-512")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per emulated run")
    p.add_argument("--json", action="store_true")
    p.add_argument("--score", type=Path, help=argparse.SUPPRESS)  # worker: score --targets against this reference
    a = p.parse_args()
    targets = [t for t in a.targets.split(",") if t]
    if a.score:
        print(json.dumps([score(a.artifact, t, a.score) for t in targets]))
        return 0
    if shutil.which("qemu-x86_64") is None:
        print("error: qemu-x86_64 not found (Debian: apt-get install qemu-user)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="inferneo-kernel-path-") as tmp:
        ref = Path(tmp)
        print(f"reference: {a.reference} logits over the evaluation text", file=sys.stderr)
        write_reference(a.artifact, a.reference, ref)
        for t in targets:
            rows.append({**score(a.artifact, t, ref), "run": "native"})
            print(f"native {t}: {rows[-1]['kernel_path']} in {rows[-1]['seconds']:.0f}s", file=sys.stderr)
        for t in targets:
            r = _emulated(a.cpu, [__file__, str(a.artifact), "--targets", t, "--score", str(ref)], a.timeout)
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append({**json.loads(r.stdout.strip().splitlines()[-1])[0], "run": f"qemu -cpu {a.cpu}"})
            v = _emulated(a.cpu, ["-m", "inferneo_runtime.cli", "validate", str(a.artifact), "--target", t, "--json"],
                          a.timeout)
            rows[-1]["validate_rc"] = v.returncode
            rows[-1]["validate"] = json.loads(v.stdout) if v.stdout.strip().startswith("{") else v.stdout[-2000:]
            print(f"emulated {t}: {rows[-1]['kernel_path']} in {rows[-1]['seconds']:.0f}s, validate rc "
                  f"{v.returncode}", file=sys.stderr)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| target | run | kernel path | top-1 | mean KL | perplexity | validate |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            check = "" if "validate_rc" not in r else ("passed" if r["validate_rc"] == 0 else f"rc {r['validate_rc']}")
            print(f"| {r['target']} | {r['run']} | {r['kernel_path']} | {r['top1_agreement']:.3f} | "
                  f"{r['mean_kl']:.4f} | {r['perplexity']:.3f} ({r['perplexity_delta']:+.2%}) | {check} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
