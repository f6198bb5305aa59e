"""RoPE of the GLA layers, as the reference computes it: rotate-half over the first
``rotary_dim`` dims of each head, angles from the checkpoint's ``rope.inv_freq``
buffers, and (for bfloat16/float16 checkpoints) its rounded cos/sin tables."""

from typing import Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import GenesisError


def rotary_dims(head_dim: int) -> int:
    """The reference rotates half of each head's dims (rounded down to even)."""
    return (int(head_dim * 0.5) // 2) * 2


def inverse_frequencies(rotary_dim: int, checkpoint_values: Optional[Sequence[float]]) -> np.ndarray:
    """What the reference multiplies positions by: its cos/sin tables hold
    cos(float32(position * inv_freq)), so the angles are exact only with the very
    float32 values of its buffer. Computed anew, the frequencies differ in the last
    bits for some dims (24, the real model's, among them: numpy's float32 power and
    mx.fast.rope's own from ``base`` both round apart from torch's); hence the
    checkpoint's values where there are any."""
    if checkpoint_values is None:
        exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim
        return (1.0 / (10000.0 ** exponents)).astype(np.float32)
    inv_freq = np.asarray(checkpoint_values, np.float32)
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


def rotation_constants(head_dim: int, rotary_dim: int, inv_freq: np.ndarray):
    """What mx.fast.rope(traditional=False) does to the first ``rotary_dim`` dims of a
    head, as constants for x * cos(p f) + rotate_half(x) * sin(p f): the frequencies
    f (0 on the dims it leaves alone, so cos = 1 and sin = 0 there) and rotate-half,
    (x1, x2) -> (-x2, x1), twice: as a matrix R (x @ R: prompts, where a small matmul
    is faster than a gather over [B, H, T, D]) and as the dim each output takes with
    its sign (decoding: one gather node for all heads). Either way each output is one
    signed input, exactly."""
    half = rotary_dim // 2
    freqs = np.zeros(head_dim, np.float32)
    freqs[:half] = freqs[half:rotary_dim] = inv_freq
    source = np.arange(head_dim, dtype=np.int32)
    source[:half], source[half:rotary_dim] = source[half:rotary_dim], source[:half].copy()
    sign = np.zeros(head_dim, np.float32)
    sign[:half], sign[half:rotary_dim] = -1.0, 1.0
    rotate_half = np.zeros((head_dim, head_dim), np.float32)
    rotate_half[source, np.arange(head_dim)] = sign
    return mx.array(freqs), mx.array(rotate_half), mx.array(source), mx.array(sign)


class RotaryEmbedding(nn.Module):
    """A GLA layer's RoPE. Its only parameters are the reference's cos/sin tables
    (``cos_cached``/``sin_cached``, frozen), kept when ``table_length`` > 0: a
    checkpoint saved in bfloat16/float16 stores them rounded, and the reference reads
    the positions below their length from them (computing them anew would not give
    the same values)."""

    def __init__(self, head_dim: int, inv_freq: Optional[Sequence[float]], table_length: int):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dims(head_dim)
        frequencies = inverse_frequencies(self.rotary_dim, inv_freq)
        # Underscored: constants, not parameters.
        self._periods = mx.array(rope_periods(frequencies))
        self._freqs, self._rotate, self._source, self._sign = rotation_constants(
            head_dim, self.rotary_dim, frequencies)
        if table_length:
            self.cos_cached = mx.zeros((1, 1, table_length, self.rotary_dim))
            self.sin_cached = mx.zeros((1, 1, table_length, self.rotary_dim))
        self.freeze()

    @property
    def table_length(self) -> int:
        return self.cos_cached.shape[2] if "cos_cached" in self else 0

    def __call__(self, x, offset, whole_sequence: bool = False):
        """x [B, H, T, D] at positions offset + t (offset: [B] or an int).
        ``whole_sequence``: x is a whole sequence (no cache): given one longer than
        its tables, the reference first rebuilds them from inv_freq, for every
        position."""
        length = self.table_length
        if not length or (whole_sequence and x.shape[2] > length):
            return mx.fast.rope(x, self.rotary_dim, traditional=False, base=None, scale=1.0,
                                offset=offset, freqs=self._periods)
        positions = mx.array(offset).reshape(-1, 1) + mx.arange(x.shape[2])
        cos, sin = self.cos_sin(positions[:, None, :, None])
        return (x * cos + (x @ self._rotate) * sin).astype(x.dtype)

    def cos_sin(self, positions) -> Tuple[mx.array, mx.array]:
        """cos and sin of the angles at ``positions`` [..., 1], over a head's dims;
        from the checkpoint's tables where it has them (as the reference)."""
        angle = positions.astype(mx.float32) * self._freqs
        cos, sin = mx.cos(angle), mx.sin(angle)
        if self.table_length:
            in_table = positions < self.table_length
            table_cos, table_sin = self.table_rows(positions[..., 0])
            cos, sin = mx.where(in_table, table_cos, cos), mx.where(in_table, table_sin, sin)
        return cos, sin

    def table_rows(self, positions):
        """Table rows at ``positions`` (clipped into the table: left padding has
        negative ones), padded to the head's dims with cos 1 and sin 0 for the dims
        RoPE leaves alone."""
        rows = mx.clip(positions, 0, self.table_length - 1)
        cos, sin = (t[0, 0][rows].astype(mx.float32) for t in (self.cos_cached, self.sin_cached))
        pad = [(0, 0)] * (cos.ndim - 1) + [(0, self.head_dim - cos.shape[-1])]
        return mx.pad(cos, pad, constant_values=1.0), mx.pad(sin, pad)

    def rotate_half_gather(self):
        """rotate_half as (the dim each output takes, its sign): rotate_half(x) =
        take_along_axis(x, source) * sign."""
        return self._source, self._sign
