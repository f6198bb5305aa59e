"""A fast BLAS for MLX's CPU backend on Linux.

The ``mlx[cpu]`` wheel bundles the reference (netlib) BLAS, whose fp32 GEMM is 25-30x
slower than OpenBLAS here. MLX calls BLAS through ordinary dynamic symbols, so
preloading a system OpenBLAS (Debian/Ubuntu: ``apt install libopenblas0-pthread``)
interposes its ``cblas_sgemm``. The CLI does this automatically by re-executing
itself once with ``LD_PRELOAD``; ``GENESIS_MLX_BLAS=off`` disables it, and
``GENESIS_MLX_OPENBLAS=/path/libopenblas.so.0`` picks the library.
"""

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path
from typing import Optional

CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]
CHILD_FLAG = "GENESIS_MLX_BLAS_REEXEC"


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


def loaded_blas() -> str:
    """Which BLAS this process has mapped: 'openblas' or 'reference'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return "openblas" if "libopenblas" in maps else "reference"


def reexec_with_openblas(argv) -> None:
    """Re-runs this command with OpenBLAS preloaded, when that is possible and wanted.
    Returns only if it does not re-execute."""
    if not sys.platform.startswith("linux") or os.environ.get(CHILD_FLAG):
        return
    if os.environ.get("GENESIS_MLX_BLAS", "auto").lower() in ("off", "0", "no", "reference"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    library = find_openblas()
    if library is None:
        return
    preload = ":".join(p for p in [library, os.environ.get("LD_PRELOAD", "")] if p)
    env = dict(os.environ, LD_PRELOAD=preload, **{CHILD_FLAG: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "genesis_mlx", *argv], env)


def advice() -> str:
    if not sys.platform.startswith("linux"):
        return "MLX uses Accelerate/Metal here"
    if loaded_blas() == "openblas":
        return "OpenBLAS preloaded"
    return ("reference BLAS (slow fp32 matmul): install OpenBLAS, e.g. "
            "'apt install libopenblas0-pthread', and genesis-mlx will preload it")
