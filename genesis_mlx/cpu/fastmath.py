"""exp and the functions built on it (sigmoid, SiLU, softmax), in the forms that are
fast on MLX's CPU backend; on GPUs every form is fast and they agree.

MLX's CPU backend evaluates an elementwise op on one thread, ``mx.exp`` one element
at a time through the C library, several times slower than ``mx.power(2, .)``
(which it also uses for exp: same accuracy), and a prefill evaluates hundreds of
millions of exponentials. So:

* exp and softmax are powers of two. Their inputs are often masked (-inf) or far
  below zero (attention scores, decays), where ``mx.power`` is fast or flushed here.
* sigmoid and SiLU, whose inputs are activations, are fused on large arrays:
  2 ** x range-reduced (x = n + r, |r| <= 1/2), 2 ** r a polynomial, 2 ** n from
  the bits of a float32, all of it compiled with the arithmetic around it
  (``mx.compile``). MLX fuses a chain of at most 11 ops into one kernel and cannot
  fuse through the bit view, so every op kept off the chain saves a pass.
BENCHMARKS.md has the timings.
"""

import contextlib
import contextvars
import threading

import mlx.core as mx

LOG2_E = 1.4426950408889634

# Below this power of two, float32 has only subnormals, then zero.
SMALLEST_NORMAL_EXPONENT = -126

# 2 ** r on [-1/2, 1/2], lowest degree first: the least-squares degree-6 fit
# (numpy.polyfit on a dense grid). Relative error 6e-9, its derivative's 5e-7, so
# gradients through it are float32-accurate too.
EXP2_COEFFICIENTS = (0.999999999971842, 0.6931472000626793, 0.24022651101313913,
                     0.0555034068074593, 0.009618039945756053, 0.0013395279800388039,
                     0.0001546531231920132)

# Below this many elements (a decoding token's vectors) the plain ops are kept: one
# compiled call costs more than the few small ops it replaces.
FUSED_MIN_SIZE = 4096

FUSING = contextvars.ContextVar("genesis_mlx_fastmath_fusing", default=True)


@contextlib.contextmanager
def plain_ops():
    """The plain forms only, whatever the size: for graphs that ``mx.compile`` fuses
    as a whole (the decode steps), which the float32 bit view in ``power_of_two``
    would split into several kernels."""
    token = FUSING.set(False)
    try:
        yield
    finally:
        FUSING.reset(token)


def fused(x: mx.array) -> bool:
    return x.size >= FUSED_MIN_SIZE and FUSING.get()


def exp(x: mx.array) -> mx.array:
    return mx.power(2.0, x * LOG2_E)


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


def sigmoid(x: mx.array) -> mx.array:
    return COMPILED.sigmoid(x) if fused(x) else 1.0 / (1.0 + exp(-x))


def silu(x: mx.array) -> mx.array:
    return COMPILED.silu(x) if fused(x) else x * (1.0 / (1.0 + exp(-x)))


def silu_gate(gate: mx.array, x: mx.array) -> mx.array:
    """x * silu(gate): SwiGLU's product and the gated norms' output."""
    if fused(gate) and gate.shape == x.shape:  # the fused gradient assumes one shape
        return COMPILED.silu_gate(gate, x)
    return silu(gate) * x


def power_of_two(n: mx.array) -> mx.array:
    """2 ** n for int32 n in [-126, 128] (128: inf), built from its float32 bits."""
    return mx.view((n + 127) << 23, mx.float32)


def exp2_for_sigmoid(x: mx.array) -> mx.array:
    """2 ** x as sigmoid reads it (in 1 + 2 ** x): to the polynomial's accuracy where
    the result is a normal number; 2 ** -126 below that (where 1 + 2 ** x is 1
    either way) and inf from n = 128 on (where sigmoid is 0 or below float32's
    normal numbers). One power of two, not the product of two that exact subnormal
    results would need: each op more on the fused chain can cost a pass."""
    x = mx.clip(x, float(SMALLEST_NORMAL_EXPONENT), 128.0)
    n = mx.round(x)
    r = x - n
    p = EXP2_COEFFICIENTS[-1]
    for c in reversed(EXP2_COEFFICIENTS[:-1]):
        p = p * r + c
    # A constant for gradients (n is piecewise constant; a bit view has no vjp).
    return p * mx.stop_gradient(power_of_two(n.astype(mx.int32)))


def sigmoid_float32(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + exp2_for_sigmoid(x * -LOG2_E))


def sigmoid_cast(x: mx.array) -> mx.array:
    return sigmoid_float32(x.astype(mx.float32)).astype(x.dtype)


def silu_cast(x: mx.array) -> mx.array:
    x32 = x.astype(mx.float32)
    return (x32 * sigmoid_float32(x32)).astype(x.dtype)


def silu_gate_cast(gate: mx.array, x: mx.array) -> mx.array:
    g = gate.astype(mx.float32)
    return (g * sigmoid_float32(g)).astype(gate.dtype) * x


# The fused forms' gradients come from sigmoid's derivative s (1 - s), not from
# their ops: differentiating 1 / (1 + 2 ** y) where 2 ** y overflows (x below about
# -88) meets 0 * inf, which is nan, where mx.sigmoid's gradient is 0.

def sigmoid_and_derivative(x32: mx.array):
    s = sigmoid_float32(x32)
    return s, s * (1.0 - s)


sigmoid_fused = mx.custom_function(sigmoid_cast)


@sigmoid_fused.vjp
def sigmoid_fused_vjp(x, cotangent, output):
    _, derivative = sigmoid_and_derivative(x.astype(mx.float32))
    return (cotangent * derivative).astype(x.dtype)


silu_fused = mx.custom_function(silu_cast)


@silu_fused.vjp
def silu_fused_vjp(x, cotangent, output):
    x32 = x.astype(mx.float32)
    s, derivative = sigmoid_and_derivative(x32)
    return (cotangent * (s + x32 * derivative)).astype(x.dtype)


silu_gate_fused = mx.custom_function(silu_gate_cast)


@silu_gate_fused.vjp
def silu_gate_fused_vjp(primals, cotangent, output):
    gate, x = primals
    g = gate.astype(mx.float32)
    s, derivative = sigmoid_and_derivative(g)
    d_gate = cotangent * x * (s + g * derivative)
    d_x = cotangent * (g * s).astype(gate.dtype)
    return d_gate.astype(gate.dtype), d_x.astype(x.dtype)


class Compiled(threading.local):
    """The fused forms, compiled once per thread. MLX caches a compiled function's
    traces per thread, holding the Python function, and a thread that ends with
    traces cached aborts the process (mlx-lm's server decodes in a thread of its
    own). A thread's local objects are released first, in the thread itself, and
    take their traces with them."""

    def __init__(self):
        self.sigmoid = mx.compile(sigmoid_fused)
        self.silu = mx.compile(silu_fused)
        self.silu_gate = mx.compile(silu_gate_fused)


COMPILED = Compiled()
