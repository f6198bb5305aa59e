"""Plain MLX reference implementations of the sequence mixers.

These are the "ops path": short, readable and differentiable. Every fused kernel in
this package must compute exactly what the functions here compute, and the tests tie
the two together. Shapes follow the model: ``[batch, heads, time, dim]``.
"""

from typing import Optional, Tuple

import mlx.core as mx

from ..fastmath import exp, softmax


def causal_decay(log_decay_cumsum: mx.array) -> mx.array:
    """exp(G_i - G_j) for j <= i, else 0, over the last axis of ``G``.

    The exponent is masked before ``exp`` (not the result after), so that neither
    the value nor its gradient can see ``exp`` of a large positive number.
    """
    n = log_decay_cumsum.shape[-1]
    diff = log_decay_cumsum[..., :, None] - log_decay_cumsum[..., None, :]
    causal = mx.tril(mx.ones((n, n), dtype=mx.bool_))
    return exp(mx.where(causal, diff, -mx.inf))


def gla_chunk(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    log_g: mx.array,
    scale: float,
    state: Optional[mx.array] = None,
    beta: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """Gated linear attention over one chunk, starting from ``state``.

    Recurrence: S_t = exp(g_t) S_{t-1} + k_t v_t^T,  o_t = scale * q_t S_t.
    With ``beta`` the state update at the chunk's end uses the reference's
    chunk-level delta rule: v is replaced by beta * (v - scale * k_w S_decayed).

    q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; log_g: [B, H, T] (<= 0, fp32);
    state: [B, H, Dk, Dv] fp32. Returns (output [B, H, T, Dv] fp32, new state).
    """
    q, k, v = (a.astype(mx.float32) for a in (q, k, v))
    G = mx.cumsum(log_g, axis=-1)
    scores = (q @ k.swapaxes(-1, -2)) * scale * causal_decay(G)
    out = scores @ v
    if state is not None:
        out = out + (q @ state) * (exp(G)[..., None] * scale)

    G_end = G[..., -1:]
    k_weighted = k * exp(G_end - G)[..., None]
    decayed = state * exp(G_end)[..., None] if state is not None else None
    if beta is not None and decayed is not None:
        v = (v - (k_weighted @ decayed) * scale) * beta[..., None]
    elif beta is not None:
        v = v * beta[..., None]
    update = k_weighted.swapaxes(-1, -2) @ v
    new_state = update if decayed is None else decayed + update
    return out, new_state


def gla_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    log_g: mx.array,
    scale: float,
    chunk_size: int = 64,
    state: Optional[mx.array] = None,
    beta: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """Gated linear attention over a whole sequence, in chunks of ``chunk_size``.

    Chunks are aligned to the start of ``q`` as in the reference, which matters only
    for the chunk-level delta rule (``beta``): plain GLA is chunking-invariant.
    """
    T = q.shape[2]
    outputs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        sl = (slice(None), slice(None), slice(start, end))
        out, state = gla_chunk(
            q[sl], k[sl], v[sl], log_g[sl], scale, state,
            None if beta is None else beta[sl],
        )
        outputs.append(out)
    out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)
    return out, state


def gla_step(
    q: mx.array, k: mx.array, v: mx.array, log_g: mx.array, scale: float,
    state: Optional[mx.array],
) -> Tuple[mx.array, mx.array]:
    """One decoding step of the GLA recurrence (T = 1), same contract as gla_chunk."""
    q, k, v = (a.astype(mx.float32) for a in (q, k, v))
    # The outer product k^T v as a broadcast product: it fuses with the decay into one
    # op (as a batched matmul it is one tiny BLAS call per head on the CPU).
    update = k.swapaxes(-1, -2) * v
    if state is not None:
        update = update + exp(log_g)[..., None] * state
    return (q @ update) * scale, update


def fox_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    cumsum_q: mx.array,
    cumsum_k: mx.array,
    scale: float,
    key_start: Optional[mx.array] = None,
    block_size: int = 512,
) -> mx.array:
    """Causal softmax attention biased by the forget gate: s_ij += c_i - c_j.

    q: [B, H, Tq, D]; k: [B, Hkv, Tk, D] (query head h reads KV head h // (H/Hkv));
    v: [B, H, Tk, D]; cumsum_q: [B, H, Tq]; cumsum_k: [B, H, Tk] (fp32).
    The queries are the last Tq of the Tk positions. Keys before ``key_start`` [B]
    (left padding) are masked; a padded query sees only itself, to stay finite.
    Queries go in blocks of ``block_size`` rows, so the bias matrix never exceeds
    block_size x Tk.
    """
    H, Tq = q.shape[1], q.shape[2]
    n_rep = H // k.shape[1]
    if n_rep > 1:
        k = mx.repeat(k, n_rep, axis=1)
    Tk = k.shape[2]
    keys = mx.arange(Tk)[None]
    outputs = []
    for start in range(0, Tq, block_size):
        end = min(start + block_size, Tq)
        rows = mx.arange(Tk - Tq + start, Tk - Tq + end)[:, None]
        allowed = rows >= keys
        if key_start is not None:
            after_padding = keys[None] >= key_start[:, None, None]
            allowed = ((allowed[None] & after_padding) | (rows == keys)[None])[:, None]
        bias = cumsum_q[..., start:end, None] - cumsum_k[..., None, :]
        bias = mx.where(allowed, bias, -mx.inf)
        scores = (q[..., start:end, :].astype(mx.float32) * scale) @ k.astype(
            mx.float32
        ).swapaxes(-1, -2)
        weights = softmax(scores + bias, axis=-1)
        outputs.append(weights @ v.astype(mx.float32))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)


