"""Forgetting attention, the plain MLX reference: causal softmax attention whose
scores are biased by the forget gate, s_ij = scale * q_i . k_j + c_i - c_j, with c the
running sum of the log forget gates. Every other FoX form in this package (the form
for a few queries against a cache, the CPU arrangements, the GPU kernels) must
compute what this computes. Shapes follow the model: ``[batch, heads, time, dim]``.
"""

from typing import Optional

import mlx.core as mx

from ...forms import softmax


def kv_heads(cached) -> int:
    return (cached[0] if isinstance(cached, (list, tuple)) else cached).shape[1]


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


def fox_attention(q, k, v, cumsum_q, cumsum_k, scale: float,
                  key_start: Optional[mx.array] = None, block_size: int = 512) -> mx.array:
    """q: [B, H, Tq, D]; k: [B, Hkv, Tk, D] (query head h reads KV head h // (H/Hkv));
    v: [B, H, Tk, D]; cumsum_q: [B, H, Tq]; cumsum_k: [B, H, Tk] (fp32).
    The queries are the last Tq of the Tk positions. Keys before ``key_start`` [B]
    (left padding) are masked; a padded query sees only itself, to stay finite.
    Queries go in blocks of ``block_size`` rows, so the bias matrix never exceeds
    block_size x Tk. -> [B, H, Tq, D] fp32
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
