"""Gated linear attention, the plain MLX reference: the recurrence one step at a time
and chunk by chunk. Short, readable and differentiable; every other GLA form in this
package (the loop-free chunked ops, the GPU kernel) must compute what these compute.

Recurrence: S_t = exp(g_t) S_{t-1} + k_t v_t^T,  o_t = scale * q_t S_t.
Shapes: q, k [B, H, T, Dk]; v [B, H, T, Dv]; log decay g [B, H, T] (<= 0, fp32);
state S [B, H, Dk, Dv] (fp32).
"""

from typing import Optional, Tuple

import mlx.core as mx

from ...forms import exp


def causal_decay(log_decay_cumsum: mx.array) -> mx.array:
    """exp(G_i - G_j) for j <= i, else 0, over the last axis of ``G``.

    The exponent is masked before ``exp`` (not the result after), so that neither
    the value nor its gradient can see ``exp`` of a large positive number.
    """
    n = log_decay_cumsum.shape[-1]
    diff = log_decay_cumsum[..., :, None] - log_decay_cumsum[..., None, :]
    causal = mx.tril(mx.ones((n, n), dtype=mx.bool_))
    return exp(mx.where(causal, diff, -mx.inf))


def gla_step(q, k, v, decay, scale: float, state: Optional[mx.array]):
    """One step of the recurrence (T = 1): the one step function every caller uses.

    ``decay`` is exp(g), shaped to broadcast against the state [..., Dk, Dv] (for the
    model's shapes: exp(log_g)[..., None]). Any leading shape broadcasts, so a caller
    may view the query heads as [groups, KV heads] and pass k, v with a broadcast
    group axis (one KV head read by its group, not copied): q, k [..., 1, Dk];
    v [..., 1, Dv]; state [..., Dk, Dv]. Returns (output [..., 1, Dv], new state).
    """
    q, k, v = (a.astype(mx.float32) for a in (q, k, v))
    # The outer product k^T v as a broadcast product: it fuses with the decay into one
    # op (as a batched matmul it is one tiny BLAS call per head on the CPU).
    update = k.swapaxes(-1, -2) * v
    if state is not None:
        update = update + decay * state
    return (q @ update) * scale, update


def gla_chunk(q, k, v, log_g, scale: float, state: Optional[mx.array] = None,
              beta: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
    """The recurrence over one chunk, starting from ``state``, in matrix form.

    With ``beta`` [B, H, T] the state update at the chunk's end uses the reference's
    chunk-level delta rule: v is replaced by beta * (v - scale * k_w S_decayed).
    Returns (output [B, H, T, Dv] fp32, new state).
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


def gla_chunked(q, k, v, log_g, scale: float, chunk_size: int = 64,
                state: Optional[mx.array] = None,
                beta: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
    """The recurrence over a whole sequence, chunk after chunk.

    Chunks are aligned to the start of ``q`` as in the reference, which matters only
    for the chunk-level delta rule (``beta``): plain GLA is chunking-invariant.
    """
    T = q.shape[2]
    outputs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        piece = (slice(None), slice(None), slice(start, end))
        out, state = gla_chunk(q[piece], k[piece], v[piece], log_g[piece], scale, state,
                               None if beta is None else beta[piece])
        outputs.append(out)
    out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)
    return out, state
