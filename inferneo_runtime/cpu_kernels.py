"""Which of onnxruntime's quantized CPU kernels this host runs.

onnxruntime's MatMulNBits with `accuracy_level: 4` quantizes activations to int8 inside the kernel, and MLAS picks
that kernel by instruction set (AVX-512 VNNI, AVX-512, AVX-VNNI, AVX2 on x86-64; dot-product / i8mm on arm64).
The kernels round and accumulate differently, so a quantized target's accuracy figures depend on the host: the
manifest records the path they were measured on, and `inferneo validate` says which path it ran.
"""
from __future__ import annotations

import platform
from functools import lru_cache

# MLAS's own preference order for the int8-activation (CompInt8) kernels, best first: (path, flags it needs)
_X86_PATHS = (
    ("avx512vnni", ("avx512f", "avx512bw", "avx512_vnni")),
    ("avx512", ("avx512f", "avx512bw")),
    ("avxvnni", ("avx2", "avx_vnni")),
    ("avx2", ("avx2",)),
)
_ARM_PATHS = (("i8mm", ("i8mm",)), ("dotprod", ("asimddp",)), ("neon", ("asimd",)))


# /proc/cpuinfo's names for the features that numpy's CPUID table names otherwise
_CPUID_NAMES = {"sse4_1": "SSE41", "sse4_2": "SSE42", "popcnt": "POPCNT", "avx": "AVX", "avx2": "AVX2", "fma": "FMA3",
                "f16c": "F16C", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512cd": "AVX512CD",
                "avx512dq": "AVX512DQ", "avx512vl": "AVX512VL", "avx512_vnni": "AVX512VNNI",
                "avx512_bf16": "AVX512BF16", "avx512_fp16": "AVX512FP16", "asimd": "ASIMD", "asimddp": "ASIMDDP"}


def _proc_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86 / arm64
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpuid_features() -> dict[str, bool]:
    """numpy's runtime CPUID table ({} where this numpy has none): what this process can execute."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # numpy 2
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__  # numpy 1.x
        except ImportError:
            return {}
    return dict(__cpu_features__)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags as /proc/cpuinfo names them; empty when unknown. Where CPUID (which
    onnxruntime's kernels and compiled code go by) withholds a feature that /proc/cpuinfo lists, that file describes
    another CPU: qemu-user emulating an AVX2 CPU passes the host's through. Then only CPUID's features count."""
    proc, cpuid = _proc_flags(), _cpuid_features()
    if not cpuid or all(cpuid.get(_CPUID_NAMES[f], False) for f in proc if f in _CPUID_NAMES):
        return frozenset(proc)
    return frozenset(f for f, name in _CPUID_NAMES.items() if cpuid.get(name))


def kernel_path_for(machine: str, flags: set[str]) -> str:
    """`<machine> <path>` for a machine name and its CPU flags, e.g. "x86_64 avx2"."""
    table = _ARM_PATHS if machine.lower() in ("aarch64", "arm64") else _X86_PATHS
    path = next((name for name, needs in table if all(f in flags for f in needs)), "baseline")
    return f"{machine} {path}"


@lru_cache(maxsize=1)
def quantized_kernel_path() -> str:
    """This host's int8-activation kernel path, e.g. "x86_64 avx512vnni" ("x86_64 baseline" when unknown)."""
    return kernel_path_for(platform.machine() or "unknown", set(cpu_flags()))
