"""FoX attention arranged for MLX's CPU backend: the same math as ``naive`` and
``cached``, laid out for how that backend runs it.

- Long prefills: MLX's CPU backend runs each elementwise op on one thread and only
  the BLAS calls use every core, but every CPU stream has a thread of its own, so
  independent pieces of work put on different streams run at the same time. The
  queries are cut into row blocks (which also lets each block skip the keys after
  it), dealt out over one stream per core and joined.
- Decoding: one token against the cache's preallocated buffers as one compiled graph,
  whose shapes change only when the buffers grow, where the eager ops would be tens
  of graph nodes a layer, each costing the Python thread that builds and dispatches
  the graph time it shares with the BLAS threads.
"""

import functools
import os
from typing import List, Optional, Sequence

import mlx.core as mx

from .cached import fox_attention_grouped
from .naive import fox_attention

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


def fox_decode_step(q, k, v, log_f, keys, values, cumsums, offset, key_start, scale):
    """One decoding token against a FoX cache's buffers, for one compiled graph
    (``mx.compile(fox_decode_step)``, which the caller owns): writes k, v and the
    forget gates' running sum at row ``offset`` (in place where the buffers are not
    shared) and attends over every row, those past the token masked
    (``cached.fox_attention_grouped`` with ``key_end``). Its shapes change only when
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
