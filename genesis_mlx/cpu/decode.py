"""A block for one decoding token, laid out for MLX's CPU backend.

On the CPU every node of a compiled graph still costs the thread that dispatches it
time it shares with the BLAS threads, and a decoding token's arrays are small, so
the node count is most of the cost. ``GenesisBlock.__call__`` for one token takes
several times the nodes of this layout (RoPE alone, for q and for k apart, is
decomposed into a dozen ops each on this backend). Here:

- the step reads arrays derived from the block's parameters once (``Derived``: each
  plain projection's W^T, the short convs' weights stacked, the norms' gains, RoPE's
  gather), where the modules derive them again each call (a transpose, a
  ``1 + omega``, a concatenation: a node each, every token);
- each residual add rides on its projection (``addmm``).

A GLA block is laid out whole:

- q, k and v go through the short convs as one weighted sum over the window;
- q and k go through one L2 norm and one RoPE product, as [B, groups + 1, Hkv, 1, Dk]:
  the query heads as [groups, KV heads] (head h reads KV head h % n_kv_head), then
  the keys, so K and V broadcast over a group instead of being copied;
- RoPE is a product with cos and sin and one gather (rotate-half), not mx.fast.rope.

A FoX block keeps its attention's own methods (the token's attention itself is
``cpu.fox``'s compiled step); its norms and FFN are laid out as the GLA block's.

Each computes what the block's ``__call__`` computes for one token against a cache
(tests tie them together).
"""

import operator
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..kernels.gla import gla_step
from ..model import decoding
from ..model.cache import GLACache
from ..model.ops import L2_EPS, last_window_conv, norm_gain, split_activated, stacked_conv_weights
from .fastmath import exp


def transposed_weight(layer: nn.Module) -> Optional[mx.array]:
    """W^T of a plain bias-free nn.Linear as a view of W (no copy). None for other
    layers (LoRA, quantized, with a bias): those are called as they are."""
    if type(layer) is not nn.Linear or "bias" in layer:
        return None
    return layer.weight.T


def transposed_weights(module: nn.Module) -> dict:
    """``transposed_weight`` of each of the module's projections that has one."""
    weights = {name: transposed_weight(layer) for name, layer in module.children().items()
               if name.endswith("_proj")}
    return {name: weight_t for name, weight_t in weights.items() if weight_t is not None}


