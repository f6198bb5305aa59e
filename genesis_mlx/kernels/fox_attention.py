"""The FoX attention kernel (prefill and decode): ``metal/fox_attention.inc``.

It computes what ``naive.fox_attention`` computes, without the bias matrix and
without repeating K for GQA. No VJP: inference only."""

from typing import Optional

import mlx.core as mx

from .shared import SharedKernel, gpu_backend

KERNEL = SharedKernel(
    "genesis_fox_attention", "fox_attention.inc",
    inputs=[("q", "float"), ("k", "float"), ("v", "float"), ("cq", "float"), ("ck", "float"),
            ("key_start", "int"), ("scale", "float")],
    outputs=["out"], shapes_of=["cq", "ck"], templates=["D", "H", "N_REP"])


def fox_attention_kernel(q, k, v, cumsum_q, cumsum_k, scale: float,
                         key_start: Optional[mx.array] = None,
                         backend: Optional[str] = None) -> mx.array:
    """Same contract as ``naive.fox_attention``."""
    backend = backend or gpu_backend()
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if key_start is None:
        key_start = mx.zeros((B,), mx.int32)
    inputs = [q.reshape(B * H, Tq, D), k.reshape(B * Hkv, Tk, D), v.reshape(B * H, Tk, D),
              cumsum_q.astype(mx.float32).reshape(B * H, Tq),
              cumsum_k.astype(mx.float32).reshape(B * H, Tk),
              key_start.astype(mx.int32), mx.array([scale], mx.float32)]
    (out,) = KERNEL(backend, inputs, {"D": D, "H": H, "N_REP": H // Hkv}, B * H * Tq,
                    [(B * H, Tq, D)])
    return out.reshape(B, H, Tq, D)
