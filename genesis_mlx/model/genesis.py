"""Genesis-152M in MLX: GLA + FoX hybrid with a test-time-training head.

A port of the PyTorch reference ``genesis-llm==2.0.3`` (module ``genesis``), eval
mode, as it runs on CPU/MPS. Module and parameter names follow the reference's
checkpoint keys, so ``sanitize`` only drops buffers and changes conv layouts.

Two forward semantics:

* ``model(ids)`` (no cache) is the reference's no-cache forward, every position:
  TTT mixes with the mean confidence of the whole sequence, and the chunk-level
  delta rule applies if ``gla_delta_rule_at_inference`` is set.
* ``model(ids, cache=model.make_cache())`` is decoding: position t sees only
  tokens <= t, and its logits equal the no-cache forward over tokens[:t+1] at its
  last position (TTT included, unlike the reference's own cached ``generate``).
"""

import math
from dataclasses import dataclass, fields
from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from .. import kernels
from ..checks import KV_BITS
from ..forms import sigmoid, silu_gate
from .cache import FoxCache, GLACache, QuantizedFoxCache, TTTCache, first_real
from . import decoding
from .ops import (causal_depthwise_conv, l2_normalize, norm_gain, split_activated,
                  stacked_conv_weights)
from .rope import RotaryEmbedding


@dataclass
class ModelArgs(BaseModelArgs):
    # --- the reference's GenesisConfig fields (names and defaults as there) ---
    vocab_size: int = 50304
    n_embd: int = 768
    n_layer: int = 12
    block_size: int = 1024
    n_head: int = 12
    n_kv_head: int = 4
    head_dim: int = 64
    use_gla: bool = True
    gla_expand_k: float = 1.0
    gla_expand_v: float = 1.0
    gla_gate_fn: str = "swish"
    gla_use_short_conv: bool = True
    gla_conv_size: int = 4
    gla_chunk_size: int = 64
    gla_use_delta_rule: bool = True
    gla_qk_norm: str = "l2"
    gla_use_mamba_gate: bool = True
    gla_gate_logit_normalizer: int = 16
    gla_fuse_norm_gate: bool = True
    gla_use_dynamic_lr: bool = True
    use_hybrid_layout: bool = True
    hybrid_full_attn_ratio: float = 0.25
    use_fox: bool = True
    use_fox_pro: bool = True
    use_ttt: bool = True
    ttt_inner_lr: float = 0.01
    ttt_rank: int = 8
    ttt_mode: str = "dual"
    ttt_chunk_size: int = 64
    dropout: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    use_gradient_checkpointing: bool = False
    tie_word_embeddings: bool = True
    use_zero_centered_norm: bool = True
    use_fused_norm: bool = True
    use_segment_recurrence: bool = False
    segment_state_detach: bool = True
    use_selective_activation: bool = True
    selective_k_ratio: float = 0.5
    selective_use_soft_mask: bool = True
    selective_mask_temperature: float = 0.1
    selective_warmup_steps: int = 1000
    selective_sparsify_steps: int = 10000
    selective_schedule: str = "cubic"
    use_mup: bool = False
    mup_base_width: int = 256
    mup_output_mult: float = 1.0
    mup_embed_mult: float = 1.0
    # --- options of this port (not in the reference's config) ---
    model_type: str = "genesis"
    # Run TTT at inference (the reference does in its no-cache forward).
    ttt_enabled: bool = True
    # Weight of the TTT branch, times the mean confidence (reference: 0.2).
    ttt_strength: float = 0.2
    # "row": mean confidence per sequence; "batch": over the whole batch, as the
    # reference computes it (rows then influence each other).
    ttt_confidence_pooling: str = "row"
    # The reference skips the chunk-level delta rule at inference on CPU/MPS unless
    # GENESIS_ENABLE_DELTA_RULE_ON_CPU=1; this is that switch (no-cache forward only).
    gla_delta_rule_at_inference: bool = False
    # The GLA layers' RoPE inverse frequencies as the checkpoint stores them (its
    # `rope.inv_freq` buffers, which the reference loads and uses); None: the
    # reference's formula, evaluated here in float32. Conversion fills it in.
    rope_inv_freq: Optional[List[float]] = None
    # 0: RoPE cos/sin computed from rope_inv_freq (what a float32 checkpoint's tables
    # hold). > 0: the checkpoint stores its tables rounded (bfloat16, float16), and the
    # reference reads the positions below their length from them; kept and used here.
    rope_table_length: int = 0

    def __post_init__(self):
        # As the reference: head_dim always follows n_embd / n_head.
        self.head_dim = self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        return int(self.n_embd * 2.5)

    @classmethod
    def reference_fields(cls) -> List[str]:
        names = [f.name for f in fields(cls)]
        return names[: names.index("model_type")]

    def is_fox_layer(self, layer_idx: int) -> bool:
        if not (self.use_hybrid_layout and self.use_gla):
            return False
        ratio = self.hybrid_full_attn_ratio
        interval = int(1 / ratio) if ratio > 0 else self.n_layer + 1
        return (layer_idx + 1) % interval == 0


