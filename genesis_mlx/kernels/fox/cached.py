"""Forgetting attention for a few queries against a cache (decoding, short chunks):
``naive.fox_attention``'s math on the cache's own layout, without copying it. The
cache keeps K per KV head and V per query head, or, quantized, V grouped by KV head
(``group_values``) as mx.quantize triples."""

from typing import Optional, Tuple

import mlx.core as mx

from ...fastmath import softmax


def group_values(v: mx.array, n_kv_heads: int) -> mx.array:
    """[B, H, T, D] -> [B, Hkv, T, n_rep * D]: query head h = g * n_rep + r goes to
    columns r * D:(r + 1) * D of KV group g (a quantized cache keeps K and V with the
    same heads)."""
    B, H, T, D = v.shape
    v = v.reshape(B, n_kv_heads, H // n_kv_heads, T, D).transpose(0, 1, 3, 2, 4)
    return v.reshape(B, n_kv_heads, T, -1)


def ungroup_values(v_grouped: mx.array, n_heads: int) -> mx.array:
    """The inverse of ``group_values``."""
    B, Hkv, T, _ = v_grouped.shape
    v = v_grouped.reshape(B, Hkv, T, n_heads // Hkv, -1).transpose(0, 1, 3, 2, 4)
    return v.reshape(B, n_heads, T, -1)


def kv_heads(cached) -> int:
    return (cached[0] if isinstance(cached, (list, tuple)) else cached).shape[1]


def cache_product(x: mx.array, cached, transpose: bool,
                  quantized: Optional[Tuple[int, int]]) -> mx.array:
    """x @ cached (or @ cached^T), cached plain or an mx.quantize triple."""
    if quantized is None:
        y = cached.astype(mx.float32)
        return x @ (y.swapaxes(-1, -2) if transpose else y)
    group_size, bits = quantized
    return mx.quantized_matmul(x, *cached, transpose=transpose, group_size=group_size,
                               bits=bits)


def allowed_keys(Tq: int, Tk: int, key_start: Optional[mx.array],
                 key_end: Optional[mx.array]) -> Optional[mx.array]:
    """Which keys each query may see (broadcasts against the scores [B, H, Tq, Tk];
    None: all). The queries are the last Tq keys before ``key_end`` (default Tk);
    keys before ``key_start`` [B] are left padding, which a query sees only if it
    is one itself."""
    if key_end is None and Tq == 1 and key_start is None:
        return None
    keys = mx.arange(Tk)
    if key_end is None:
        rows = mx.arange(Tk - Tq, Tk)[:, None]
    else:
        rows = key_end - 1 if Tq == 1 else mx.arange(Tq)[:, None] + (key_end - Tq)
    causal = None if key_end is None and Tq == 1 else keys <= rows
    if key_start is None:
        return causal
    after_padding = (keys >= key_start.reshape(-1, 1, 1, 1)) | (keys == rows)
    return after_padding if causal is None else causal & after_padding


def fox_attention_grouped(q, k, v_cached, cumsum_q, cumsum_k, scale: float,
                          key_start: Optional[mx.array] = None,
                          quantized: Optional[Tuple[int, int]] = None,
                          key_end: Optional[mx.array] = None) -> mx.array:
    """``fox_attention`` for a few queries against a cache.

    k: [B, Hkv, Tk, D]; v_cached: per head [B, H, Tk, D], or grouped by KV head
    [B, Hkv, Tk, n_rep * D] (the quantized cache). Grouped, the queries of one group
    share one product with V, which also forms the cross terms r != h (n_rep times
    the work of a per-head product); that costs less than materializing V per head
    for a handful of queries. ``quantized=(group_size, bits)``: k and v_cached are
    mx.quantize triples, multiplied without dequantizing. ``key_end`` (an array):
    keys from it on are not written yet (a preallocated buffer).
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
    weights = softmax(scores, axis=-1)
    if kv_heads(v_cached) == H:
        return cache_product(weights, v_cached, False, quantized)
    weights = weights.reshape(B, Hkv, n_rep * Tq, Tk)
    every_pair = cache_product(weights, v_cached, False, quantized)
    every_pair = every_pair.reshape(B, Hkv, n_rep, Tq, n_rep, D)
    own_head = mx.eye(n_rep, dtype=mx.bool_)[:, None, :, None]
    out = mx.where(own_head, every_pair, 0.0).sum(axis=-2)
    return out.reshape(B, H, Tq, D)
