"""The FoX attention kernel for long prompts: ``metal/fox_attention_tiled.inc``,
flash-attention tiles in threadgroup memory.

It computes what ``naive.fox_attention`` computes, without the bias matrix (the
forget bias comes from the cumsums as each tile is read) and without repeating K
for GQA. No VJP: inference only."""

from typing import Optional

import mlx.core as mx
import numpy as np

from ..backend import gpu_backend
from ..guard import KernelGuard, probe_array
from ..launcher import Kernel
from .naive import fox_attention

KERNEL = Kernel(
    "genesis_fox_attention_tiled", "fox_attention_tiled.inc",
    inputs=[("q", "float"), ("k", "float"), ("v", "float"), ("cq", "float"), ("ck", "float"),
            ("key_start", "int"), ("scale", "float")],
    outputs=["acc", "m", "l"], shapes_of=["cq", "ck"], templates=["D", "H", "N_REP", "BQ", "BK"],
    barriers=True)

# Query rows per threadgroup and keys per tile: K and V tiles of 32 x D floats (16 KB
# at D = 64) fit the 32 KB of threadgroup memory Metal guarantees.
TILE_QUERIES = 32
TILE_KEYS = 32


def kernel_inputs(q, k, v, cumsum_q, cumsum_k, scale, key_start):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if key_start is None:
        key_start = mx.zeros((B,), mx.int32)
    return [q.reshape(B * H, Tq, D), k.reshape(B * Hkv, Tk, D), v.reshape(B * H, Tk, D),
            cumsum_q.astype(mx.float32).reshape(B * H, Tq),
            cumsum_k.astype(mx.float32).reshape(B * H, Tk),
            key_start.astype(mx.int32), mx.array([scale], mx.float32)]


def fox_attention_tiled(q, k, v, cumsum_q, cumsum_k, scale: float,
                        key_start: Optional[mx.array] = None,
                        backend: Optional[str] = None) -> mx.array:
    """Same contract as ``naive.fox_attention``."""
    backend = backend or gpu_backend()
    B, H, Tq, D = q.shape
    n_groups = B * H * -(-Tq // TILE_QUERIES)
    template = {"D": D, "H": H, "N_REP": H // k.shape[1], "BQ": TILE_QUERIES, "BK": TILE_KEYS}
    acc, _, l = KERNEL(
        backend, kernel_inputs(q, k, v, cumsum_q, cumsum_k, scale, key_start), template,
        n_groups * TILE_QUERIES, [(B * H, Tq, 1, D), (B * H, Tq, 1), (B * H, Tq, 1)],
        threadgroup=TILE_QUERIES)
    return (acc[:, :, 0] / l).reshape(B, H, Tq, D)


def probe(n_queries: int, n_keys: int):
    """Probe inputs for two sequences, the second left-padded by 5 keys; dims: (heads,
    KV heads, D)."""

    def make(dtype, dims) -> tuple:
        H, Hkv, D = dims
        rng = np.random.RandomState(0)
        q = probe_array(rng, (2, H, n_queries, D), dtype)
        k = probe_array(rng, (2, Hkv, n_keys, D), dtype)
        v = probe_array(rng, (2, H, n_keys, D), dtype)
        cumsum = np.cumsum(-rng.uniform(0, 0.3, (2, H, n_keys)), axis=-1).astype(np.float32)
        return (q, k, v, mx.array(cumsum[..., n_keys - n_queries:]), mx.array(cumsum),
                D ** -0.5, mx.array([0, 5], mx.int32))

    return make


# 40 queries after 30 earlier keys: a whole tile and a partial one each way.
GUARD = KernelGuard(
    "FoX tiled attention",
    run=lambda backend, *inputs: fox_attention_tiled(*inputs, backend=backend),
    twin=fox_attention, probe=probe(40, 70))