def unsupported_config_reason(args: ModelArgs) -> Optional[str]:
    """Configurations the reference can build but this port does not implement."""
    if not args.use_gla:
        return "use_gla=false (nn.MultiheadAttention layers)"
    if args.use_hybrid_layout and not args.use_fox:
        return "use_fox=false (GatedAttention full-attention layers)"
    if args.use_ttt and args.ttt_mode != "dual":
        return f"ttt_mode={args.ttt_mode!r} (only 'dual' is ported)"
    return None


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose gain is 1 + omega (omega is what the checkpoint stores)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.omega = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, norm_gain(self), self.eps)


class RMSNorm(nn.Module):
    """RMSNorm, optionally gated by SiLU(gate) (the reference's fused norm-gate)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x, gate=None):
        y = mx.fast.rms_norm(x, self.weight, self.eps)
        return y if gate is None else silu_gate(gate, y)


class GroupRMSNorm(nn.Module):
    """Per-head RMSNorm over a flat [..., groups * size] tensor (FoX q/k norm)."""

    def __init__(self, hidden_size: int, num_groups: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((hidden_size,))
        self.num_groups = num_groups
        self.eps = eps

    def __call__(self, x):
        shape = x.shape
        grouped = x.reshape(*shape[:-1], self.num_groups, -1)
        normed = mx.fast.rms_norm(grouped, None, self.eps).reshape(shape)
        return normed * self.weight


class ShortConvolution(nn.Module):
    """A causal depthwise conv over time: its weight (the checkpoint's ``conv.weight``
    [C, K, 1], nn.Conv1d's layout and key) and whether SiLU follows. A layer's convs
    run together, over their inputs side by side (``causal_conv_with_tail``)."""

    def __init__(self, channels: int, kernel_size: int, activation: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)
        self.kernel_size = kernel_size
        self.activation = activation

    @property
    def weight_kc(self):
        return self.conv.weight[..., 0].T  # [C, K, 1] -> [K, C]


def causal_conv_with_tail(convs, inputs, tail, kernel_size, mask=None):
    """Runs short convs whose inputs share one cached tail (concatenated on
    channels). Returns the outputs and the new tail: the last K - 1 real inputs
    (with a token ``mask``, those before each row's first padding on the right)."""
    widths = [x.shape[-1] for x in inputs]
    raw = mx.concatenate(inputs, axis=-1)
    if tail is None:
        tail = mx.zeros((raw.shape[0], kernel_size - 1, raw.shape[2]), dtype=raw.dtype)
    history = mx.concatenate([tail, raw], axis=1)
    # One conv over all channels: one pass over the history instead of one per input.
    mixed = causal_depthwise_conv(history, stacked_conv_weights(convs))
    outputs = split_activated(mixed, [(w, c.activation) for w, c in zip(widths, convs)])
    if mask is None:
        return outputs, history[:, -(kernel_size - 1) :]
    end = first_real(mask) + mask.sum(axis=1).astype(mx.int32)  # one past the last real
    rows = end[:, None] + mx.arange(kernel_size - 1)
    return outputs, mx.take_along_axis(history, rows[..., None], axis=1)


class GatedLinearAttention(nn.Module):
    """GLA layer ("Gated DeltaNet" in the reference): short convs, L2-normed q/k,
    partial RoPE, Mamba-style per-head decay, gated RMSNorm output."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        n_head, n_kv = args.n_head, args.n_kv_head
        self.n_head, self.n_kv_head = n_head, n_kv
        self.key_dim = int(n_head * args.head_dim * args.gla_expand_k)
        self.value_dim = int(n_head * args.head_dim * args.gla_expand_v)
        self.head_qk_dim = self.key_dim // n_head
        self.head_v_dim = self.value_dim // n_head
        groups = n_head // n_kv
        self.scale = self.head_qk_dim**-0.5
        self.chunk_size = args.gla_chunk_size
        self.use_mamba_gate = args.gla_use_mamba_gate
        self.gate_logit_normalizer = args.gla_gate_logit_normalizer
        self.use_l2_norm = args.gla_qk_norm == "l2"
        self.use_delta_rule = args.gla_use_delta_rule and args.gla_delta_rule_at_inference
        self.conv_size = args.gla_conv_size
        self.rope = RotaryEmbedding(self.head_qk_dim, args.rope_inv_freq, args.rope_table_length)

        C = args.n_embd
        self.q_proj = nn.Linear(C, self.key_dim, bias=False)
        self.k_proj = nn.Linear(C, self.key_dim // groups, bias=False)
        self.v_proj = nn.Linear(C, self.value_dim // groups, bias=False)
        self.o_proj = nn.Linear(self.value_dim, C, bias=False)
        self.g_proj = nn.Linear(C, self.value_dim, bias=False)
        self.gk_proj = nn.Linear(C, n_head, bias=not self.use_mamba_gate)
        self.b_proj = nn.Linear(C, n_head, bias=True)
        if self.use_mamba_gate:
            self.A_log = mx.zeros((n_head,))
            self.dt_bias = mx.zeros((n_head,))
        self.use_short_conv = args.gla_use_short_conv
        if self.use_short_conv:
            qk_act = args.gla_qk_norm != "softmax"
            self.conv_q = ShortConvolution(self.key_dim, self.conv_size, qk_act)
            self.conv_k = ShortConvolution(self.key_dim // groups, self.conv_size, qk_act)
            self.conv_v = ShortConvolution(self.value_dim // groups, self.conv_size)
        if not self.use_l2_norm:
            self.q_norm = RMSNorm(self.head_qk_dim, 1e-5)
            self.k_norm = RMSNorm(self.head_qk_dim, 1e-5)
        if args.gla_fuse_norm_gate:
            self.g_norm_swish_gate = RMSNorm(self.head_v_dim, 1e-5)
        else:
            self.g_norm = RMSNorm(self.head_v_dim, 1e-5)

    @property
    def output_norm(self) -> RMSNorm:
        return self.g_norm_swish_gate if "g_norm_swish_gate" in self else self.g_norm

    def log_decay(self, gk):
        """Per-head log decay (<= 0, fp32) from gk_proj's output."""
        gk = gk.astype(mx.float32)
        if self.use_mamba_gate:
            return -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(
                gk + self.dt_bias.astype(mx.float32)
            )
        return nn.log_sigmoid(gk) / self.gate_logit_normalizer

    def split_heads(self, q, k, v):
        B, T, _ = q.shape
        q = q.reshape(B, T, self.n_head, self.head_qk_dim)
        k = k.reshape(B, T, self.n_kv_head, self.head_qk_dim)
        v = v.reshape(B, T, self.n_kv_head, self.head_v_dim)
        groups = self.n_head // self.n_kv_head
        if groups > 1:  # query head h reads KV head h % n_kv_head, as the reference
            k = mx.concatenate([k] * groups, axis=2)
            v = mx.concatenate([v] * groups, axis=2)
        return (a.transpose(0, 2, 1, 3) for a in (q, k, v))

    def __call__(self, x, cache: Optional[GLACache] = None, mask=None):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if mask is not None:
            q, k, v = (mx.where(mask[..., None], a, 0) for a in (q, k, v))
        tail = cache.conv_state if cache is not None else None
        if self.use_short_conv:
            (q, k, v), tail = causal_conv_with_tail(
                [self.conv_q, self.conv_k, self.conv_v], [q, k, v], tail, self.conv_size, mask)
            if mask is not None:  # right padding's windows hold real inputs: keep k v^T out
                k = mx.where(mask[..., None], k, 0)
        q, k, v = self.split_heads(q, k, v)
        if self.use_l2_norm:
            q, k = l2_normalize(q), l2_normalize(k)
        else:
            q, k = self.q_norm(q), self.k_norm(k)

        start = cache.positions if cache is not None and cache.positions is not None else (
            mx.zeros((B,), mx.int32))
        offset = start if mask is None else start - first_real(mask)
        q, k = (self.rope(a, offset, whole_sequence=cache is None) for a in (q, k))

        log_g = self.log_decay(self.gk_proj(x)).transpose(0, 2, 1)
        if mask is not None:
            log_g = mx.where(mask[:, None, :], log_g, 0.0)
        if cache is None:
            beta = None
            if self.use_delta_rule and T >= self.chunk_size:
                beta = sigmoid(self.b_proj(x).astype(mx.float32)).transpose(0, 2, 1)
            out, _ = kernels.gla(q, k, v, log_g, self.scale, self.chunk_size, None, beta)
        else:
            out, cache.kv_state = kernels.gla(q, k, v, log_g, self.scale, self.chunk_size,
                                              cache.kv_state, cached=True)
            n_real = T if mask is None else mask.sum(axis=1).astype(mx.int32)
            cache.conv_state, cache.positions = tail, start + n_real

        out = out.astype(x.dtype).transpose(0, 2, 1, 3)
        gate = self.g_proj(x).reshape(B, T, self.n_head, self.head_v_dim)
        out = self.output_norm(out, gate).reshape(B, T, self.value_dim)
        return self.o_proj(out)


class ForgettingAttention(nn.Module):
    """FoX layer: softmax attention plus the forget-gate bias c_i - c_j, where c is
    the cumulative sum of log sigmoid(fgate). No positional embedding."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        C, H, Hkv = args.n_embd, args.n_head, args.n_kv_head
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, args.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.pro = args.use_fox_pro
        self.conv_size = 4
        self.q_proj = nn.Linear(C, H * self.head_dim, bias=False)
        self.k_proj = nn.Linear(C, Hkv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(C, H * self.head_dim, bias=False)
        self.o_proj = nn.Linear(H * self.head_dim, C, bias=False)
        self.fgate_proj = nn.Linear(C, H, bias=True)
        if self.pro:
            self.ogate_proj = nn.Linear(C, H * self.head_dim, bias=False)
            self.output_norm = RMSNorm(self.head_dim, 1e-6)
            self.q_norm = GroupRMSNorm(H * self.head_dim, H)
            self.k_norm = GroupRMSNorm(Hkv * self.head_dim, Hkv)
            self.k_conv = ShortConvolution(Hkv * self.head_dim, self.conv_size)
            self.v_conv = ShortConvolution(H * self.head_dim, self.conv_size)

    def project(self, x, cache: Optional[FoxCache] = None, mask=None):
        """x -> q [B, H, T, D], k [B, Hkv, T, D], v [B, H, T, D], log forget gate
        [B, H, T] (fp32); the short convs' tail goes through the cache."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if mask is not None:
            k, v = (mx.where(mask[..., None], a, 0) for a in (k, v))
        if self.pro:
            tail = cache.conv_state if cache is not None else None
            (k, v), tail = causal_conv_with_tail(
                [self.k_conv, self.v_conv], [k, v], tail, self.conv_size, mask)
            if cache is not None:
                cache.conv_state = tail
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = k.reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, H, D).transpose(0, 2, 1, 3)
        log_f = nn.log_sigmoid(self.fgate_proj(x).astype(mx.float32)).transpose(0, 2, 1)
        if mask is not None:
            log_f = mx.where(mask[:, None, :], log_f, 0.0)
        return q, k, v, log_f

    def attend(self, q, k, v, log_f, cache: Optional[FoxCache] = None, mask=None):
        """Attention over the cached and new keys; updates the cache. -> [B, H, T, D]"""
        T = q.shape[2]
        cumsum = mx.cumsum(log_f, axis=-1) if T > 1 else log_f
        if cache is None:
            key_start = None if mask is None else first_real(mask)
            return kernels.fox_attend(q, k, v, cumsum, cumsum, self.scale, key_start,
                                      training=self.training)
        if mask is not None and cache.empty():
            cache.pad_left(first_real(mask))
        quantized = None
        if isinstance(cache, QuantizedFoxCache):
            quantized = (cache.group_size, cache.bits)
        form, _ = kernels.fox_form(T, cached=True, training=self.training,
                                   quantized=quantized is not None)
        if form == "decode step" and mask is None and not cache.empty():
            from ..cpu.fox import attend_token

            return attend_token(q, k, v, log_f, cache, self.scale)
        cumsum = cumsum + cache.last_cumsum()
        k_all, v_all, cumsum_all = cache.store(k, v, cumsum)
        return kernels.fox_attend(q, k_all, v_all, cumsum, cumsum_all, self.scale,
                                  cache.left_padding, training=self.training, cached=True,
                                  quantized=quantized)

    def output(self, out, x):
        """Attention output [B, H, T, D] -> [B, T, C] (output norm gated by x)."""
        B, H, T, D = out.shape
        out = out.astype(x.dtype).transpose(0, 2, 1, 3)
        if self.pro:
            out = self.output_norm(out, self.ogate_proj(x).reshape(B, T, H, D))
        return self.o_proj(out.reshape(B, T, H * D))

    def __call__(self, x, cache: Optional[FoxCache] = None, mask=None):
        return self.output(self.attend(*self.project(x, cache, mask), cache, mask), x)


class SwiGLU(nn.Module):
    """SwiGLU FFN; with selective activation, keeps the top-k |silu(gate) * up| per
    token at inference (k = int(d_ff * ratio)), as the reference does in eval."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d_ff = args.intermediate_size
        self.gate_proj = nn.Linear(args.n_embd, d_ff, bias=False)
        self.up_proj = nn.Linear(args.n_embd, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, args.n_embd, bias=False)
        self.selective = args.use_selective_activation
        self.k_ratio = args.selective_k_ratio

    def topk_mask(self, hidden):
        magnitude = mx.abs(hidden.astype(mx.float32))
        if self.k_ratio <= 0.0:
            return mx.zeros_like(magnitude, dtype=mx.bool_)
        k = max(1, int(hidden.shape[-1] * self.k_ratio))
        threshold = mx.topk(magnitude, k, axis=-1).min(axis=-1, keepdims=True)
        return magnitude >= threshold

    def activation(self, gate, up):
        """What down_proj reads, from gate_proj's and up_proj's outputs."""
        hidden = silu_gate(gate, up)
        if self.selective and not self.training and self.k_ratio < 1.0:
            hidden = mx.where(self.topk_mask(hidden), hidden, 0)
        return hidden

    def __call__(self, x):
        return self.down_proj(self.activation(self.gate_proj(x), self.up_proj(x)))


class GenesisBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        Norm = ZeroCenteredRMSNorm if args.use_zero_centered_norm else RMSNorm
        self.attn_norm = Norm(args.n_embd, args.norm_eps)
        self.ffn_norm = Norm(args.n_embd, args.norm_eps)
        self.is_fox = args.is_fox_layer(layer_idx)
        self.attn = ForgettingAttention(args) if self.is_fox else GatedLinearAttention(args)
        self.ffn = SwiGLU(args)

    def __call__(self, x, cache=None, mask=None):
        return self.feed_forward(x + self.attn(self.attn_norm(x), cache, mask))

    def feed_forward(self, x):
        return x + self.ffn(self.ffn_norm(x))


class LayerScale(nn.Module):
    """A learned per-channel scale (the checkpoint's ``layer_scale.scale``)."""

    def __init__(self, dims: int):
        super().__init__()
        self.scale = mx.zeros((dims,))

    def __call__(self, x):
        return x * self.scale


class TTTLayer(nn.Module):
    """Dual-form test-time training, inference fast path (Q = K = V = LayerNorm(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        C, r = args.n_embd, args.ttt_rank
        self.W0 = mx.zeros((C, C))
        self.A_init = mx.zeros((C, r))
        self.B_init = mx.zeros((r, C))
        self.log_lr = mx.zeros((C,))
        # Used by the reference only in training; kept so checkpoints round-trip.
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.out_proj = nn.Linear(C, C, bias=False)
        self.norm = nn.LayerNorm(C, eps=1e-5)
        self.output_gate = nn.Linear(C, C, bias=False)
        self.layer_scale = LayerScale(C)
        self.lr_cap = args.ttt_inner_lr

    def w0_is_diagonal(self) -> mx.array:
        """The reference multiplies by diag(W0) instead of W0 when W0 is diagonal
        (off-diagonal max < 1e-6); both branches are kept to match it bit for bit."""
        W0 = self.W0
        return mx.abs(W0 - mx.diag(mx.diagonal(W0))).max() < 1e-6

    def initial_prediction(self, h, w0_diagonal: Optional[bool] = None):
        """``w0_diagonal``: w0_is_diagonal() where the caller knows it (decoding
        checks it once, not every token: a pass over W0 and a product with it)."""
        W0 = self.W0
        if w0_diagonal is None:
            y0 = mx.where(self.w0_is_diagonal(), h * mx.diagonal(W0), h @ W0)
        else:
            y0 = h * mx.diagonal(W0) if w0_diagonal else h @ W0
        return y0 + (h @ self.A_init) @ self.B_init

    def __call__(self, x, cache: Optional[TTTCache] = None, mask=None, w0_diagonal=None):
        """Returns the adapted x; updates ``cache`` (gradient sum, tokens seen)."""
        B, T, C = x.shape
        h = self.norm(x)
        lr = mx.minimum(mx.exp(self.log_lr), self.lr_cap).astype(mx.float32)
        y0 = self.initial_prediction(h, w0_diagonal)
        hf = h.astype(mx.float32)
        gradient = hf * (y0.astype(mx.float32) - hf)
        if mask is not None:
            gradient = mx.where(mask[..., None], gradient, 0.0)
        inclusive = mx.cumsum(gradient, axis=1)
        exclusive = mx.concatenate([mx.zeros((B, 1, C)), inclusive[:, :-1]], axis=1)
        seen = mx.zeros((B,), mx.int32)
        if cache is not None and cache.gradient_sum is not None:
            exclusive = exclusive + cache.gradient_sum[:, None]
            inclusive = inclusive + cache.gradient_sum[:, None]
            seen = cache.seen
        steps = mx.ones((B, T), mx.int32) if mask is None else mask.astype(mx.int32)
        position = (seen[:, None] + mx.cumsum(steps, axis=1)).astype(mx.float32)
        position_scale = 1.0 / (1.0 + 0.1 * mx.log(mx.maximum(position, 1.0)))
        correction = hf * lr * exclusive * position_scale[..., None]
        out = (y0.astype(mx.float32) - correction).astype(x.dtype)
        out = out * sigmoid(self.output_gate(x))
        out = self.layer_scale(self.out_proj(out))
        if cache is not None:
            cache.gradient_sum, cache.seen = inclusive[:, -1], seen + steps.sum(axis=1)
        return x + out


class GenesisMetacognition(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        C = args.n_embd
        self.args = args
        self.self_model = nn.Linear(C, C, bias=False)
        self.ttt = TTTLayer(args)
        self.confidence = [nn.Linear(2 * C, C // 2), nn.SiLU(), nn.Linear(C // 2, 1)]
        self.reflection = nn.Linear(2 * C, C, bias=False)  # unused at inference

    def confidence_of(self, x, adapted):
        h = mx.concatenate([self.self_model(x), adapted], axis=-1)
        for layer in self.confidence:
            h = layer(h)
        return sigmoid(h[..., 0].astype(mx.float32))

    def __call__(self, x, cache: Optional[TTTCache] = None, mask=None, w0_diagonal=None):
        """x mixed with its TTT-adapted self, weighted by the mean confidence: of the
        whole sequence without a cache (the reference's forward), of the tokens so
        far with one."""
        adapted = self.ttt(x, cache, mask, w0_diagonal)
        conf = self.confidence_of(x, adapted)
        weight = mx.ones(conf.shape) if mask is None else mask.astype(mx.float32)
        if cache is None:
            if self.args.ttt_confidence_pooling == "batch":
                mean_conf = ((conf * weight).sum() / weight.sum())[None, None]
            else:
                mean_conf = ((conf * weight).sum(1) / weight.sum(1))[:, None]
        else:
            previous = cache.confidence_sum
            if previous is None:
                previous = mx.zeros((x.shape[0],))
            seen_before = cache.seen - weight.sum(axis=1).astype(mx.int32)
            running = previous[:, None] + mx.cumsum(conf * weight, axis=1)
            count = seen_before[:, None] + mx.cumsum(weight, axis=1)
            mean_conf = running / mx.maximum(count, 1.0)
            cache.confidence_sum = running[:, -1]
        mix = (mean_conf * self.args.ttt_strength)[..., None].astype(x.dtype)
        return mix * adapted + (1.0 - mix) * x


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        reason = unsupported_config_reason(args)
        if reason:
            raise ValueError(f"unsupported Genesis configuration: {reason}")
        self.args = args
        self.model_type = args.model_type
        self.tok_emb = nn.Embedding(args.vocab_size, args.n_embd)
        self.blocks = [GenesisBlock(args, i) for i in range(args.n_layer)]
        if args.use_ttt:
            self.metacognition = GenesisMetacognition(args)
        Norm = ZeroCenteredRMSNorm if args.use_zero_centered_norm else RMSNorm
        self.ln_f = Norm(args.n_embd, args.norm_eps)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)

    # The one-token path's compiled steps are derived state (model/decoding.py): kept
    # out of copies and pickles, rebuilt on demand.
    DERIVED = ("_token_steps",)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self.DERIVED}

    def token_steps(self) -> decoding.TokenSteps:
        if "_token_steps" not in self.__dict__:
            self._token_steps = decoding.TokenSteps()
        return self._token_steps

    @property
    def layers(self):
        return self.blocks

    @property
    def ttt_active(self) -> bool:
        return (
            self.args.use_ttt and self.args.ttt_enabled
            and self.args.ttt_strength > 0.0 and not self.training
        )

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None,
                 pad_mask: Optional[mx.array] = None) -> mx.array:
        """inputs [B, T] -> logits [B, T, vocab]. ``pad_mask`` [B, T] (True = token)
        left-pads rows without a cache or at the start of one: padded positions leave
        no trace in any state. (mlx-lm's batches right-pad through the cache.)"""
        return self.logits(self.hidden_states(inputs, cache, pad_mask))

    def hidden_states(self, inputs: mx.array, cache: Optional[List[Any]] = None,
                      pad_mask: Optional[mx.array] = None) -> mx.array:
        """inputs [B, T] -> the last block's (and TTT's) output [B, T, C]; generation
        takes the logits of the last position only (``logits``)."""
        x = self.tok_emb(inputs)
        mask = self.token_mask(cache, pad_mask, x.shape[1])
        if decoding.applies(self, x, cache, mask):
            x = self.token_steps()(self, x, cache)
        else:
            x = self.sequence(x, cache, mask)
        if cache is not None:
            for c in cache:
                c.advance(x.shape[1])
        return x

    def logits(self, x: mx.array) -> mx.array:
        """Hidden states [..., C] -> logits [..., vocab]."""
        x = self.ln_f(x)
        if self.args.use_mup:
            x = x * (self.args.mup_output_mult / (self.args.n_embd / self.args.mup_base_width))
        if self.args.tie_word_embeddings:
            return self.tok_emb.as_linear(x)
        return self.lm_head(x)

    def token_mask(self, cache, pad_mask, T: int) -> Optional[mx.array]:
        if pad_mask is not None:
            if cache is not None and not cache[0].empty():
                raise ValueError("pad_mask left-pads a batch only without a cache or at "
                                 "the start of one; later steps need no padding")
            return pad_mask
        return cache[0].make_mask(T) if cache is not None else None

    def sequence(self, x, cache=None, mask=None):
        """The blocks and the TTT head over a whole chunk (x [B, T, C])."""
        layer_caches = cache[: len(self.blocks)] if cache is not None else [None] * len(self.blocks)
        for block, layer_cache in zip(self.blocks, layer_caches):
            x = block(x, layer_cache, mask)
        if self.ttt_active:
            x = self.metacognition(x, cache[-1] if cache is not None else None, mask)
        return x

    def make_cache(self, kv_bits: Optional[int] = None,
                   kv_group_size: Optional[int] = None) -> List[Any]:
        """Decoding state. ``kv_bits`` (4 or 8) stores the FoX layers' K and V
        quantized (groups of 64, or 32 for smaller heads): less memory, at a small
        logit error; the default keeps them exact."""
        if kv_bits is not None:
            kv_group_size = kv_group_size or (64 if self.args.head_dim % 64 == 0 else 32)
            self.check_kv_quantization(kv_bits, kv_group_size)
        caches = []
        for block in self.blocks:
            if not block.is_fox:
                caches.append(GLACache())
            elif kv_bits is None:
                caches.append(FoxCache())
            else:
                caches.append(QuantizedFoxCache(kv_group_size, kv_bits))
        if self.args.use_ttt:
            caches.append(TTTCache())
        return caches

    def check_kv_quantization(self, bits: int, group_size: int):
        if bits not in KV_BITS:
            raise ValueError(f"kv_bits {bits}: the FoX cache quantizes to 4 or 8 bits")
        if group_size not in (32, 64, 128) or self.args.head_dim % group_size:
            raise ValueError(f"kv_group_size {group_size}: must be 32, 64 or 128 and divide "
                             f"the head size ({self.args.head_dim})")

    def sanitize(self, weights: dict) -> dict:
        """Reference state_dict -> this model's parameters."""
        out = {}
        for key, value in weights.items():
            if key.endswith(".rope.inv_freq") or key.startswith("metacognition.evolution_"):
                continue  # buffers recomputed here (inv_freq: in ModelArgs)
            if ".rope." in key and not self.args.rope_table_length:
                continue
            if key == "lm_head.weight" and self.args.tie_word_embeddings:
                continue
            if key.endswith(".conv.weight") and value.ndim == 3 and value.shape[1] == 1:
                value = value.swapaxes(1, 2)  # torch [C, 1, K] -> MLX [C, K, 1]
            out[key] = value
        return out

    @property
    def quant_predicate(self):
        # mlx-lm asks it only about layers its group size divides, without the size:
        # yes or no (gates and the TTT head: no). genesis-mlx convert -q passes a
        # predicate with per-layer group sizes (model/quantization.py).
        from .quantization import quant_predicate

        return quant_predicate()