def derive(block) -> dict:
    """What a block's step reads in place of deriving it every token, evaluated: the
    norms' gains and the FFN's W^T; for a GLA block, also its attention's W^T, short
    conv weights and RoPE gather."""
    arrays = {"attn_norm": norm_gain(block.attn_norm), "ffn_norm": norm_gain(block.ffn_norm),
              **transposed_weights(block.ffn)}
    attn = block.attn
    if not block.is_fox:
        arrays.update(transposed_weights(attn))
        if attn.use_short_conv:
            arrays["conv"] = stacked_conv_weights([attn.conv_q, attn.conv_k, attn.conv_v])
        source, sign = attn.rope.rotate_half_gather()
        shape = (1, attn.n_head // attn.n_kv_head + 1, attn.n_kv_head, 1, attn.head_qk_dim)
        arrays["rope_source"], arrays["rope_sign"] = mx.broadcast_to(source, shape), sign
    mx.eval(arrays)
    return arrays


class Derived:
    """``derive(block)``, made again when any module or array of the block has been
    replaced (loading, LoRA, fuse): an identity check per part, each token."""

    def __init__(self, block):
        self.block = block
        self.modules, self.keys, self.sources = [], [], None

    def current(self) -> bool:
        return self.sources is not None and all(
            map(operator.is_, map(dict.get, self.modules, self.keys), self.sources))

    def make(self) -> dict:
        parts = [(module, key) for _, module in self.block.named_modules()
                 for key, value in module.items() if isinstance(value, (mx.array, nn.Module))]
        self.modules, self.keys = [m for m, _ in parts], [k for _, k in parts]
        return derive(self.block)

    def remember(self):
        """Takes the parts' identities as they are now: call after a compiled
        function's first (tracing) call, which hands the parameters back as new
        objects."""
        self.sources = list(map(dict.get, self.modules, self.keys))


def linear(x, layer: nn.Module, weight_t: Optional[mx.array]):
    """layer(x), by its transposed weight where there is one."""
    return layer(x) if weight_t is None else x @ weight_t


def add_linear(residual, x, layer: nn.Module, weight_t: Optional[mx.array]):
    """residual + layer(x), as one node where the layer has a transposed weight."""
    return residual + layer(x) if weight_t is None else mx.addmm(residual, x, weight_t)


def short_convs_token(raw, tail, weight, segments):
    """Several short convs for one token (raw [B, C]: their inputs side by side) as
    one weighted sum over the window, their weights stacked [K, C]. ``segments``:
    (width, activation) of consecutive outputs. -> outputs [B, 1, width] each, the
    new tail"""
    window = mx.concatenate([tail, raw[:, None]], axis=1)
    return split_activated(last_window_conv(window, weight), segments), window[:, 1:]


def gla_attention_token(attn, h, cache, derived: dict):
    """``GatedLinearAttention.__call__`` for one token up to o_proj (the caller adds
    it to the residual in one node): rows h [B, C] -> [B, value_dim]."""
    B, H, Hkv = h.shape[0], attn.n_head, attn.n_kv_head
    G, Dk, Dv = H // Hkv, attn.head_qk_dim, attn.head_v_dim
    raw = mx.concatenate([linear(h, attn[name], derived.get(name))
                          for name in ("q_proj", "k_proj", "v_proj")], axis=-1)
    width = (H + Hkv) * Dk
    if attn.use_short_conv:
        segments = [(width, attn.conv_q.activation), (Hkv * Dv, attn.conv_v.activation)]
        (qk, v), tail = short_convs_token(raw, cache.conv_state, derived["conv"], segments)
    else:
        (qk, v), tail = (raw[:, None, :width], raw[:, None, width:]), cache.conv_state
    qk = qk.astype(mx.float32).reshape(B, G + 1, Hkv, 1, Dk)
    cos, sin = attn.rope.cos_sin(cache.positions.reshape(B, 1, 1, 1, 1))
    source, sign = derived["rope_source"], derived["rope_sign"]
    if attn.use_l2_norm:  # rotate_half(x / |x|) = rotate_half(x) / |x|: fewer nodes
        norm = mx.sqrt((qk * qk).sum(axis=-1, keepdims=True)) + L2_EPS
        rotated = mx.take_along_axis(qk, source, axis=-1)
        qk = (qk / norm) * cos + (rotated / norm) * (sin * sign)
    else:
        qk = mx.concatenate([attn.q_norm(qk[:, :G]), attn.k_norm(qk[:, G:])], axis=1)
        qk = qk * cos + mx.take_along_axis(qk, source, axis=-1) * (sin * sign)
    v = v.astype(mx.float32).reshape(B, 1, Hkv, 1, Dv)
    log_decay = attn.log_decay(linear(h, attn.gk_proj, derived.get("gk_proj")))
    decay = exp(log_decay).reshape(B, G, Hkv, 1, 1)
    state = cache.kv_state.reshape(B, G, Hkv, Dk, Dv)
    out, state = gla_step(qk[:, :G], qk[:, G:], v, decay, attn.scale, state)
    cache.conv_state, cache.kv_state = tail, state.reshape(B, H, Dk, Dv)
    cache.positions = cache.positions + 1
    out = out.astype(h.dtype).reshape(B, H, Dv)
    gate = linear(h, attn.g_proj, derived.get("g_proj")).reshape(B, H, Dv)
    return attn.output_norm(out, gate).reshape(B, attn.value_dim)


def feed_forward_token(block, x, derived: dict):
    """``GenesisBlock.feed_forward`` for one token: rows x [B, C]."""
    h = mx.fast.rms_norm(x, derived["ffn_norm"], block.ffn_norm.eps)
    ffn = block.ffn
    hidden = ffn.activation(linear(h, ffn.gate_proj, derived.get("gate_proj")),
                            linear(h, ffn.up_proj, derived.get("up_proj")))
    return add_linear(x, hidden, ffn.down_proj, derived.get("down_proj"))


def gla_block_token(block, x, cache, derived: dict):
    """``GenesisBlock.__call__`` of a GLA block for one token: x [B, 1, C]."""
    B, _, C = x.shape
    x = x.reshape(B, C)
    h = mx.fast.rms_norm(x, derived["attn_norm"], block.attn_norm.eps)
    x = add_linear(x, gla_attention_token(block.attn, h, cache, derived),
                   block.attn.o_proj, derived.get("o_proj"))
    return feed_forward_token(block, x, derived)[:, None]


def with_derived(block, make_step):
    """A step ``make_step(derive(block))``, both made again when a part of the block
    has been replaced."""
    derived = Derived(block)
    held = {}

    def step(x, cache):
        if derived.current():
            return held["step"](x, cache)
        held["step"] = make_step(derived.make())
        y = held["step"](x, cache)
        derived.remember()
        return y

    return step


def gla_block_step(block):
    """``gla_block_token`` compiled with the cache's arrays and the derived arrays as
    inputs."""
    return with_derived(block, lambda arrays: decoding.compile_with_cache(
        lambda x, cache: gla_block_token(block, x, cache, arrays),
        [block.state, arrays], GLACache.ROWS))


def fox_block_step(block):
    """``decoding.fox_block_step`` with the norms and the FFN reading derived arrays."""

    def make_step(arrays):
        def attention_norm(x):
            return mx.fast.rms_norm(x, arrays["attn_norm"], block.attn_norm.eps)

        def feed_forward(x):
            B, _, C = x.shape
            return feed_forward_token(block, x.reshape(B, C), arrays)[:, None]

        return decoding.fox_block_step(block, attention_norm, feed_forward, [block.state, arrays])

    return with_derived(block, make_step)
