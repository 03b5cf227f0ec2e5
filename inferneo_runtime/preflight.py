"""Preflight: can this host run an artifact's target on a device? Decided from the manifest alone, before any
file is hashed, read or deserialized.

Checks, in order (each mismatch is one message saying what the artifact was built for and what this host has):
  extras              torch for TorchScript; tensorrt (+ torch) for TensorRT
  device              cpu | cuda | cuda:N, and whether the format runs there (TensorRT: CUDA only; ONNX: CPU
                      only, as its backend refuses CUDA)
  cuda                a CUDA device with that index, as the backend's library sees it
  torch_version       the torch that wrote a TorchScript (or .pt2) target can be read by the installed one
  tensorrt_version    the engine's TensorRT version == the installed one (engines do not load across versions)
  compute_capability  an engine built for the GPU's compute capability
  memory              free memory (GPU or host RAM) >= weights + the smallest KV cache; a warning when the
                      full cache (max_batch × max_sequence) would not fit

`check()` returns a Verdict; `Verdict.raise_for_errors()` raises MissingExtraError when the only problems are
missing extras (so the message names the extra to install), else IncompatibleHost listing every problem.
`Host` probes lazily: torch and tensorrt are imported only when a check needs them; tests pass the facts.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

from .backends.base import CAPACITY_CHUNK  # the smallest cache the runtime allocates
from .errors import InferneoError, MissingExtraError
from .manifest import Manifest, ModelDims, TargetEntry
from .toolchain import torch_version_tuple

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float64": 8}
_NOT_PROBED = object()


class IncompatibleHost(InferneoError):
    """The artifact's target cannot run on this host (device, GPU, TensorRT version, memory)."""

    exit_code = 5

    def __init__(self, message: str, verdict: "Verdict"):
        super().__init__(message)
        self.verdict = verdict

    @property
    def details(self) -> list[dict]:
        return [asdict(f) for f in self.verdict.findings]


# -- what the host has ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    compute_capability: str  # "8.9"
    total_bytes: Optional[int] = None
    free_bytes: Optional[int] = None

    def describe(self) -> str:
        return f"cuda:{self.index} {self.name} (compute capability {self.compute_capability})"


class Host:
    """Facts about this machine. Anything passed in is taken as given; the rest is probed on first use.

    versions: module -> version, None for "not installed" (torch, tensorrt, onnxruntime).
    torch_cuda: whether torch can use CUDA; torch_cuda_reason says why not.
    gpus: the CUDA devices (from torch when it has CUDA, else nvidia-smi); free_bytes may be None (unknown).
    onnx_providers: onnxruntime's available execution providers.
    available_memory: host RAM available to a new process (MemAvailable), None if unknown.
    """

    def __init__(self, *, versions: Optional[dict[str, Optional[str]]] = None, torch_cuda: Optional[bool] = None,
                 torch_cuda_reason: str = "", gpus: Optional[list[GPU]] = None,
                 onnx_providers: Optional[list[str]] = None, available_memory=_NOT_PROBED,
                 cpu_flags: Optional[set[str]] = None):
        self._versions = dict(versions or {})
        self._version_notes: dict[str, str] = {}
        self._torch_cuda = torch_cuda
        self._torch_cuda_reason = torch_cuda_reason
        self._gpus = gpus
        self._providers = onnx_providers
        self._available = available_memory
        self._cpu_flags = cpu_flags

    # versions
    def version(self, module: str) -> Optional[str]:
        if module not in self._versions:
            self._versions[module] = self._probe_version(module)
        return self._versions[module]

    def version_note(self, module: str) -> str:
        """Why a module that is present counts as missing (e.g. its libraries do not load), or ''."""
        self.version(module)
        return self._version_notes.get(module, "")

    def _probe_version(self, module: str) -> Optional[str]:
        try:
            if importlib.util.find_spec(module) is None:
                return None
        except (ImportError, ValueError):
            return None
        if module == "torch":  # the version without importing torch (seconds) for hosts that only inspect
            try:
                return importlib.metadata.version("torch")
            except importlib.metadata.PackageNotFoundError:
                pass
        try:
            return str(importlib.import_module(module).__version__)
        except ImportError as e:
            self._version_notes[module] = f"it does not import: {e}"
        except OSError as e:
            self._version_notes[module] = f"its libraries do not load: {e}"
        return None

    # CUDA as torch sees it (TorchScript and TensorRT use torch for device memory)
    def torch_cuda(self) -> tuple[bool, str]:
        if self._torch_cuda is None:
            self._torch_cuda, self._torch_cuda_reason = self._probe_torch_cuda()
        return self._torch_cuda, self._torch_cuda_reason

    def _probe_torch_cuda(self) -> tuple[bool, str]:
        if self.version("torch") is None:
            return False, "torch is not installed"
        import torch

        if torch.version.cuda is None:
            return False, f"torch {torch.__version__} is a CPU-only build"
        if not torch.cuda.is_available():
            return False, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
        return True, ""

    def gpus(self) -> list[GPU]:
        if self._gpus is None:
            self._gpus = self._probe_gpus()
        return self._gpus

    def _probe_gpus(self) -> list[GPU]:
        if self.torch_cuda()[0]:
            import torch

            out = []
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                out.append(GPU(i, p.name, f"{p.major}.{p.minor}", total_bytes=int(p.total_memory)))
            return out
        return _nvidia_smi_gpus()

    def free_gpu_memory(self, gpu: GPU) -> Optional[int]:
        if gpu.free_bytes is not None:
            return gpu.free_bytes
        if self.torch_cuda()[0]:
            import torch

            return int(torch.cuda.mem_get_info(gpu.index)[0])  # creates a context on that device only
        return None

    # onnxruntime
    def onnx_providers(self) -> list[str]:
        if self._providers is None:
            import onnxruntime

            self._providers = list(onnxruntime.get_available_providers())
        return self._providers

    # the CPU's instruction-set flags (/proc/cpuinfo, less what CPUID withholds), for compiled CPU code (.pt2)
    def cpu_flags(self) -> Optional[set[str]]:
        """None when unknown (no /proc/cpuinfo)."""
        if self._cpu_flags is None:
            from .cpu_kernels import cpu_flags

            self._cpu_flags = set(cpu_flags()) or None
        return self._cpu_flags

    # host RAM
    def available_memory(self) -> Optional[int]:
        if self._available is _NOT_PROBED:
            self._available = _mem_available()
        return self._available


