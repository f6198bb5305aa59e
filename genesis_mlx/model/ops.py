"""Small operations of the modules (genesis.py)."""

import mlx.core as mx
import mlx.nn as nn

from ..forms import silu

L2_EPS = 1e-6


def l2_normalize(x, eps=L2_EPS):
    return x / (mx.linalg.norm(x, axis=-1, keepdims=True) + eps)


def norm_gain(norm: nn.Module) -> mx.array:
    """What an RMSNorm multiplies by: 1 + omega (zero-centered) or its weight."""
    return 1.0 + norm.omega if "omega" in norm else norm.weight


def split_activated(mixed, segments):
    """Stacked short convs' outputs [..., sum of widths] -> one array per (width,
    activation) segment, SiLU'd where asked (one SiLU for all when all ask)."""
    if all(activation for _, activation in segments):
        mixed, segments = silu(mixed), [(width, False) for width, _ in segments]
    outputs, start = [], 0
    for width, activation in segments:
        y = mixed[..., start : start + width]
        outputs.append(silu(y) if activation else y)
        start += width
    return outputs


def causal_depthwise_conv(history, weight_kc):
    """A causal depthwise conv over time: ``history`` [B, K - 1 + T, C] (the T inputs
    preceded by the K - 1 before them), weight [K, C] -> [B, T, C]. As K shifted
    products: on the CPU, conv1d with one group per channel costs several times as
    much for the same sums."""
    K = weight_kc.shape[0]
    T = history.shape[1] - K + 1
    if T == 1:
        return last_window_conv(history, weight_kc)
    out = history[:, :T] * weight_kc[0]
    for i in range(1, K):
        out = out + history[:, i : i + T] * weight_kc[i]
    return out


def last_window_conv(window, weight_kc):
    """A causal depthwise conv's output at the last position of ``window`` [B, K, C]
    (the K inputs it sees), weight [K, C]: one fused op, where a conv1d over a
    single position costs several times as much on the CPU."""
    return (window * weight_kc).sum(axis=1, keepdims=True)


def stacked_conv_weights(convs) -> mx.array:
    """Short convs' weights [C_i, K, 1] -> [K, sum C_i]."""
    return mx.concatenate([c.weight_kc for c in convs], axis=1)
