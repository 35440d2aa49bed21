"""Build (once per machine) and load this package's C kernel, ``gemv_4bit.c``.

The kernel is plain C with AVX2/FMA intrinsics, built at first use with the system C compiler
(``$CC``, default ``cc``) into a per-user cache and loaded with ctypes, as bitsandbytes loads its
own library: no Python extension, no torch headers, no build tool beyond the compiler (about a
second). The file name carries a hash of the source and the flags, so an edited source is rebuilt
and a stale binary is never loaded; the build writes a temporary file and renames it, so processes
starting together may both build but never load a half-written file.

Where it cannot be built (no AVX2/FMA, no compiler, a failed build) :func:`library` returns None and
:func:`unavailable_reason` says why; callers then use the dequantize-then-matmul path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv_4bit.c")
# -ffp-contract=off: the double-quantized absmax is a multiply then an add, rounded twice, as the
# dequantization computes it. OpenMP is optional (the kernel then runs on one thread).
BASE_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-shared", "-fPIC"]
FLAG_SETS = [BASE_FLAGS + ["-fopenmp"], BASE_FLAGS]
CACHE_ENV = "CPM_LIVE_KERNEL_CACHE"  # where built kernels go (default ~/.cache/cpm_live/kernels)

_P, _N = ctypes.c_void_p, ctypes.c_longlong
GEMV_ARGTYPES = [_P, _N, _N, _P, _N, _N, _P, _P, _P, _P, _P, _N, ctypes.c_float, _N, _P, _N, ctypes.c_int]


def cpu_has_avx2() -> bool:
    """x86-64 with AVX2 and FMA (torch reports "AVX2" or "AVX512" only when both are present)."""
    return platform.machine().lower() in ("x86_64", "amd64") and \
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cpm_live", "kernels")
    return Path(root)


def _build(compiler: str, source: bytes) -> tuple[Path | None, str]:
    """Compile with the first flag set that works; returns (path, "") or (None, the compiler's complaint)."""
    errors = []
    for flags in FLAG_SETS:
        digest = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
        target = cache_dir() / f"gemv_4bit-{digest}.so"
        if target.is_file():
            return target, ""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                    timeout=300)
            if result.returncode == 0:
                os.replace(tmp, target)
                return target, ""
            errors.append(f"{compiler} {' '.join(flags)}: {result.stderr.strip()[-500:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None, "; ".join(errors)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    if not cpu_has_avx2():
        return None, f"the CPU has no AVX2/FMA ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()})"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')!r} is not on PATH)"
    try:
        path, error = _build(compiler, SOURCE.read_bytes())
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building {SOURCE.name} failed: {e}"
    if path is None:
        return None, f"building {SOURCE.name} failed: {error}"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"loading {path} failed: {e}"
    lib.cpm_gemv_4bit.argtypes = GEMV_ARGTYPES
    lib.cpm_gemv_4bit.restype = ctypes.c_int
    return lib, ""


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (then :func:`unavailable_reason` says why).

    The first call builds it if needed; a CPU with AVX2 that still gets no kernel (no compiler, a
    failed build) warns once, since decoding then runs several times slower."""
    lib, reason = _load()
    if lib is None and cpu_has_avx2():
        _warn_once(reason)
    return lib


def unavailable_reason() -> str:
    return _load()[1]


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"cpm_live: the fused 4-bit CPU kernel is unavailable ({reason}); 4-bit layers decode by "
                  f"dequantizing each weight, several times slower. Install a C compiler (gcc) to enable it.",
                  RuntimeWarning, stacklevel=3)
