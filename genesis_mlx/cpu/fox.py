"""FoX attention arranged for MLX's CPU backend: the math of
``kernels.fox.naive.fox_attention``, laid out for how that backend runs it.

- Long prefills: MLX's CPU backend runs each elementwise op on one thread and only
  the BLAS calls use every core, but every CPU stream has a thread of its own, so
  independent pieces of work put on different streams run at the same time. The
  queries are cut into row blocks (which also lets each block skip the keys after
  it), dealt out over one stream per core and joined.
- A few queries against a cache: each head a matrix-vector product over the cache as
  it is laid out (K per KV head, V per head), exact or quantized.
- Decoding: one token against the cache's preallocated buffers as one compiled graph,
  whose shapes change only when the buffers grow, where the eager ops would be tens
  of graph nodes a layer, each costing the Python thread that builds and dispatches
  the graph time it shares with the BLAS threads.
"""

import functools
import os
import threading
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

from ..kernels.fox.naive import allowed_keys, fox_attention, kv_heads
from .fastmath import softmax

# Below this many queries the pieces are too small to gain from the streams.
MIN_PARALLEL_QUERIES = 256
FOX_ROW_BLOCK = 128


@functools.lru_cache(maxsize=None)
def cpu_streams() -> List[mx.Stream]:
    cores = min(os.cpu_count() or 1, 8)
    return [mx.new_stream(mx.cpu) for _ in range(cores)]


def use_cpu_streams(n_queries: int, training: bool) -> bool:
    """Inference on the CPU, long enough to be worth it, more than one core."""
    return (not training and n_queries >= MIN_PARALLEL_QUERIES
            and mx.default_device() == mx.cpu and len(cpu_streams()) > 1)


def deal_out(costs: Sequence[float], n_streams: int) -> List[int]:
    """Assigns pieces to streams, largest first to the least loaded stream."""
    load = [0.0] * n_streams
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        s = min(range(n_streams), key=load.__getitem__)
        owner[i], load[s] = s, load[s] + costs[i]
    return owner


def fox_attention_parallel(q, k, v, cumsum_q, cumsum_k, scale: float,
                           key_start: Optional[mx.array] = None,
                           block_size: int = FOX_ROW_BLOCK) -> mx.array:
    """``naive.fox_attention`` in query row blocks over the CPU streams. A block's
    queries are the last of the keys up to its own end, so each block only sees
    those keys: causal attention does about half the work of the full matrix."""
    Tq, Tk = q.shape[2], k.shape[2]
    first = Tk - Tq  # position of query 0 among the keys
    starts = list(range(0, Tq, block_size))
    ends = [min(s + block_size, Tq) for s in starts]
    streams = cpu_streams()
    owner = deal_out([(e - s) * (first + e) for s, e in zip(starts, ends)], len(streams))
    outputs = []
    for s, e, stream in zip(starts, ends, owner):
        n_keys = first + e
        with mx.stream(streams[stream]):
            outputs.append(fox_attention(
                q[..., s:e, :], k[..., :n_keys, :], v[..., :n_keys, :],
                cumsum_q[..., s:e], cumsum_k[..., :n_keys], scale, key_start,
                block_size=e - s))
    return mx.concatenate(outputs, axis=2)


def cache_product(x: mx.array, cached, transpose: bool,
                  quantized: Optional[Tuple[int, int]]) -> mx.array:
    """x @ cached (or @ cached^T), cached plain or an mx.quantize triple."""
    if quantized is None:
        y = cached.astype(mx.float32)
        return x @ (y.swapaxes(-1, -2) if transpose else y)
    group_size, bits = quantized
    return mx.quantized_matmul(x, *cached, transpose=transpose, group_size=group_size,
                               bits=bits)


