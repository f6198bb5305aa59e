"""The FoX attention kernels: ``metal/fox_attention.inc`` (rows x key splits, for
prefill and decode) and ``metal/fox_attention_tiled.inc`` (flash-attention tiles in
threadgroup memory, for long prefills).

Both compute what ``naive.fox_attention`` computes, without the bias matrix and
without repeating K for GQA. The row kernel cuts keys into splits, each its own
thread, whose partial softmaxes are merged here (flash-decoding), so a single query
row still spreads over many threads. No VJP: inference only."""

from typing import Optional

import mlx.core as mx
import numpy as np

from ...fastmath import exp
from ..backend import gpu_backend
from ..guard import KernelGuard, probe_array
from ..launcher import Kernel
from .naive import fox_attention

KERNEL = Kernel(
    "genesis_fox_attention", "fox_attention.inc",
    inputs=[("q", "float"), ("k", "float"), ("v", "float"), ("cq", "float"), ("ck", "float"),
            ("key_start", "int"), ("scale", "float")],
    outputs=["acc", "m", "l"], shapes_of=["cq", "ck"], templates=["D", "H", "N_REP", "SPLIT"])

TILED_KERNEL = Kernel(
    "genesis_fox_attention_tiled", "fox_attention_tiled.inc",
    inputs=KERNEL.inputs, outputs=KERNEL.outputs, shapes_of=KERNEL.shapes_of,
    templates=["D", "H", "N_REP", "BQ", "BK"], barriers=True)

# Query rows per threadgroup and keys per tile: K and V tiles of 32 x D floats (16 KB
# at D = 64) fit the 32 KB of threadgroup memory Metal guarantees.
TILE_QUERIES = 32
TILE_KEYS = 32

# Enough threads to fill a GPU: rows x splits >= this many, splits of >= MIN_SPLIT keys.
TARGET_THREADS = 4096
MIN_SPLIT = 64


def split_size(n_rows: int, n_keys: int) -> int:
    """Keys per split: one split per row when the rows alone fill the GPU (long
    prefills), else enough splits to get there (decode). A power of two, so that
    decoding step after step reuses one compiled kernel."""
    wanted = -(-TARGET_THREADS // n_rows)  # splits per row
    size = max(MIN_SPLIT, -(-n_keys // wanted))
    return 1 << (size - 1).bit_length()


def merge_splits(acc, m, l):
    """Partial softmaxes [.., n_split, D], [.., n_split] -> normalized output."""
    weight = exp(m - m.max(axis=-1, keepdims=True))
    return (acc * weight[..., None]).sum(axis=-2) / (l * weight).sum(axis=-1)[..., None]


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
    """Same contract as ``naive.fox_attention``, in tiles (one key split per row)."""
    backend = backend or gpu_backend()
    B, H, Tq, D = q.shape
    n_groups = B * H * -(-Tq // TILE_QUERIES)
    template = {"D": D, "H": H, "N_REP": H // k.shape[1], "BQ": TILE_QUERIES, "BK": TILE_KEYS}
    acc, m, l = TILED_KERNEL(
        backend, kernel_inputs(q, k, v, cumsum_q, cumsum_k, scale, key_start), template,
        n_groups * TILE_QUERIES, [(B * H, Tq, 1, D), (B * H, Tq, 1), (B * H, Tq, 1)],
        threadgroup=TILE_QUERIES)
    return merge_splits(acc, m, l).reshape(B, H, Tq, D)


def fox_attention_kernel(q, k, v, cumsum_q, cumsum_k, scale: float,
                         key_start: Optional[mx.array] = None,
                         backend: Optional[str] = None, split: Optional[int] = None) -> mx.array:
    """Same contract as ``naive.fox_attention``. ``split``: keys per thread (default
    from ``split_size``)."""
    backend = backend or gpu_backend()
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    split = split or split_size(B * H * Tq, Tk)
    n_split = -(-Tk // split)
    inputs = kernel_inputs(q, k, v, cumsum_q, cumsum_k, scale, key_start)
    template = {"D": D, "H": H, "N_REP": H // Hkv, "SPLIT": split}
    acc, m, l = KERNEL(backend, inputs, template, B * H * Tq * n_split,
                       [(B * H, Tq, n_split, D), (B * H, Tq, n_split), (B * H, Tq, n_split)])
    return merge_splits(acc, m, l).reshape(B, H, Tq, D)


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


# Rows: 3 queries after 67 cached keys, cut into two key splits merged afterwards.
GUARD = KernelGuard(
    "FoX attention",
    run=lambda backend, *inputs: fox_attention_kernel(*inputs, backend=backend),
    twin=fox_attention, probe=probe(3, 70))

# Tiled: 40 rows and keys, a whole tile and a partial one each way.
TILED_GUARD = KernelGuard(
    "FoX tiled attention",
    run=lambda backend, *inputs: fox_attention_tiled(*inputs, backend=backend),
    twin=fox_attention, probe=probe(40, 40))
