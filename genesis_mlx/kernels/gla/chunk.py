"""GLA over a whole sequence without a Python loop over chunks (``naive.gla_chunked``
for plain GLA, same math, the chunk-to-chunk recurrence as one matrix product)."""

from typing import Optional, Tuple

import mlx.core as mx

from ...forms import exp
from .naive import causal_decay


def gla_chunked_parallel(q, k, v, log_g, scale: float, chunk_size: int = 64,
                         state: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
    """The decay is one scalar per head and step, so the state entering chunk c is a
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