def _nvidia_smi_gpus() -> list[GPU]:
    """GPUs as the driver reports them, for hosts whose torch has no CUDA (or no torch at all)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        r = subprocess.run([exe, "--query-gpu=index,name,compute_cap,memory.total,memory.free",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in r.stdout.splitlines() if r.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5 and parts[0].isdigit():
            mib = lambda v: int(float(v) * 2**20) if re.fullmatch(r"[\d.]+", v) else None  # noqa: E731
            gpus.append(GPU(int(parts[0]), parts[1], parts[2], total_bytes=mib(parts[3]), free_bytes=mib(parts[4])))
    return gpus


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# -- the verdict ------------------------------------------------------------------------------------------
@dataclass
class Finding:
    check: str  # extras | device | cuda | torch_version | tensorrt_version | compute_capability | cpu_isa | memory | status
    level: Literal["error", "warning"]
    message: str
    missing_extra: Optional[tuple[str, str, str]] = None  # (what, extra, module) for MissingExtraError


@dataclass
class Verdict:
    target: str
    format: str
    device: str
    findings: list[Finding] = field(default_factory=list)
    facts: dict = field(default_factory=dict)  # what was compared: versions, GPU, bytes needed / free
    skipped: Optional[str] = None  # the build-time reason when the target was skipped

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        return self.skipped is None and not self.errors

    @property
    def status(self) -> str:
        return "skipped" if self.skipped is not None else ("ok" if not self.errors else "incompatible")

    def error(self, check: str, message: str, missing_extra=None) -> None:
        self.findings.append(Finding(check, "error", message, missing_extra))

    def warn(self, check: str, message: str) -> None:
        self.findings.append(Finding(check, "warning", message))

    def raise_for_errors(self) -> "Verdict":
        if self.skipped is not None:
            raise IncompatibleHost(f"target {self.target!r} was skipped at build time: {self.skipped}", self)
        errors = self.errors
        if errors and all(f.missing_extra for f in errors):
            raise MissingExtraError(*errors[0].missing_extra)
        if errors:
            lines = "\n  ".join(f.message for f in errors)
            head = f"target {self.target!r} ({self.format}) cannot run on {self.device} here"
            raise IncompatibleHost(f"{head}:\n  {lines}" if len(errors) > 1 else f"{head}: {errors[0].message}", self)
        return self

    def to_dict(self) -> dict:
        return {"target": self.target, "format": self.format, "device": self.device, "status": self.status,
                "ok": self.ok, "skipped_reason": self.skipped,
                "errors": [f.message for f in self.errors], "warnings": [f.message for f in self.warnings],
                "findings": [{k: v for k, v in asdict(f).items() if k != "missing_extra"} for f in self.findings],
                "facts": self.facts}


# -- sizes from the manifest ------------------------------------------------------------------------------
def kv_bytes_per_position(dims: ModelDims, entry: TargetEntry) -> int:
    """Bytes one cache slot needs per position: layers × (key + value) × kv_heads × head_dim × element size."""
    dtype = "float32"
    if entry.io is not None:
        kv = [t for t in entry.io.inputs if t.name in ("kv_cache", entry.io.kv_input.format(0, "key"))]
        dtype = kv[0].dtype if kv else dtype
    return dims.num_layers * 2 * dims.kv_heads * dims.head_dim * _DTYPE_BYTES.get(dtype, 4)


def engine_files(entry: TargetEntry) -> dict[str, str]:
    """TensorRT: compute capability -> the manifest path of its engine."""
    out = {}
    for e in entry.compatibility.get("engines") or []:
        for f in entry.files:
            if f.path.endswith("/" + e.get("file", "\0")) or f.path == e.get("file"):
                out[str(e.get("compute_capability"))] = f.path
    return out


def weights_bytes(entry: TargetEntry, compute_capability: Optional[str] = None) -> int:
    """Bytes of the files a backend loads: every file of the target, or for TensorRT the one engine it runs
    (the one for `compute_capability`, else the largest); the ONNX it was built from is not loaded."""
    if entry.format != "tensorrt":
        return sum(f.size for f in entry.files)
    sizes = {f.path: f.size for f in entry.files}
    engines = engine_files(entry)
    if compute_capability in engines:
        return sizes[engines[compute_capability]]
    plans = [f.size for f in entry.files if f.path.endswith((".plan", ".engine", ".trt"))]
    return max(plans, default=0)


def _gb(n: Optional[int]) -> str:
    return "unknown" if n is None else f"{n / 1e9:.2f} GB"


# -- the checks -------------------------------------------------------------------------------------------
_EXTRAS = {  # format -> [(module, what, extra)]
    "onnx": [("onnxruntime", "ONNX artifacts", "cpu")],  # or the gpu extra: either onnxruntime wheel works
    "torchscript": [("torch", "TorchScript artifacts", "torchscript")],
    "pt2": [("torch", ".pt2 (AOTInductor) artifacts", "torchscript")],
    "tensorrt": [("tensorrt", "TensorRT engines", "tensorrt"), ("torch", "TensorRT engines", "tensorrt")],
}


def parse_device(device: str) -> tuple[str, Optional[int]]:
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device or "")
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise ValueError(f"device {device!r} is not one of cpu, cuda, cuda:N")
    return m.group(1), (int(m.group(2) or 0) if m.group(1) == "cuda" else None)


def check(manifest: Manifest, target: str, device: str = "cpu", host: Optional[Host] = None) -> Verdict:
    """The verdict for running `target` of `manifest` on `device` on this host (nothing is loaded)."""
    host = host or Host()
    entry = manifest.targets.get(target)
    if entry is None:
        v = Verdict(target, "?", device)
        v.error("status", f"artifact {manifest.name!r} has no target {target!r}; it has: {', '.join(manifest.targets)}")
        return v
    v = Verdict(target, entry.format, device)
    if entry.status != "valid":
        v.skipped = entry.validation.reason or "no reason recorded"
        return v
    try:
        kind, index = parse_device(device)
    except ValueError as e:
        v.error("device", str(e))
        return v
    _check_extras(v, entry, kind, host)
    _check_torch_version(v, entry, host)
    gpu = _check_cuda(v, entry, kind, index, host) if kind == "cuda" else None
    if entry.format == "tensorrt":
        _check_tensorrt(v, entry, kind, gpu, host)
    if entry.format == "pt2":
        _check_pt2_device(v, entry, kind, gpu, host)
    _check_memory(v, manifest, entry, kind, gpu, host)
    return v


def check_all(manifest: Manifest, device: str = "cpu", host: Optional[Host] = None) -> dict[str, Verdict]:
    host = host or Host()
    return {name: check(manifest, name, device, host) for name in manifest.targets}


def _check_extras(v: Verdict, entry: TargetEntry, kind: str, host: Host) -> None:
    for module, what, extra in _EXTRAS.get(entry.format, []):
        if module == "onnxruntime" and kind == "cuda":
            extra = "gpu"
        version = host.version(module)
        v.facts[module] = version or "not installed"
        if version is None:
            note = host.version_note(module)
            err = MissingExtraError(what, extra, module)
            v.error("extras", f"{err}" + (f" ({module} is installed but {note})" if note else ""),
                    missing_extra=(what, extra, module))
    if entry.format == "onnx" and kind == "cuda":
        # The onnx backend refuses CUDA whatever providers onnxruntime has (its KV cache is host memory, which
        # a CUDA session would copy in and out every step), so preflight refuses it too.
        providers = host.onnx_providers() if host.version("onnxruntime") is not None else []
        v.facts["onnxruntime_providers"] = providers
        v.error("device", f"the onnx backend runs on cpu only: its KV cache is host memory, which a CUDA session "
                          f"would copy in and out every step (onnxruntime providers here: "
                          f"{', '.join(providers) or 'none'}); use device 'cpu', or a torchscript or tensorrt "
                          f"target on {v.device!r}")


# Which torch reads a torch-serialized target. TorchScript loads in the torch that wrote it and in newer ones; an
# older torch may lack its operators or file-format version, so a newer writer is refused rather than risked.
# A torch.export / AOTInductor package (.pt2) is compiled code for one torch minor.
_TORCH_READS = {"torchscript": "same_or_newer", "pt2": "same_minor"}


def _check_torch_version(v: Verdict, entry: TargetEntry, host: Host) -> None:
    rule = _TORCH_READS.get(entry.format)
    installed = host.version("torch")
    if rule is None or installed is None:  # not a torch format, or torch is reported as a missing extra
        return
    built = entry.toolchain.get("torch")
    v.facts["artifact_torch"] = built
    wrote, have = torch_version_tuple(built), torch_version_tuple(installed)
    if wrote is None or have is None:
        v.warn("torch_version", f"no torch version is recorded for this {entry.format} target; it loads only if "
                                f"torch {installed} can read what wrote it")
        return
    minor = f"{wrote[0]}.{wrote[1]}"
    if rule == "same_or_newer" and have < wrote:
        v.error("torch_version", f"the {entry.format} target was written by torch {built}; this host has torch "
                                 f"{installed}, which cannot be relied on to read it (an older torch may lack its "
                                 f"operators or file format): install torch>={minor} or rebuild the artifact with "
                                 f"torch {installed}")
    elif rule == "same_minor" and have != wrote:
        v.error("torch_version", f"the {entry.format} target was compiled by torch {built}; this host has torch "
                                 f"{installed}, and a compiled torch.export package loads only in the torch minor "
                                 f"that built it: install torch=={minor}.* or rebuild the artifact with torch "
                                 f"{installed}")


def _check_cuda(v: Verdict, entry: TargetEntry, kind: str, index: int, host: Host) -> Optional[GPU]:
    if entry.format in ("torchscript", "pt2", "tensorrt"):
        if host.version("torch") is None:
            return None  # already reported as a missing extra
        usable, reason = host.torch_cuda()
        if not usable:
            v.error("cuda", f"device {v.device!r} requested but {reason}; this host cannot run {entry.format} on CUDA")
            return None
    gpus = host.gpus()
    v.facts["gpus"] = [g.describe() for g in gpus]
    if not gpus:
        v.error("cuda", f"device {v.device!r} requested but this host has no CUDA device (no NVIDIA driver or GPU "
                        f"found)")
        return None
    gpu = next((g for g in gpus if g.index == index), None)
    if gpu is None:
        v.error("cuda", f"device {v.device!r} requested but this host has {len(gpus)} CUDA device(s): "
                        f"{'; '.join(g.describe() for g in gpus)}")
        return None
    v.facts["gpu"] = gpu.name
    v.facts["compute_capability"] = gpu.compute_capability
    return gpu


# the /proc/cpuinfo flags each of inductor's vector ISAs compiles for (its -m flags)
CPU_ISA_FLAGS = {"avx2": ["avx2", "fma", "f16c"], "avx512": ["avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"],
                 "avx512_vnni": ["avx512_vnni"], "amx_tile": ["amx_tile"], "asimd": ["asimd"]}


def _check_pt2_device(v: Verdict, entry: TargetEntry, kind: str, gpu: Optional[GPU], host: Host) -> None:
    """A .pt2 package is compiled kernels for one device type (and, on CUDA, for the GPU architecture it was built
    on): asked for another, it is refused here rather than failing inside the loader."""
    built = entry.compatibility.get("device")
    v.facts["pt2_device"] = built
    if built is None:
        v.warn("device", "no device is recorded for this .pt2 target; it loads only on the device type it was "
                         "compiled for")
        return
    if built != kind:
        v.error("device", f"the .pt2 target was compiled for {built}; asked for device {v.device!r}. AOTInductor "
                          f"packages run on the device type they were compiled for: use --device {built}, or build "
                          f"a pt2 target with device: {kind}")
        return
    isa = entry.compatibility.get("cpu_isa")
    flags = host.cpu_flags() if kind == "cpu" and isa else None
    if flags is not None:
        v.facts["pt2_cpu_isa"] = isa
        lacking = [f for word in str(isa).split() for f in CPU_ISA_FLAGS.get(word, [word]) if f not in flags]
        if lacking:
            v.error("cpu_isa", f"the .pt2 target's kernels were compiled for {isa}; this CPU lacks "
                               f"{', '.join(lacking)} and would stop on an illegal instruction: rebuild the target on "
                               f"a host of this CPU type (or an older one)")
    arch = entry.compatibility.get("cuda_arch")
    if gpu is not None and arch is not None and str(arch) != gpu.compute_capability:
        v.error("compute_capability", f"the .pt2 target was compiled for compute capability {arch}; cuda:{gpu.index} "
                                      f"is {gpu.name} with compute capability {gpu.compute_capability}: rebuild the "
                                      f"target on a GPU of that architecture")


def _check_tensorrt(v: Verdict, entry: TargetEntry, kind: str, gpu: Optional[GPU], host: Host) -> None:
    if kind != "cuda":
        v.error("device", f"TensorRT engines run on CUDA GPUs only; asked for device {v.device!r} "
                          f"(use device 'cuda' / --device cuda)")
    built = entry.toolchain.get("tensorrt") or entry.compatibility.get("tensorrt")
    installed = host.version("tensorrt")
    v.facts["engine_tensorrt"] = built
    if built is None:  # a bare engine file: only deserializing it will tell
        v.warn("tensorrt_version", f"no TensorRT version is recorded for this engine; it loads only if TensorRT "
                                   f"{installed or '(not installed)'} built it")
    elif installed is not None and str(installed) != str(built):
        v.error("tensorrt_version", f"the engine was built with TensorRT {built}; this host has TensorRT {installed}. "
                                    f"A TensorRT engine loads only in the version that built it: install "
                                    f"tensorrt=={built} or rebuild the artifact with TensorRT {installed}")
    engines = entry.compatibility.get("engines") or []
    built_for = ", ".join(f"{e.get('compute_capability')} ({e.get('gpu')})" for e in engines) or "none recorded"
    v.facts["engine_compute_capabilities"] = [str(e.get("compute_capability")) for e in engines]
    if gpu is not None and not engines:
        v.warn("compute_capability", f"no compute capability is recorded for this engine; it runs only if it was "
                                     f"built for {gpu.describe()}")
    elif gpu is not None and gpu.compute_capability not in engine_files(entry):
        v.error("compute_capability", f"the engines were built for compute capability {built_for}; cuda:{gpu.index} "
                                      f"is {gpu.name} with compute capability {gpu.compute_capability}. An engine "
                                      f"runs only on the GPU architecture it was built for: rebuild with gpu_archs "
                                      f"including \"{gpu.compute_capability}\" on a host with such a GPU")


def _check_memory(v: Verdict, manifest: Manifest, entry: TargetEntry, kind: str, gpu: Optional[GPU],
                  host: Host) -> None:
    on_gpu = kind == "cuda"
    if on_gpu and gpu is None:
        return  # no device to measure
    weights = weights_bytes(entry, gpu.compute_capability if gpu is not None else None)
    decoder = manifest.task == "text-generation"  # encoders keep no KV cache
    per_position = kv_bytes_per_position(manifest.model, entry) if decoder else 0
    bounds = entry.shapes
    longest = bounds.max_sequence if bounds else manifest.model.max_positions
    batch = bounds.max_batch if bounds else 1
    smallest = per_position * min(CAPACITY_CHUNK, longest)
    full = per_position * longest * batch
    where = f"cuda:{gpu.index} ({gpu.name})" if on_gpu else "host RAM"
    free = host.free_gpu_memory(gpu) if on_gpu else host.available_memory()
    v.facts.update(memory=where, free_bytes=free, weights_bytes=weights, kv_cache_min_bytes=smallest,
                   kv_cache_full_bytes=full)
    if free is None:
        return
    if free < weights + smallest:
        v.error("memory", f"{where} has {_gb(free)} free; this target needs {_gb(weights + smallest)} "
                          f"(weights {_gb(weights)} + a KV cache of 1 × {min(CAPACITY_CHUNK, longest)} positions "
                          f"{_gb(smallest)})")
    elif free < weights + full and decoder:
        v.warn("memory", f"{where} has {_gb(free)} free: enough for the weights ({_gb(weights)}) but not for the "
                         f"full KV cache of {batch} × {longest} positions ({_gb(full)}); long or many concurrent "
                         f"requests will run out of memory")
