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
import numpy as np
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, QuantizedKVCache

from .. import kernels
from ..errors import GenesisError
from ..fastmath import exp, sigmoid, silu


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


# FoX caches grow in steps of this many tokens (mlx-lm's default, 256, leaves up to
# 255 empty slots per layer: at a short context that is most of the cache).
FOX_CACHE_STEP = 64

# What make_cache's entries hold; saved chat sessions record it. 2: a FoX layer's
# exact cache keeps V per head beside the forget gates' cumsum (1: V grouped with K).
CACHE_LAYOUT = 2


def check_kv_bits(bits: Optional[int]):
    if bits not in (None, 4, 8):
        raise GenesisError(f"--kv-bits {bits}: use 4 or 8 (or leave it out: exact)")


def check_kv_quantization(args: ModelArgs, bits: int, group_size: int):
    check_kv_bits(bits)
    if group_size not in (32, 64, 128) or args.head_dim % group_size:
        raise GenesisError(f"kv_group_size {group_size}: must be 32, 64 or 128 and divide "
                           f"the head size ({args.head_dim})")


def norm_gain(norm: nn.Module) -> mx.array:
    """What an RMSNorm multiplies by: 1 + omega (zero-centered) or its weight."""
    return 1.0 + norm.omega if "omega" in norm else norm.weight


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose gain is 1 + omega (omega is what the checkpoint stores)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.omega = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, norm_gain(self), self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x, gate=None):
        y = mx.fast.rms_norm(x, self.weight, self.eps)
        return y if gate is None else y * silu(gate)


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


class Weight(nn.Module):
    """A module holding one named array, so keys like ``conv.weight`` and
    ``layer_scale.scale`` match the checkpoint (and freezing works on them)."""

    def __init__(self, name: str, value: mx.array):
        super().__init__()
        setattr(self, name, value)


class ShortConvolution(nn.Module):
    """Causal depthwise conv over time. Weight layout [channels, kernel, 1]."""

    def __init__(self, channels: int, kernel_size: int, activation: bool = True):
        super().__init__()
        self.conv = Weight("weight", mx.zeros((channels, kernel_size, 1)))
        self.kernel_size = kernel_size
        self.activation = activation

    def __call__(self, history):
        """history: [B, K - 1 + T, C], the T inputs preceded by the K - 1 before them
        (zeros at the start of a sequence). Returns [B, T, C]."""
        if history.shape[1] == self.kernel_size:
            # One new token (decoding): a weighted sum over the window, which costs one
            # fused op where the depthwise conv1d costs ~4x as much on the CPU.
            y = (history * self.conv.weight[..., 0].T).sum(axis=1, keepdims=True)
        else:
            y = mx.conv1d(history, self.conv.weight, groups=history.shape[2])
        return silu(y) if self.activation else y


def causal_conv_with_tail(convs, inputs, tail, kernel_size):
    """Runs several short convs whose inputs share one cached tail (concatenated on
    channels). Returns the outputs and the new tail (the last K-1 raw inputs)."""
    widths = [x.shape[-1] for x in inputs]
    raw = mx.concatenate(inputs, axis=-1)
    if tail is None:
        tail = mx.zeros((raw.shape[0], kernel_size - 1, raw.shape[2]), dtype=raw.dtype)
    history = mx.concatenate([tail, raw], axis=1)
    outputs, start = [], 0
    for conv, width in zip(convs, widths):
        outputs.append(conv(history[..., start : start + width]))
        start += width
    return outputs, history[:, -(kernel_size - 1) :]


def short_convs_token(raw, tail, weight, segments):
    """causal_conv_with_tail for one token (raw [B, C], several convs' inputs side by
    side) as one product with their weights stacked [K, C] (GenesisBlock.decode_views).
    ``segments``: (width, activation) of consecutive outputs. -> outputs [B, 1, width]
    each, new tail"""
    history = mx.concatenate([tail, raw[:, None]], axis=1)
    mixed = (history * weight).sum(axis=1, keepdims=True)
    if all(activation for _, activation in segments):  # one SiLU node for all
        mixed, segments = silu(mixed), [(width, False) for width, _ in segments]
    outputs, start = [], 0
    for width, activation in segments:
        y = mixed[..., start : start + width]
        outputs.append(silu(y) if activation else y)
        start += width
    return outputs, history[:, 1:]


def stacked_conv_weights(convs) -> mx.array:
    """Short convs' weights [C_i, K, 1] -> [K, sum C_i]."""
    return mx.concatenate([c.conv.weight[..., 0].T for c in convs], axis=1)


def transposed_weight(layer: nn.Module) -> Optional[mx.array]:
    """W^T of a plain bias-free nn.Linear as an evaluated view of W (no copy): a
    compiled step that takes it as an input multiplies by it directly, where
    ``layer(x)`` adds a transpose node every call. None for other layers (LoRA,
    quantized, with a bias): those are called as they are."""
    if type(layer) is not nn.Linear or "bias" in layer:
        return None
    view = layer.weight.T
    mx.eval(view)
    return view


