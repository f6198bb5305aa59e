"""A GLA layer's attention for one decoding token, laid out for MLX's CPU backend.

On the CPU every node of a compiled graph still costs the thread that dispatches it
time it shares with the BLAS threads, and a decoding token's arrays are small, so
the node count is most of the cost. ``GatedLinearAttention.__call__`` for one token
takes several times the nodes of this layout (RoPE alone, for q and for k apart, is
decomposed into a dozen ops each on this backend). Here:

- q, k and v go through the short convs as one weighted sum over the window;
- q and k go through one L2 norm and one RoPE product, as [B, groups + 1, Hkv, 1, Dk]:
  the query heads as [groups, KV heads] (head h reads KV head h % n_kv_head), then
  the keys, so K and V broadcast over a group instead of being copied;
- RoPE is a product with cos and sin and one gather (rotate-half), not mx.fast.rope.

It computes what the layer's ``__call__`` computes for one token against a cache
(tests tie them together). Everything else of a decoding step is the modules' own.
"""

import mlx.core as mx

from ..kernels.gla import gla_step
from ..model.ops import L2_EPS, last_window_conv, split_activated, stacked_conv_weights
from .fastmath import exp


def short_convs_token(raw, tail, weight, segments):
    """Several short convs for one token (raw [B, C]: their inputs side by side) as
    one weighted sum over the window, their weights stacked [K, C]. ``segments``:
    (width, activation) of consecutive outputs. -> outputs [B, 1, width] each, the
    new tail"""
    window = mx.concatenate([tail, raw[:, None]], axis=1)
    return split_activated(last_window_conv(window, weight), segments), window[:, 1:]


def gla_attention_token(attn, h, cache):
    """``GatedLinearAttention.__call__`` for one token: h [B, 1, C] -> [B, 1, C]."""
    B, H, Hkv = h.shape[0], attn.n_head, attn.n_kv_head
    G, Dk, Dv = H // Hkv, attn.head_qk_dim, attn.head_v_dim
    h = h.reshape(B, -1)
    raw = mx.concatenate([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], axis=-1)
    width = (H + Hkv) * Dk
    if attn.use_short_conv:
        weight = stacked_conv_weights([attn.conv_q, attn.conv_k, attn.conv_v])
        segments = [(width, attn.conv_q.activation), (Hkv * Dv, attn.conv_v.activation)]
        (qk, v), tail = short_convs_token(raw, cache.conv_state, weight, segments)
    else:
        (qk, v), tail = (raw[:, None, :width], raw[:, None, width:]), cache.conv_state
    qk = qk.astype(mx.float32).reshape(B, G + 1, Hkv, 1, Dk)
    cos, sin = attn.rope.cos_sin(cache.positions.reshape(B, 1, 1, 1, 1))
    source, sign = attn.rope.rotate_half_gather()
    source = mx.broadcast_to(source, qk.shape)
    if attn.use_l2_norm:  # rotate_half(x / |x|) = rotate_half(x) / |x|: fewer nodes
        norm = mx.sqrt((qk * qk).sum(axis=-1, keepdims=True)) + L2_EPS
        rotated = mx.take_along_axis(qk, source, axis=-1)
        qk = (qk / norm) * cos + (rotated / norm) * (sin * sign)
    else:
        qk = mx.concatenate([attn.q_norm(qk[:, :G]), attn.k_norm(qk[:, G:])], axis=1)
        qk = qk * cos + mx.take_along_axis(qk, source, axis=-1) * (sin * sign)
    v = v.astype(mx.float32).reshape(B, 1, Hkv, 1, Dv)
    decay = exp(attn.log_decay(attn.gk_proj(h))).reshape(B, G, Hkv, 1, 1)
    state = cache.kv_state.reshape(B, G, Hkv, Dk, Dv)
    out, state = gla_step(qk[:, :G], qk[:, G:], v, decay, attn.scale, state)
    cache.conv_state, cache.kv_state = tail, state.reshape(B, H, Dk, Dv)
    cache.positions = cache.positions + 1
    out = out.astype(h.dtype).reshape(B, H, Dv)
    gate = attn.g_proj(h).reshape(B, H, Dv)
    out = attn.output_norm(out, gate).reshape(B, attn.value_dim)
    return attn.o_proj(out)[:, None]


def gla_block_token(block, x, cache):
    """``GenesisBlock.__call__`` of a GLA block for one token, x [B, 1, C], with the
    attention above and the rest the block's own."""
    return block.feed_forward(x + gla_attention_token(block.attn, block.attn_norm(x), cache))
