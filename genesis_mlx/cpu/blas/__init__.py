"""A fast BLAS for MLX's CPU backend on Linux.

The ``mlx[cpu]`` wheel bundles the reference (netlib) BLAS, whose fp32 GEMM is an
order of magnitude slower than OpenBLAS's. MLX calls BLAS through ordinary dynamic
symbols, so preloading a system OpenBLAS (Debian/Ubuntu: ``apt install
libopenblas0-pthread``) interposes its ``cblas_sgemm``. In front of it goes
``gemv_forward.c``, compiled once with the system C compiler, which sends
vector-times-matrix products (all of decoding) to OpenBLAS's GEMV, which streams the
weights faster than its GEMM does for one row (see the source; figures in
BENCHMARKS.md).

A preload reaches every library of the process: torch, too, exports ``sgemm_`` and
``sgemv_`` and binds them to a preloaded OpenBLAS, whose threads then run against its
own. So only MLX processes get it; ``genesis-mlx bench`` starts the PyTorch reference
without it.

The CLI does this automatically by re-executing itself once with ``LD_PRELOAD``;
``GENESIS_MLX_BLAS=off`` disables it, ``GENESIS_MLX_GEMV=off`` keeps OpenBLAS but
not the GEMV forwarding, and ``GENESIS_MLX_OPENBLAS=/path/libopenblas.so.0`` picks the
library. ``genesis-mlx info`` prints the ``LD_PRELOAD`` line for your own processes.
"""

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]
CHILD_FLAG = "GENESIS_MLX_BLAS_REEXEC"
GEMV_SOURCE = Path(__file__).with_name("gemv_forward.c")
OFF = ("off", "0", "no", "reference")


def switched_off(variable: str) -> bool:
    return os.environ.get(variable, "auto").lower() in OFF


def find_openblas() -> Optional[str]:
    chosen = os.environ.get("GENESIS_MLX_OPENBLAS")
    found = ctypes.util.find_library("openblas")
    for path in [chosen, *CANDIDATES, found]:
        if path and ("/" not in path or Path(path).exists()):
            try:
                ctypes.CDLL(path)
                return path
            except OSError:
                continue
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genesis-mlx"


def build_gemv_forward() -> Optional[str]:
    """The compiled GEMV forwarding library (built on first use, kept under the user's
    cache named by the source's hash); None without a C compiler or if the build fails:
    OpenBLAS alone still works."""
    source = GEMV_SOURCE.read_bytes()
    target = cache_dir() / f"gemv_forward-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if target.exists():
        return str(target)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        built = subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(GEMV_SOURCE), "-ldl"],
            capture_output=True, timeout=120)
        if built.returncode:
            return None
        os.replace(partial, target)  # atomic: concurrent first runs never see half a file
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        partial.unlink(missing_ok=True)
    return str(target)


def preload_libraries() -> List[str]:
    """What to preload, in order: the GEMV forwarding (if wanted and buildable), then
    OpenBLAS. Empty when there is no OpenBLAS."""
    library = find_openblas()
    if library is None:
        return []
    forward = None if switched_off("GENESIS_MLX_GEMV") else build_gemv_forward()
    return [p for p in (forward, library) if p]


def command_preload() -> List[str]:
    """What the ``genesis-mlx`` command preloads on this machine: empty off Linux, with
    GENESIS_MLX_BLAS=off, or without OpenBLAS."""
    if not sys.platform.startswith("linux") or switched_off("GENESIS_MLX_BLAS"):
        return []
    return preload_libraries()


def mapped_libraries() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


def loaded_blas() -> str:
    """Which BLAS MLX computes with here: 'openblas' (a system OpenBLAS mapped: the
    preload), 'reference' or 'unknown'. An OpenBLAS that a Python package bundles
    for itself (numpy 1.x's, under site-packages) is not MLX's."""
    maps = mapped_libraries()
    if not maps:
        return "unknown"
    paths = {line.split()[-1] for line in maps.splitlines() if "/" in line}
    system = [p for p in paths if os.path.basename(p).startswith("libopenblas")
              and "site-packages" not in p]
    return "openblas" if system else "reference"


def gemv_forwarding() -> bool:
    return "gemv_forward-" in mapped_libraries()


def describe() -> str:
    """The BLAS as the info and bench lines print it."""
    blas = loaded_blas()
    return f"{blas} + gemv forwarding" if blas == "openblas" and gemv_forwarding() else blas


def reexec_with_openblas(argv) -> None:
    """Re-runs this command with OpenBLAS preloaded, when that is possible and wanted.
    Returns only if it does not re-execute."""
    if os.environ.get(CHILD_FLAG) or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    libraries = command_preload()
    if not libraries:
        return
    preload = ":".join(p for p in [*libraries, os.environ.get("LD_PRELOAD", "")] if p)
    env = dict(os.environ, LD_PRELOAD=preload, **{CHILD_FLAG: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "genesis_mlx", *argv], env)


def advice() -> str:
    if not sys.platform.startswith("linux"):
        return "MLX uses Accelerate/Metal here"
    if loaded_blas() == "openblas":
        if gemv_forwarding():
            return "OpenBLAS preloaded, vector products through its GEMV"
        if switched_off("GENESIS_MLX_GEMV"):
            return "OpenBLAS preloaded, GEMV forwarding off"
        return "OpenBLAS preloaded; no C compiler for the GEMV forwarding (decoding slower)"
    return ("reference BLAS (slow fp32 matmul): install OpenBLAS, e.g. "
            "'apt install libopenblas0-pthread', and genesis-mlx will preload it")