def transposed_weights(module: nn.Module) -> dict:
    """``transposed_weight`` of each of the module's projections that has one."""
    views = {}
    for name, child in module.children().items():
        weight_t = transposed_weight(child) if name.endswith("_proj") else None
        if weight_t is not None:
            views[name] = weight_t
    return views


def linear(x, layer: nn.Module, weight_t: Optional[mx.array] = None):
    """layer(x), by its ``transposed_weight`` where there is one."""
    return layer(x) if weight_t is None else x @ weight_t


def add_linear(residual, x, layer: nn.Module, weight_t: Optional[mx.array] = None):
    """residual + layer(x), as one graph node where the layer has a
    ``transposed_weight``."""
    return residual + layer(x) if weight_t is None else mx.addmm(residual, x, weight_t)


L2_EPS = 1e-6


def l2_normalize(x, eps=L2_EPS):
    return x / (mx.linalg.norm(x, axis=-1, keepdims=True) + eps)


def token_positions(pad_mask, start, T):
    """Per-row RoPE offset for a chunk whose padding (if any) is at its start."""
    if pad_mask is None:
        return start
    return start - (T - pad_mask.sum(axis=1).astype(mx.int32))


def rope_inverse_frequencies(args: ModelArgs, rotary_dim: int) -> np.ndarray:
    """What the reference multiplies positions by: its cos/sin tables hold
    cos(float32(position * inv_freq)), so the angles are exact only with the very
    float32 values of its buffer. Computed anew, the frequencies differ in the last
    bits for some dims (24, the real model's, among them: numpy's float32 power and
    mx.fast.rope's own from ``base`` both round apart from torch's), which moves the
    angles by ~6e-5 rad at position 2000; hence the checkpoint's values."""
    if args.rope_inv_freq is None:
        exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim
        return (1.0 / (10000.0 ** exponents)).astype(np.float32)
    inv_freq = np.asarray(args.rope_inv_freq, np.float32)
    if inv_freq.shape != (rotary_dim // 2,):
        raise GenesisError(
            f"config: rope_inv_freq has {inv_freq.size} entries but the GLA heads rotate "
            f"{rotary_dim} dims ({rotary_dim // 2} frequencies); reconvert the checkpoint")
    return inv_freq


def rope_periods(inv_freq: np.ndarray) -> np.ndarray:
    """Periods p with float32(1 / p) == inv_freq, bit for bit: mx.fast.rope(freqs=p)
    multiplies positions by float32(1 / p), so its angles are then the reference's."""
    periods = (np.float32(1.0) / inv_freq).astype(np.float32)
    for i, target in enumerate(inv_freq):
        candidate = periods[i]
        for _ in range(8):  # the reciprocal of the reciprocal is off by an ulp or two
            got = np.float32(1.0) / candidate
            if got == target:
                break
            candidate = np.nextafter(candidate, np.float32(np.inf if got > target else 0.0))
        periods[i] = candidate
    return periods


def rope_as_products(head_dim: int, rotary_dim: int, inv_freq: np.ndarray):
    """What mx.fast.rope(traditional=False) does to the first ``rotary_dim`` dims of a
    head, as constants for x * cos(p f) + rotate_half(x) * sin(p f): the frequencies
    f (0 on the dims it leaves alone, so cos = 1 and sin = 0 there) and rotate-half,
    (x1, x2) -> (-x2, x1), twice: as a matrix R (x @ R: prefill, where a small matmul
    is 5x faster than a gather over [B, H, T, D]) and as the dims each output takes
    with their signs (decoding: one gather node for all heads, where x @ R on them
    is three). Either way each output is one signed input, exactly."""
    half = rotary_dim // 2
    freqs = np.zeros(head_dim, np.float32)
    freqs[:half] = freqs[half:rotary_dim] = inv_freq
    source = np.arange(head_dim, dtype=np.int32)
    source[:half], source[half:rotary_dim] = source[half:rotary_dim], source[:half].copy()
    sign = np.zeros(head_dim, np.float32)
    sign[:half], sign[half:rotary_dim] = -1.0, 1.0
    rotate_half = np.zeros((head_dim, head_dim), np.float32)
    rotate_half[source, np.arange(head_dim)] = sign
    return mx.array(freqs), mx.array(rotate_half), (mx.array(source), mx.array(sign))


class RopeTables(nn.Module):
    """The reference's RoPE cos/sin tables, kept only when the checkpoint stores them
    rounded (computing them anew would not give the same values)."""

    def __init__(self, length: int, rotary_dim: int):
        super().__init__()
        self.cos_cached = mx.zeros((1, 1, length, rotary_dim))
        self.sin_cached = mx.zeros((1, 1, length, rotary_dim))
        self.freeze()

    def lookup(self, positions, head_dim: int):
        """Rows at ``positions`` (clipped into the table: left padding has negative
        ones), padded to ``head_dim`` with cos 1 and sin 0 for the dims RoPE leaves
        alone."""
        rows = mx.clip(positions, 0, self.cos_cached.shape[2] - 1)
        cos, sin = (t[0, 0][rows].astype(mx.float32) for t in (self.cos_cached, self.sin_cached))
        pad = [(0, 0)] * (cos.ndim - 1) + [(0, head_dim - cos.shape[-1])]
        return mx.pad(cos, pad, constant_values=1.0), mx.pad(sin, pad)


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
        self.rotary_dim = (int(self.head_qk_dim * 0.5) // 2) * 2
        # Private (not parameters): RoPE constants of the prefill and one-token paths.
        inv_freq = rope_inverse_frequencies(args, self.rotary_dim)
        self._rope_periods = mx.array(rope_periods(inv_freq))
        self._rope_freqs, self._rope_rotate, self._rope_gather = rope_as_products(
            self.head_qk_dim, self.rotary_dim, inv_freq)
        if args.rope_table_length:
            self.rope = RopeTables(args.rope_table_length, self.rotary_dim)

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

    def log_decay(self, x, gk_proj_t=None):
        gk = linear(x, self.gk_proj, gk_proj_t).astype(mx.float32)
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

    def __call__(self, x, cache=None, pad_mask=None):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if pad_mask is not None:
            keep = pad_mask[..., None]
            q, k, v = (mx.where(keep, a, 0) for a in (q, k, v))
        tail = cache[0] if cache is not None else None
        if self.use_short_conv:
            (q, k, v), tail = causal_conv_with_tail(
                [self.conv_q, self.conv_k, self.conv_v], [q, k, v], tail, self.conv_size
            )
        q, k, v = self.split_heads(q, k, v)
        if self.use_l2_norm:
            q, k = l2_normalize(q), l2_normalize(k)
        else:
            q, k = self.q_norm(q), self.k_norm(k)

        start = cache[2] if cache is not None and cache[2] is not None else mx.zeros((B,), mx.int32)
        offset = token_positions(pad_mask, start, T)
        q, k = (self.apply_rope(a, offset, cached=cache is not None) for a in (q, k))

        log_g = self.log_decay(x).transpose(0, 2, 1)
        if pad_mask is not None:
            log_g = mx.where(pad_mask[:, None, :], log_g, 0.0)
        state = cache[1] if cache is not None else None
        if cache is None:
            beta = None
            if self.use_delta_rule and T >= self.chunk_size:
                beta = sigmoid(self.b_proj(x).astype(mx.float32)).transpose(0, 2, 1)
            out, _ = kernels.gla_prefill(q, k, v, log_g, self.scale, self.chunk_size, None, beta)
        else:
            out, state = kernels.gla_decode(q, k, v, log_g, self.scale, self.chunk_size, state)
        if cache is not None:
            n_real = T if pad_mask is None else pad_mask.sum(axis=1).astype(mx.int32)
            cache[0], cache[1], cache[2] = tail, state, start + n_real

        out = out.astype(x.dtype).transpose(0, 2, 1, 3)
        gate = self.g_proj(x).reshape(B, T, self.n_head, self.head_v_dim)
        norm = getattr(self, "g_norm_swish_gate", None) or self.g_norm
        out = norm(out, gate).reshape(B, T, self.value_dim)
        return self.o_proj(out)

    def apply_rope(self, x, offset, cached=True):
        """x [B, H, T, Dk] at positions offset + t (offset: [B] or scalar)."""
        # Given a whole sequence longer than its tables, the reference first rebuilds
        # them from inv_freq, for every position.
        tables = "rope" in self and (cached or x.shape[2] <= self.rope.cos_cached.shape[2])
        if not tables:
            return mx.fast.rope(x, self.rotary_dim, traditional=False, base=None, scale=1.0,
                                offset=offset, freqs=self._rope_periods)
        positions = mx.array(offset).reshape(-1, 1) + mx.arange(x.shape[2])
        cos, sin = self.rope_cos_sin(positions[:, None, :, None])
        return (x * cos + (x @ self._rope_rotate) * sin).astype(x.dtype)

    def rope_cos_sin(self, positions):
        """cos and sin of the RoPE angles at ``positions`` [..., T, 1], over a head's
        dims; from the checkpoint's tables where it has them (as the reference)."""
        angle = positions.astype(mx.float32) * self._rope_freqs
        cos, sin = mx.cos(angle), mx.sin(angle)
        if "rope" in self:
            in_table = positions < self.rope.cos_cached.shape[2]
            table_cos, table_sin = self.rope.lookup(positions[..., 0], self.head_qk_dim)
            cos, sin = mx.where(in_table, table_cos, cos), mx.where(in_table, table_sin, sin)
        return cos, sin

    def decode_token(self, h, cache, views):
        """__call__ for one token against a cache on the CPU (h [B, C], normalized), up
        to o_proj (the caller adds it to the residual in one node): the same math in
        fewer graph nodes (each costs ~5 us per token there, measured). Rows stay
        2-D; q, k and v go through the short convs as one product with
        ``views["conv"]`` (see GenesisBlock.decode_views), q and k through one norm
        and one RoPE product, as [B, groups + 1, Hkv, 1, Dk]: the query heads as
        [groups, KV heads] (head h reads KV head h % n_kv_head), then the keys, so K
        and V are broadcast instead of copied. GPUs keep __call__ (and its recurrent
        kernel). -> [B, value_dim]"""
        B, H, Hkv = h.shape[0], self.n_head, self.n_kv_head
        G, Dk, Dv = H // Hkv, self.head_qk_dim, self.head_v_dim
        raw = mx.concatenate([linear(h, self[name], views.get(name))
                              for name in ("q_proj", "k_proj", "v_proj")], axis=-1)
        width = (H + Hkv) * Dk
        if self.use_short_conv:
            segments = [(width, self.conv_q.activation), (Hkv * Dv, self.conv_v.activation)]
            (qk, v), tail = short_convs_token(raw, cache[0], views["conv"], segments)
        else:
            (qk, v), tail = (raw[:, None, :width], raw[:, None, width:]), cache[0]
        qk = qk.astype(mx.float32).reshape(B, G + 1, Hkv, 1, Dk)
        cos, sin = self.rope_cos_sin(cache[2].reshape(B, 1, 1, 1, 1))
        source, sign = views["rope_source"], self._rope_gather[1]
        if self.use_l2_norm:  # rotate_half(x / |x|) = rotate_half(x) / |x|: fewer nodes
            norm = mx.sqrt((qk * qk).sum(axis=-1, keepdims=True)) + L2_EPS
            rotated = mx.take_along_axis(qk, source, axis=-1)
            qk = (qk / norm) * cos + (rotated / norm) * (sin * sign)
        else:
            qk = mx.concatenate([self.q_norm(qk[:, :G]), self.k_norm(qk[:, G:])], axis=1)
            qk = qk * cos + mx.take_along_axis(qk, source, axis=-1) * (sin * sign)
        q, k = qk[:, :G], qk[:, G:].swapaxes(-1, -2)
        v = v.astype(mx.float32).reshape(B, 1, Hkv, 1, Dv)

        decay = exp(self.log_decay(h, views.get("gk_proj"))).reshape(B, G, Hkv, 1, 1)
        state = decay * cache[1].reshape(B, G, Hkv, Dk, Dv) + k * v
        out = (q @ state) * self.scale
        cache[0], cache[1], cache[2] = tail, state.reshape(B, H, Dk, Dv), cache[2] + 1

        out = out.astype(h.dtype).reshape(B, H, Dv)
        gate = linear(h, self.g_proj, views.get("g_proj")).reshape(B, H, Dv)
        norm = getattr(self, "g_norm_swish_gate", None) or self.g_norm
        return norm(out, gate).reshape(B, self.value_dim)


def last_cumsum(cache) -> mx.array:
    """The forget gates' running sum at the last cached token [B, H, 1] (0 if none).
    The exact layout keeps it beside V, the quantized one in a cache of its own."""
    _, first, second = cache
    if second.offset == 0:
        return mx.zeros((1, 1, 1))
    held = second.keys if isinstance(first, QuantizedKVCache) else second.values
    return held[:, :, second.offset - 1, 0][..., None]


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

    def project(self, x, tail=None, pad_mask=None):
        """x -> q [B, H, T, D], k [B, Hkv, T, D], v [B, H, T, D], log forget gate
        [B, H, T] (fp32), and the short convs' new tail."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if pad_mask is not None:
            k, v = (mx.where(pad_mask[..., None], a, 0) for a in (k, v))
        if self.pro:
            (k, v), tail = causal_conv_with_tail(
                [self.k_conv, self.v_conv], [k, v], tail, self.conv_size
            )
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = k.reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, H, D).transpose(0, 2, 1, 3)
        log_f = nn.log_sigmoid(self.fgate_proj(x).astype(mx.float32)).transpose(0, 2, 1)
        if pad_mask is not None:
            log_f = mx.where(pad_mask[:, None, :], log_f, 0.0)
        return q, k, v, log_f, tail

    def project_token(self, h, tail, views):
        """project() for one token on the CPU (h [B, C]) in fewer graph nodes, as
        GatedLinearAttention.decode_token: q [B, H, 1, D], k [B, Hkv, 1, D],
        v [B, H, 1, D], log forget gate [B, H, 1], the new tail."""
        B, H, Hkv, D = h.shape[0], self.n_head, self.n_kv_head, self.head_dim
        q, k, v = (linear(h, self[name], views.get(name)) for name in ("q_proj", "k_proj", "v_proj"))
        q = q.reshape(B, H, 1, D)
        if self.pro:
            segments = [(Hkv * D, self.k_conv.activation), (H * D, self.v_conv.activation)]
            (k, v), tail = short_convs_token(mx.concatenate([k, v], axis=-1), tail,
                                             views["conv"], segments)
            # GroupRMSNorm on the heads as they are shaped here, its gain as [H, 1, D].
            q = mx.fast.rms_norm(q, None, self.q_norm.eps) * views["q_norm"]
            k = mx.fast.rms_norm(k.reshape(B, Hkv, 1, D), None, self.k_norm.eps) * views["k_norm"]
        else:
            k = k.reshape(B, Hkv, 1, D)
        log_f = nn.log_sigmoid(self.fgate_proj(h).astype(mx.float32))
        return q, k, v.reshape(B, H, 1, D), log_f[..., None], tail

    def output_token(self, out, h, views):
        """output() for one token up to o_proj (the caller adds it to the residual in
        one node): out [B, H, 1, D], h [B, C] -> [B, H * D]."""
        B, H, _, D = out.shape
        out = out.astype(h.dtype).reshape(B, H, D)
        if self.pro:
            gate = linear(h, self.ogate_proj, views.get("ogate_proj")).reshape(B, H, D)
            out = self.output_norm(out, gate)
        return out.reshape(B, H * D)

    def attend(self, q, k, v, log_f, cache=None, pad_mask=None):
        """Attention over the cached and new keys; updates the cache. -> [B, H, T, D]"""
        B, H, T, D = q.shape
        cumsum = mx.cumsum(log_f, axis=-1) if T > 1 else log_f
        key_start = None
        quantized = None
        if cache is None:
            cumsum_all, k_all, v_all = cumsum, k, v
            if pad_mask is not None:
                key_start = T - pad_mask.sum(axis=1).astype(mx.int32)
        else:
            conv_cache, first, second = cache
            cumsum = cumsum + last_cumsum(cache)
            if isinstance(first, QuantizedKVCache):
                # Quantized K and V together, V grouped by KV head ([B, Hkv, T, n_rep * D]:
                # a KVCache keeps keys and values with the same heads); the cumsum exact.
                k_all, v_all = first.update_and_fetch(k, kernels.group_values(v, k.shape[1]))
                cumsum_all, _ = second.update_and_fetch(cumsum[..., None], cumsum[..., None])
                quantized = (first.group_size, first.bits)
            else:
                # V per head beside its cumsum, so that each head's product with V is
                # a matrix-vector product on contiguous rows (grouped V made it a small
                # matrix product, which the CPU's BLAS runs by first copying V: ~5 ms
                # of a token at 2048). K beside a one-column placeholder: a zero-width
                # one would do, but saving it crashes MLX's CUDA backend (0.32.4).
                k_all, _ = first.update_and_fetch(k, mx.zeros(k.shape[:3] + (1,), k.dtype))
                v_all, cumsum_all = second.update_and_fetch(v, cumsum[..., None])
            cumsum_all = cumsum_all[..., 0]
            # Left padding seen so far: keys before it stay masked for good.
            n_pad = conv_cache[1]
            if pad_mask is not None:
                n_pad = (0 if n_pad is None else n_pad) + (T - pad_mask.sum(axis=1).astype(mx.int32))
                conv_cache[1] = n_pad
            key_start = n_pad
        return kernels.fox_attend(q, k_all, v_all, cumsum, cumsum_all, self.scale, key_start,
                                  training=self.training, cached=cache is not None,
                                  quantized=quantized)

    def attend_token(self, q, k, v, log_f, cache):
        """attend() for one token against the exact cache, on the CPU, while its
        buffers have room for it: ``kernels.fox_decode_step`` (one compiled graph)
        writes the token into them and attends; None otherwise (the caller runs
        attend(), which also grows the buffers)."""
        conv_cache, first, second = cache
        if (isinstance(first, QuantizedKVCache) or kernels.gpu_backend() is not None
                or first.keys is None or first.offset == 0 or second.offset != first.offset
                or first.offset >= min(first.keys.shape[2], second.keys.shape[2])):
            return None
        key_start = conv_cache[1]
        if key_start is None:  # an array made here, not a graph node
            key_start = mx.array([0] * q.shape[0], mx.int32)
        out, first.keys, second.keys, second.values = kernels.fox_decode_step(
            q, k, v, log_f, first.keys, second.keys, second.values,
            mx.array([first.offset], mx.int32), key_start, self.scale)
        first.offset += 1
        second.offset += 1
        return out

    def output(self, out, x):
        """Attention output [B, H, T, D] -> [B, T, C] (output norm gated by x)."""
        B, H, T, D = out.shape
        out = out.astype(x.dtype).transpose(0, 2, 1, 3)
        if self.pro:
            out = self.output_norm(out, self.ogate_proj(x).reshape(B, T, H, D))
        return self.o_proj(out.reshape(B, T, H * D))

    def __call__(self, x, cache=None, pad_mask=None):
        tail = cache[0][0] if cache is not None else None
        q, k, v, log_f, tail = self.project(x, tail, pad_mask)
        if cache is not None:
            cache[0][0] = tail
        return self.output(self.attend(q, k, v, log_f, cache, pad_mask), x)


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

    def hidden(self, x, views=None):
        """What down_proj reads. ``views``: transposed weights
        (GenesisBlock.decode_views)."""
        views = views or {}
        hidden = silu(linear(x, self.gate_proj, views.get("gate_proj"))) * linear(
            x, self.up_proj, views.get("up_proj"))
        if self.selective and not self.training and self.k_ratio < 1.0:
            hidden = mx.where(self.topk_mask(hidden), hidden, 0)
        return hidden

    def __call__(self, x):
        return self.down_proj(self.hidden(x))


def compile_with_cache(apply, module: nn.Module, n_state: int):
    """Compiles ``apply(x, cache)``, which reads and replaces the first ``n_state``
    entries of an mlx-lm ArraysCache, as a pure function of x and those arrays.
    ``module``'s parameters are inputs of the compiled function (not constants), so
    later weight updates are seen."""

    def pure(x, *state):
        state = list(state)
        return (apply(x, state), *state)

    pure = mx.compile(pure, inputs=module.state)

    def step(x, cache):
        y, *state = pure(x, *(cache[i] for i in range(n_state)))
        for i, array in enumerate(state):
            cache[i] = array
        return y

    return step


class GenesisBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        Norm = ZeroCenteredRMSNorm if args.use_zero_centered_norm else RMSNorm
        self.attn_norm = Norm(args.n_embd, args.norm_eps)
        self.ffn_norm = Norm(args.n_embd, args.norm_eps)
        self.is_fox = args.is_fox_layer(layer_idx)
        self.attn = ForgettingAttention(args) if self.is_fox else GatedLinearAttention(args)
        self.ffn = SwiGLU(args)

    def __call__(self, x, cache=None, pad_mask=None):
        x = x + self.attn(self.attn_norm(x), cache, pad_mask)
        return x + self.ffn(self.ffn_norm(x))

    def can_compile_step(self, cache) -> bool:
        """A compiled decoding step needs array inputs: a cache that has seen tokens."""
        if kernels.gpu_backend() == "emulate":  # runs C++ on host arrays: not traceable
            return False
        return (cache[0][0] if self.is_fox else cache[0]) is not None

    def decode_step(self, x, cache):
        """One token, x [B, C] -> [B, C], with the stateless parts compiled, which
        removes the dispatch overhead of many small ops (a token was ~3600 graph nodes
        with only the GLA layers compiled; on the CPU each costs ~5 us, most of it in
        the thread that builds and dispatches the graph). GLA: the whole layer. FoX:
        all but the K/V cache update and attention, whose shapes grow every token."""
        if self.decode_views_current():
            return self._compiled_step(x, cache)
        self._decode = self.decode_views()
        self._compiled_step = self.compile_fox_step() if self.is_fox else self.compile_gla_step()
        out = self._compiled_step(x, cache)
        # After the first (tracing) call: it hands the parameters back in new wrappers.
        # Plain attributes, kept out of the module's tree (the compiled steps' inputs).
        parts = self.decode_parts()
        object.__setattr__(self, "_decode_parts", parts)
        object.__setattr__(self, "_decode_sources", [owner.get(key) for owner, key in parts])
        return out

    def decode_parts(self) -> list:
        """(owner, key) of every module and array the decode views derive from."""
        attn, ffn = self.attn, self.ffn
        modules = [(attn, n) for n in attn.children()] + [(ffn, n) for n in ffn.children()]
        arrays = [(m[n], "weight") for m, n in modules
                  if n.endswith("_proj") or isinstance(m[n], GroupRMSNorm)]
        convs = [(m[n].conv, "weight") for m, n in modules if isinstance(m[n], ShortConvolution)]
        norms = [(norm, "omega" if "omega" in norm else "weight")
                 for norm in (self.attn_norm, self.ffn_norm)]
        return modules + arrays + convs + norms

    def decode_views(self) -> dict:
        """Arrays the compiled decoding step reads in place of deriving them from the
        parameters every token (a graph node each): every plain Linear's W^T (a
        view: no copy), the short convs' weights stacked [K, channels], the norms'
        gains (FoX's per-head q/k gains as [heads, 1, D]), GLA's RoPE gather index.
        Rebuilt when a parameter or layer is replaced (weights loaded, LoRA,
        fuse)."""
        attn, ffn = self.attn, self.ffn
        views = {"attn": transposed_weights(attn), "ffn": transposed_weights(ffn),
                 "attn_norm": norm_gain(self.attn_norm), "ffn_norm": norm_gain(self.ffn_norm)}
        convs = [attn[n] for n in ("conv_q", "conv_k", "conv_v", "k_conv", "v_conv") if n in attn]
        if convs:
            views["attn"]["conv"] = stacked_conv_weights(convs)
        if self.is_fox and attn.pro:  # GroupRMSNorm gains per head, as project_token's q/k
            for name in ("q_norm", "k_norm"):
                views["attn"][name] = attn[name].weight.reshape(-1, 1, attn.head_dim)
        if not self.is_fox:  # rotate-half's gather index, shaped as decode_token's q/k
            shape = (1, attn.n_head // attn.n_kv_head + 1, attn.n_kv_head, 1, attn.head_qk_dim)
            views["attn"]["rope_source"] = mx.broadcast_to(attn._rope_gather[0], shape)
        mx.eval(views)
        return views

    def decode_views_current(self) -> bool:
        """Whether every module and array the views derive from is still in place
        (an identity check per part: ~10 us per layer)."""
        sources = getattr(self, "_decode_sources", None)
        if sources is None or getattr(self, "_compiled_step", None) is None:
            return False
        return all(owner.get(key) is old for (owner, key), old in zip(self._decode_parts, sources))

    def ffn_token(self, x):
        """x + FFN(x) for one token, x [B, C]."""
        views = self._decode
        h = mx.fast.rms_norm(x, views["ffn_norm"], self.ffn_norm.eps)
        ffn = views["ffn"]
        return add_linear(x, self.ffn.hidden(h, ffn), self.ffn.down_proj, ffn.get("down_proj"))

    def compile_gla_step(self):
        def step(x, cache):
            if kernels.gpu_backend() is not None:  # __call__, with the recurrent kernel
                x = x[:, None]
                x = x + self.attn(self.attn_norm(x), cache)
                return (x + self.ffn(self.ffn_norm(x)))[:, 0]
            views = self._decode
            h = mx.fast.rms_norm(x, views["attn_norm"], self.attn_norm.eps)
            attn = views["attn"]
            x = add_linear(x, self.attn.decode_token(h, cache, attn), self.attn.o_proj,
                           attn.get("o_proj"))
            return self.ffn_token(x)

        return compile_with_cache(step, self, 3)

    def compile_fox_step(self):
        def before(x, tail):
            h = mx.fast.rms_norm(x, self._decode["attn_norm"], self.attn_norm.eps)
            return (h, *self.attn.project_token(h, tail, self._decode["attn"]))

        def after(x, h, attention):
            views = self._decode["attn"]
            x = add_linear(x, self.attn.output_token(attention, h, views), self.attn.o_proj,
                           views.get("o_proj"))
            return self.ffn_token(x)

        before = mx.compile(before, inputs=self.state)
        after = mx.compile(after, inputs=self.state)

        def step(x, cache):
            h, q, k, v, log_f, cache[0][0] = before(x, cache[0][0])
            attention = self.attn.attend_token(q, k, v, log_f, cache)
            if attention is None:
                attention = self.attn.attend(q, k, v, log_f, cache)
            return after(x, h, attention)

        return step


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
        self.layer_scale = Weight("scale", mx.zeros((C,)))
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

    def __call__(self, x, state=None, pad_mask=None, w0_diagonal=None):
        """state: (gradient sum [B, C], tokens seen [B]) or None. Returns the adapted
        x and the new state."""
        B, T, C = x.shape
        h = self.norm(x)
        lr = mx.minimum(mx.exp(self.log_lr), self.lr_cap).astype(mx.float32)
        y0 = self.initial_prediction(h, w0_diagonal)
        hf = h.astype(mx.float32)
        gradient = hf * (y0.astype(mx.float32) - hf)
        if pad_mask is not None:
            gradient = mx.where(pad_mask[..., None], gradient, 0.0)
        inclusive = mx.cumsum(gradient, axis=1)
        exclusive = mx.concatenate([mx.zeros((B, 1, C)), inclusive[:, :-1]], axis=1)
        grad_prev, seen = state if state is not None else (None, mx.zeros((B,), mx.int32))
        if grad_prev is not None:
            exclusive = exclusive + grad_prev[:, None]
            inclusive = inclusive + grad_prev[:, None]
        steps = mx.ones((B, T), mx.int32) if pad_mask is None else pad_mask.astype(mx.int32)
        position = (seen[:, None] + mx.cumsum(steps, axis=1)).astype(mx.float32)
        position_scale = 1.0 / (1.0 + 0.1 * mx.log(mx.maximum(position, 1.0)))
        correction = hf * lr * exclusive * position_scale[..., None]
        out = (y0.astype(mx.float32) - correction).astype(x.dtype)
        out = out * sigmoid(self.output_gate(x))
        out = self.out_proj(out) * self.layer_scale.scale
        new_state = (inclusive[:, -1], seen + steps.sum(axis=1))
        return x + out, new_state


class GenesisMetacognition(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        C = args.n_embd
        self.self_model = nn.Linear(C, C, bias=False)
        self.ttt = TTTLayer(args)
        self.confidence = [nn.Linear(2 * C, C // 2), nn.SiLU(), nn.Linear(C // 2, 1)]
        self.reflection = nn.Linear(2 * C, C, bias=False)  # unused at inference

    def confidence_of(self, x, adapted):
        h = mx.concatenate([self.self_model(x), adapted], axis=-1)
        for layer in self.confidence:
            h = layer(h)
        return sigmoid(h[..., 0].astype(mx.float32))


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
        allows left padding: padded positions leave no trace in any state."""
        x = self.tok_emb(inputs)
        B, T, C = x.shape
        layer_caches = cache[: len(self.blocks)] if cache is not None else [None] * len(self.blocks)
        decode = cache is not None and T == 1 and pad_mask is None
        for block, layer_cache in zip(self.blocks, layer_caches):
            # Compiled decoding steps take rows [B, C] (a reshape node less each).
            if decode and not self.training and block.can_compile_step(layer_cache):
                x = block.decode_step(x.reshape(B, C), layer_cache)
            else:
                x = block(x.reshape(B, T, C), layer_cache, pad_mask)
        x = x.reshape(B, T, C)
        if self.ttt_active and decode and cache[-1][0] is not None:
            x = self.ttt_decode_step(x, cache[-1])
        elif self.ttt_active:
            x = self.apply_ttt(x, cache[-1] if cache is not None else None, pad_mask)
        x = self.ln_f(x)
        if self.args.use_mup:
            x = x * (self.args.mup_output_mult / (self.args.n_embd / self.args.mup_base_width))
        if self.args.tie_word_embeddings:
            return self.tok_emb.as_linear(x)
        return self.lm_head(x)

    def ttt_decode_step(self, x, cache):
        """apply_ttt for one token, compiled (as the blocks' decoding steps), with
        W0's diagonality checked once per W0 (recompiled when W0 is replaced)."""
        ttt = self.metacognition.ttt
        if getattr(self, "_ttt_w0", None) is ttt.W0:
            return self._compiled_ttt(x, cache)
        diagonal = bool(ttt.w0_is_diagonal())
        self._compiled_ttt = compile_with_cache(
            lambda x, state: self.apply_ttt(x, state, None, diagonal), self.metacognition, 3)
        out = self._compiled_ttt(x, cache)
        # After the first (tracing) call, as GenesisBlock.decode_step: kept out of the
        # module's tree.
        object.__setattr__(self, "_ttt_w0", ttt.W0)
        return out

    def apply_ttt(self, x, cache, pad_mask, w0_diagonal=None):
        meta = self.metacognition
        state = (cache[0], cache[1]) if cache is not None and cache[0] is not None else None
        adapted, (grad_sum, seen) = meta.ttt(x, state, pad_mask, w0_diagonal)
        conf = meta.confidence_of(x, adapted)
        weight = mx.ones(conf.shape) if pad_mask is None else pad_mask.astype(mx.float32)
        if cache is None:
            if self.args.ttt_confidence_pooling == "batch":
                mean_conf = ((conf * weight).sum() / weight.sum())[None, None]
            else:
                mean_conf = ((conf * weight).sum(1) / weight.sum(1))[:, None]
        else:
            # Running mean: position t sees the confidence of tokens <= t only.
            conf_prev = cache[2] if cache[2] is not None else mx.zeros((x.shape[0],))
            seen_prev = seen - weight.sum(axis=1).astype(mx.int32)
            running = conf_prev[:, None] + mx.cumsum(conf * weight, axis=1)
            count = seen_prev[:, None] + mx.cumsum(weight, axis=1)
            mean_conf = running / mx.maximum(count, 1.0)
            cache[0], cache[1], cache[2] = grad_sum, seen, running[:, -1]
        mix = (mean_conf * self.args.ttt_strength)[..., None].astype(x.dtype)
        return mix * adapted + (1.0 - mix) * x

    def make_cache(self, kv_bits: Optional[int] = None,
                   kv_group_size: Optional[int] = None) -> List[Any]:
        """Decoding state. ``kv_bits`` (4 or 8) stores the FoX layers' K and V
        quantized (mlx-lm's QuantizedKVCache; groups of 64, or 32 for smaller heads):
        3.6x less memory at 8 bits than float32, at a small logit error; the default
        keeps them exact."""
        if kv_bits is not None:
            if kv_group_size is None:
                kv_group_size = 64 if self.args.head_dim % 64 == 0 else 32
            check_kv_quantization(self.args, kv_bits, kv_group_size)
        caches = []
        for block in self.blocks:
            if block.is_fox:
                # Exact: (K, placeholder), (V per head, cumsum). Quantized: (K, V grouped
                # by KV head), (cumsum, cumsum). See ForgettingAttention.attend.
                first = KVCache() if kv_bits is None else QuantizedKVCache(kv_group_size, kv_bits)
                second = KVCache()
                first.step = second.step = FOX_CACHE_STEP
                caches.append(CacheList(ArraysCache(2), first, second))
            else:
                caches.append(ArraysCache(3))
        if self.args.use_ttt:
            caches.append(ArraysCache(3))
        return caches

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
        def predicate(path, module):
            # Tiny per-head gate projections and the TTT head stay in full precision.
            if path.endswith(("gk_proj", "b_proj", "fgate_proj")):
                return False
            return not path.startswith("metacognition")
        return predicate
