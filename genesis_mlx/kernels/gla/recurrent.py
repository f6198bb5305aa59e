"""The GLA recurrent kernel (decoding and short prompts): ``metal/gla_recurrent.inc``,
one GPU thread per (batch * head, value column), its column of the state in
registers for all T steps.

It computes what ``naive.gla_chunked`` / ``naive.gla_step`` compute (tests tie them
together) and has no VJP: the model uses it only when decoding with a cache; training
goes through the ops path."""

from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from ..backend import gpu_backend
from ..guard import KernelGuard, probe_array
from ..launcher import Kernel
from .naive import gla_chunked

KERNEL = Kernel(
    "genesis_gla_recurrent", "gla_recurrent.inc",
    inputs=[("q", "float"), ("k", "float"), ("v", "float"), ("g", "float"), ("s0", "float"),
            ("scale", "float")],
    outputs=["out", "s_out"], shapes_of=["g"], templates=["DK", "DV"])


def gla_recurrent(q, k, v, log_g, scale: float, state=None,
                  backend: Optional[str] = None) -> Tuple[mx.array, mx.array]:
    """Same contract as ``naive.gla_chunked`` (without the delta rule)."""
    backend = backend or gpu_backend()
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if state is None:
        state = mx.zeros((B, H, Dk, Dv), mx.float32)
    inputs = [q.reshape(B * H, T, Dk), k.reshape(B * H, T, Dk), v.reshape(B * H, T, Dv),
              log_g.astype(mx.float32).reshape(B * H, T),
              state.astype(mx.float32).reshape(B * H, Dk, Dv), mx.array([scale], mx.float32)]
    out, s_out = KERNEL(backend, inputs, {"DK": Dk, "DV": Dv}, B * H * Dv,
                        [(B * H, T, Dv), (B * H, Dk, Dv)])
    return out.reshape(B, H, T, Dv), s_out.reshape(B, H, Dk, Dv)


def probe(dtype, dims) -> tuple:
    """Three steps from a nonzero state for one sequence; dims: (heads, Dk, Dv)."""
    H, Dk, Dv = dims
    rng = np.random.RandomState(0)
    q, k = (probe_array(rng, (1, H, 3, Dk), dtype, s) for s in (1.0, 0.2))
    v = probe_array(rng, (1, H, 3, Dv), dtype)
    log_g = mx.array(-rng.uniform(0, 0.7, (1, H, 3)).astype(np.float32))
    state = probe_array(rng, (1, H, Dk, Dv))
    return q, k, v, log_g, Dk ** -0.5, state


GUARD = KernelGuard(
    "GLA recurrent",
    run=lambda backend, *inputs: gla_recurrent(*inputs, backend=backend),
    twin=lambda q, k, v, log_g, scale, state: gla_chunked(q, k, v, log_g, scale, 64, state),
    probe=probe)