def fox_attention_grouped(q, k, v_cached, cumsum_q, cumsum_k, scale: float,
                          key_start: Optional[mx.array] = None,
                          quantized: Optional[Tuple[int, int]] = None,
                          key_end: Optional[mx.array] = None) -> mx.array:
    """``fox_attention`` for a few queries against a cache.

    k: [B, Hkv, Tk, D]; v_cached: per head [B, H, Tk, D]. ``quantized=(group_size,
    bits)``: k and v_cached are mx.quantize triples, multiplied without dequantizing.
    ``key_end`` (an array): keys from it on are not written yet (a preallocated
    buffer).
    """
    B, H, Tq, D = q.shape
    Hkv = kv_heads(k)
    Tk = cumsum_k.shape[-1]
    n_rep = H // Hkv
    # [B, Hkv, n_rep, Tq, D] @ [B, Hkv, 1, D, Tk]: a product per head against its
    # group's K (broadcast, not copied). For one query each is a matrix-vector
    # product, which the CPU's BLAS does without first copying K into a packed
    # buffer, as it does for a [n_rep, D] x [D, Tk] product.
    grouped_q = (q.astype(mx.float32) * scale).reshape(B, Hkv, n_rep, Tq, D)
    k = tuple(a[:, :, None] for a in k) if quantized else k[:, :, None]
    scores = cache_product(grouped_q, k, True, quantized).reshape(B, H, Tq, Tk)
    scores = scores + (cumsum_q[..., None] - cumsum_k[..., None, :])
    allowed = allowed_keys(Tq, Tk, key_start, key_end)
    if allowed is not None:
        scores = mx.where(allowed, scores, -mx.inf)
    return cache_product(softmax(scores, axis=-1), v_cached, False, quantized)


def fox_decode_step(q, k, v, log_f, keys, values, cumsums, offset, key_start, scale):
    """One decoding token against a FoX cache's buffers, for one compiled graph
    (``mx.compile(fox_decode_step)``, which the caller owns): writes k, v and the
    forget gates' running sum at row ``offset`` (in place where the buffers are not
    shared) and attends over every row, those past the token masked
    (``fox_attention_grouped`` with ``key_end``). Its shapes change only when
    the buffers grow, so it is traced once per buffer size, for all FoX layers.

    q, v [B, H, 1, D]; k [B, Hkv, 1, D]; log_f [B, H, 1]; keys [B, Hkv, S, D];
    values [B, H, S, D]; cumsums [B, H, S]; offset [1] int32 (>= 1: a token is
    cached before this one); key_start [B] int32 (left padding).
    -> output [B, H, 1, D], keys, values, cumsums"""
    B, H = q.shape[:2]
    previous = mx.slice(cumsums, offset - 1, axes=(2,), slice_size=(B, H, 1))
    cumsum = previous + log_f
    keys = mx.slice_update(keys, k.astype(keys.dtype), offset, axes=(2,))
    values = mx.slice_update(values, v.astype(values.dtype), offset, axes=(2,))
    cumsums = mx.slice_update(cumsums, cumsum, offset, axes=(2,))
    out = fox_attention_grouped(q, keys, values, cumsum, cumsums, scale, key_start,
                                key_end=offset + 1)
    return out, keys, values, cumsums


class Compiled(threading.local):
    """``fox_decode_step`` compiled once per thread (see ``fastmath.Compiled``)."""

    def __init__(self):
        self.decode_step = mx.compile(fox_decode_step)


COMPILED = Compiled()


def attend_token(q, k, v, log_f, cache, scale: float) -> mx.array:
    """One token against an exact FoX cache that holds tokens: the compiled
    ``fox_decode_step`` on the cache's buffers, which take the token."""
    cache.reserve(1)
    key_start = cache.left_padding
    if key_start is None:  # an array made here, not a graph node
        key_start = mx.array([0] * q.shape[0], mx.int32)
    out, keys, values, cumsum = COMPILED.decode_step(
        q, k, v, log_f, cache.keys, cache.values, cache.cumsum,
        mx.array([cache.offset], mx.int32), key_start, scale)
    cache.commit_token(keys, values, cumsum)
    return out
