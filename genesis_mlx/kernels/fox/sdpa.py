"""FoX attention through MLX's fused attention (the GPU forms):
``mx.fast.scaled_dot_product_attention`` with the forget bias c_i - c_j as its
additive mask, and for a quantized cache mlx-lm's quantized attention, which takes
the same mask.

FoX's heads share K in groups (query head h reads KV head h // n_rep) but each has
its own V, while the fused attention shares K and V alike. The heads h = g * n_rep + r
of one r read every KV head g once, with V heads of their own: for each r that is
plain multi-head attention over the KV heads, on strided views of q, V and the mask,
so K is never repeated."""

from typing import Optional, Tuple

import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from .naive import allowed_keys, kv_heads


def forget_bias(cumsum_q, cumsum_k, key_start: Optional[mx.array]) -> mx.array:
    """c_i - c_j [B, H, Tq, Tk] (fp32), -inf at the keys a query may not see."""
    Tq, Tk = cumsum_q.shape[-1], cumsum_k.shape[-1]
    bias = cumsum_q[..., None] - cumsum_k[..., None, :]
    allowed = allowed_keys(Tq, Tk, key_start, None)
    return bias if allowed is None else mx.where(allowed, bias, -mx.inf)


def each_repetition(x, n_kv_heads: int, r: int):
    """The heads r, n_rep + r, ... of x [B, H, ...] (an array or an mx.quantize
    triple), as a view [B, n_kv_heads, ...]."""
    if isinstance(x, (list, tuple)):
        return tuple(each_repetition(a, n_kv_heads, r) for a in x)
    B, H = x.shape[:2]
    return x.reshape(B, n_kv_heads, H // n_kv_heads, *x.shape[2:])[:, :, r]


def fox_attention_sdpa(q, k, v, cumsum_q, cumsum_k, scale: float,
                       key_start: Optional[mx.array] = None,
                       quantized: Optional[Tuple[int, int]] = None) -> mx.array:
    """Same contract as ``naive.fox_attention``; ``quantized=(group_size, bits)``: k
    and v are mx.quantize triples (K per KV head, V per head). -> [B, H, Tq, D] in
    q's dtype."""
    B, H, Tq, D = q.shape
    Hkv = kv_heads(k)
    # The fused attention takes its mask in its own dtype: a bf16 model's forget bias
    # is rounded to bf16, as its scores are.
    bias = forget_bias(cumsum_q, cumsum_k, key_start).astype(q.dtype)
    outputs = []
    for r in range(H // Hkv):
        q_r, v_r, bias_r = (each_repetition(a, Hkv, r) for a in (q, v, bias))
        if quantized is None:
            out = mx.fast.scaled_dot_product_attention(q_r, k, v_r, scale=scale, mask=bias_r)
        else:
            group_size, bits = quantized
            out = quantized_scaled_dot_product_attention(q_r, k, v_r, scale, bias_r,
                                                         group_size, bits)
        outputs.append(out)
    return mx.stack(outputs, axis=2).reshape(B, H, Tq, D)
