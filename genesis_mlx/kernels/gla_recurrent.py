"""The GLA recurrent kernel (decode and short prompts) for Metal and CUDA, from one
body (``metal/gla_recurrent.inc``), plus a CPU emulation that compiles the same
body as C++ so that CI runs the kernel's logic on every commit.

What it must compute is ``naive.gla_chunked`` / ``naive.gla_step``: the tests tie
them together. It has no VJP: the model uses it only when decoding with a cache
(inference); training goes through the ops path.
"""

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

SOURCE_DIR = Path(__file__).parent / "metal"
INPUTS = ["q", "k", "v", "g", "s0", "scale"]
OUTPUTS = ["out", "s_out"]
THREADGROUP = 128

PRELUDES = {
    "metal": "#define GLOBAL_THREAD_ID thread_position_in_grid.x\n#define EXP metal::exp\n",
    "cuda": ("typedef unsigned int uint;\n"
             "#define GLOBAL_THREAD_ID (blockIdx.x * blockDim.x + threadIdx.x)\n"
             "#define EXP expf\n"),
}


def body() -> str:
    return (SOURCE_DIR / "gla_recurrent.inc").read_text()


@functools.lru_cache(maxsize=None)
def gpu_kernel(backend: str):
    factory = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    return factory(name="genesis_gla_recurrent", input_names=INPUTS, output_names=OUTPUTS,
                   source=body(), header=PRELUDES[backend])


def gpu_backend() -> Optional[str]:
    """"metal", "cuda", None (ops path), or "emulate" (the kernel body on the CPU, for
    tests: ``GENESIS_MLX_KERNELS=emulate``)."""
    choice = os.environ.get("GENESIS_MLX_KERNELS", "auto")
    if choice in ("off", "emulate"):
        return None if choice == "off" else "emulate"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


def flatten_inputs(q, k, v, log_g, state):
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if state is None:
        state = mx.zeros((B, H, Dk, Dv), mx.float32)
    return (q.reshape(B * H, T, Dk), k.reshape(B * H, T, Dk), v.reshape(B * H, T, Dv),
            log_g.astype(mx.float32).reshape(B * H, T),
            state.astype(mx.float32).reshape(B * H, Dk, Dv))


def gla_recurrent(q, k, v, log_g, scale: float, state=None,
                  backend: Optional[str] = None) -> Tuple[mx.array, mx.array]:
    """Same contract as ``naive.gla_chunked`` (without the delta rule), on the GPU."""
    backend = backend or gpu_backend()
    if backend == "emulate":
        return gla_recurrent_emulated(q, k, v, log_g, scale, state)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    qf, kf, vf, g, s0 = flatten_inputs(q, k, v, log_g, state)
    n = B * H * Dv
    out, s_out = gpu_kernel(backend)(
        inputs=[qf, kf, vf, g, s0, mx.array([scale], mx.float32)],
        template=[("DK", Dk), ("DV", Dv)],
        grid=(((n + THREADGROUP - 1) // THREADGROUP) * THREADGROUP, 1, 1),
        threadgroup=(THREADGROUP, 1, 1),
        output_shapes=[(B * H, T, Dv), (B * H, Dk, Dv)],
        output_dtypes=[mx.float32, mx.float32],
    )
    return out.reshape(B, H, T, Dv), s_out.reshape(B, H, Dk, Dv)


# --- CPU emulation: the same body, compiled as C++, one call per GPU thread ---

EMULATION_TEMPLATE = """
#include <cmath>
#include <cstdint>
typedef unsigned int uint;
#define EXP std::exp
template <int DK, int DV>
static void thread_body(uint GLOBAL_THREAD_ID, const float* q, const float* k, const float* v,
                        const float* g, const float* s0, const float* scale, float* out,
                        float* s_out, const int* g_shape) {
%(body)s
}
extern "C" void run_%(dk)d_%(dv)d(uint n_threads, const float* q, const float* k,
                                  const float* v, const float* g, const float* s0,
                                  const float* scale, float* out, float* s_out,
                                  const int* g_shape) {
  for (uint tid = 0; tid < n_threads; ++tid) {
    thread_body<%(dk)d, %(dv)d>(tid, q, k, v, g, s0, scale, out, s_out, g_shape);
  }
}
"""


@functools.lru_cache(maxsize=None)
def emulation_library(dk: int, dv: int):
    source = EMULATION_TEMPLATE % {"body": body(), "dk": dk, "dv": dv}
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    build = Path(tempfile.gettempdir()) / "genesis-mlx-kernels"
    build.mkdir(exist_ok=True)
    library = build / f"gla_recurrent_{dk}_{dv}_{digest}.so"
    if not library.exists():
        src = library.with_suffix(".cpp")
        src.write_text(source)
        subprocess.run(["c++", "-O2", "-std=c++17", "-shared", "-fPIC", str(src), "-o",
                        str(library)], check=True, capture_output=True)
    return ctypes.CDLL(str(library))


def gla_recurrent_emulated(q, k, v, log_g, scale: float, state=None):
    """Runs the kernel body on the CPU, thread by thread (float32)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    arrays = [np.ascontiguousarray(np.array(a.astype(mx.float32)), dtype=np.float32)
              for a in flatten_inputs(q, k, v, log_g, state)]
    scale_arr = np.array([scale], np.float32)
    out = np.zeros((B * H, T, Dv), np.float32)
    s_out = np.zeros((B * H, Dk, Dv), np.float32)
    g_shape = np.array([B * H, T], np.int32)
    run = getattr(emulation_library(Dk, Dv), f"run_{Dk}_{Dv}")
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    run(ctypes.c_uint(B * H * Dv), *[ptr(a) for a in arrays], ptr(scale_arr), ptr(out),
        ptr(s_out), ptr(g_shape))
    return mx.array(out.reshape(B, H, T, Dv)), mx.array(s_out.reshape(B, H, Dk, Dv))