def group_values(v: mx.array, n_kv_heads: int) -> mx.array:
    """[B, H, T, D] -> the FoX cache's layout [B, Hkv, T, n_rep * D]: query head
    h = g * n_rep + r goes to columns r * D:(r + 1) * D of KV group g."""
    B, H, T, D = v.shape
    v = v.reshape(B, n_kv_heads, H // n_kv_heads, T, D).transpose(0, 1, 3, 2, 4)
    return v.reshape(B, n_kv_heads, T, -1)


def ungroup_values(v_grouped: mx.array, n_heads: int) -> mx.array:
    """The inverse of ``group_values``."""
    B, Hkv, T, _ = v_grouped.shape
    v = v_grouped.reshape(B, Hkv, T, n_heads // Hkv, -1).transpose(0, 1, 3, 2, 4)
    return v.reshape(B, n_heads, T, -1)


def fox_attention_grouped(
    q: mx.array,
    k,
    v_cached,
    cumsum_q: mx.array,
    cumsum_k: mx.array,
    scale: float,
    key_start: Optional[mx.array] = None,
    quantized: Optional[Tuple[int, int]] = None,
) -> mx.array:
    """``fox_attention`` for a few queries against a cache, without copying it.

    v_cached: V as the cache stores it: per head [B, H, Tk, D], or grouped by KV
    head [B, Hkv, Tk, n_rep * D] (``group_values``; the quantized cache). Grouped,
    the queries of one group share one product with V, which also forms the cross
    terms r != h (n_rep times the work of a per-head product); that costs less than
    materializing V per head for a handful of queries.
    ``quantized=(group_size, bits)``: k and v_cached are mx.quantize triples (an
    8-bit cache), multiplied without dequantizing.
    """
    B, H, Tq, D = q.shape
    Hkv = kv_heads(k)
    Tk = cumsum_k.shape[-1]
    n_rep = H // Hkv
    # [B, Hkv, n_rep, Tq, D] @ [B, Hkv, 1, D, Tk]: a product per head against its
    # group's K (broadcast, not copied). For one query each is a matrix-vector
    # product, which the CPU's BLAS does without first copying K into a packed
    # buffer, as it does for a [n_rep, D] x [D, Tk] product (0.07 vs 0.13 ms per
    # layer at 2048 keys, measured).
    grouped_q = (q.astype(mx.float32) * scale).reshape(B, Hkv, n_rep, Tq, D)
    k = tuple(a[:, :, None] for a in k) if quantized else k[:, :, None]
    scores = cache_product(grouped_q, k, True, quantized).reshape(B, H, Tq, Tk)
    scores = scores + (cumsum_q[..., None] - cumsum_k[..., None, :])
    allowed = None
    if Tq > 1:
        allowed = mx.arange(Tk - Tq, Tk)[:, None] >= mx.arange(Tk)[None]
    if key_start is not None:
        keys, rows = mx.arange(Tk), mx.arange(Tk - Tq, Tk)[:, None]
        after_padding = (keys[None] >= key_start[:, None, None]) | (rows == keys)[None]
        allowed = (after_padding if allowed is None else allowed[None] & after_padding)[:, None]
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


def gla_chunked_parallel(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    log_g: mx.array,
    scale: float,
    chunk_size: int = 64,
    state: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """``gla_chunked`` (plain GLA) without a Python loop over chunks.

    The decay is one scalar per head and step, so the state entering chunk c is a
    decay-weighted sum of the chunks before it:
        S_in[c] = exp(L[c-1]) S_0 + sum_{c' < c} exp(L[c-1] - L[c']) U[c'],
    with L the running sum of the chunks' total log decay and U[c'] chunk c''s own
    contribution at its end. That is one [N, N] x [N, Dk*Dv] product per head.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    q, k, v = (a.astype(mx.float32) for a in (q, k, v))
    if pad:
        widths = [(0, 0), (0, 0), (0, pad), (0, 0)]
        q, k, v = (mx.pad(a, widths) for a in (q, k, v))
        log_g = mx.pad(log_g, [(0, 0), (0, 0), (0, pad)])
    N = q.shape[2] // C
    q, k = (a.reshape(B, H, N, C, Dk) for a in (q, k))
    v = v.reshape(B, H, N, C, Dv)
    G = mx.cumsum(log_g.reshape(B, H, N, C), axis=-1)
    G_end = G[..., -1]                                    # [B, H, N]
    intra = ((q @ k.swapaxes(-1, -2)) * scale * causal_decay(G)) @ v
    k_weighted = k * exp(G_end[..., None] - G)[..., None]
    U = (k_weighted.swapaxes(-1, -2) @ v).reshape(B, H, N, Dk * Dv)

    L = mx.cumsum(G_end, axis=-1)                         # decay through chunk c
    L_before = L - G_end                                  # decay before chunk c
    idx = mx.arange(N)
    strictly_before = idx[:, None] > idx[None, :]
    weights = exp(mx.where(strictly_before, L_before[..., :, None] - L[..., None, :], -mx.inf))
    S_in = weights @ U                                    # [B, H, N, Dk*Dv]
    if state is not None:
        S_in = S_in + exp(L_before)[..., None] * state.reshape(B, H, 1, Dk * Dv)
    S_in = S_in.reshape(B, H, N, Dk, Dv)
    inter = (q @ S_in) * (exp(G)[..., None] * scale)
    out = (intra + inter).reshape(B, H, N * C, Dv)[:, :, :T]

    S_last = S_in[:, :, -1] * exp(G_end[..., -1])[..., None, None] + U[:, :, -1].reshape(
        B, H, Dk, Dv)
    return out, S_last
