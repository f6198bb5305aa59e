"""exp and the functions built on it, computed as 2 ** (x * log2 e).

On MLX's CPU backend (x86) ``mx.power(2, .)`` is several times faster per element
than ``mx.exp``, with the same accuracy (MLX evaluates exp as a power of two as
well), and a long prefill evaluates hundreds of millions of exponentials (softmax,
SiLU, sigmoid); on GPUs both are fast and equal. BENCHMARKS.md has the timings.
"""

import mlx.core as mx

LOG2_E = 1.4426950408889634


def exp(x: mx.array) -> mx.array:
    return mx.power(2.0, x * LOG2_E)


def sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + exp(-x))


def silu(x: mx.array) -> mx.array:
    return x * sigmoid(x)


# Below this power of two, float32 has only subnormals, then zero.
SMALLEST_NORMAL_EXPONENT = -126


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Rows must have at least one finite entry (as every attention row here does).

    Weights below 2 ** -126 (float32's smallest normal number) become exactly 0, as
    with flush-to-zero arithmetic: MLX's CPU power is several times slower where its
    result underflows, and most FoX scores over a long context do, biased by the
    forget gates' running sum (c_i - c_j falls by hundreds within a few thousand
    tokens). A weight that small moves a row's sum (at least 1) by nothing float32
    can hold."""
    power = (x - mx.stop_gradient(x.max(axis=axis, keepdims=True))) * LOG2_E
    e = mx.power(2.0, mx.where(power < SMALLEST_NORMAL_EXPONENT, -mx.inf, power))
    return e / e.sum(axis=axis, keepdims=True)
