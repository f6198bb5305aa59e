"""Every form of the sequence mixers against the plain reference it must reproduce:
the GPU kernels (their bodies run here on the CPU, compiled as C++, one call per GPU
thread; on a GPU machine the same tests run the Metal or CUDA kernel), MLX's fused
attention (the GPU forms) and the CPU forms."""


import mlx.core as mx
import numpy as np
import pytest

from conftest import (SMALLEST_NORMAL, U32, exp_error, max_difference, ops_rounding,
                      sigmoid_derivative_error, sigmoid_error, silu_derivative_error)
from genesis_mlx.cpu.fox import deal_out, fox_attention_grouped, fox_attention_parallel
from genesis_mlx.forms import exp
from genesis_mlx.kernels import gla, gpu_backend
from genesis_mlx.kernels.fox import fox_attention, fox_attention_sdpa, fox_attention_tiled
from genesis_mlx.kernels.gla import gla_chunked, gla_chunked_parallel, gla_recurrent, gla_step

SHAPES = [(1, 3, 48, 96), (2, 3, 48, 96), (2, 2, 16, 32), (1, 4, 12, 24)]
LENGTHS = [1, 5, 64, 65, 130]


def inputs(B, H, T, Dk, Dv, with_state, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((B, H, T, Dk)).astype(dtype)
    k = (mx.random.normal((B, H, T, Dk)) * 0.2).astype(dtype)
    v = mx.random.normal((B, H, T, Dv)).astype(dtype)
    g = -mx.random.uniform(0, 0.7, (B, H, T))
    s = mx.random.normal((B, H, Dk, Dv)) if with_state else None
    return q, k, v, g, Dk ** -0.5, s


def kernel_runs():
    runs = [("emulated", lambda *a: gla_recurrent(*a, backend="emulate"))]
    backend = gpu_backend()
    if backend in ("metal", "cuda"):
        runs.append((backend, lambda *a: gla_recurrent(*a, backend=backend)))
    return runs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_kernel_equals_ops(shape, T, with_state):
    B, H, Dk, Dv = shape
    q, k, v, g, scale, s = inputs(B, H, T, Dk, Dv, with_state)
    want, want_state = gla_chunked(q, k, v, g, scale, 64, s)
    tol, state_tol = (r.tolerance for r in ops_rounding(gla_chunked, q, k, v, g, scale, 64, s))
    for name, run in kernel_runs():
        out, state = run(q, k, v, g, scale, s)
        assert max_difference(want, out) <= tol, name
        assert max_difference(want_state, state) <= state_tol, name


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_recurrent_kernel_reduced_precision_inputs(dtype):
    """Inputs in bf16/fp16, state and arithmetic in fp32: the same values as the ops
    path given the same rounded inputs (fp32 bound)."""
    q, k, v, g, scale, s = inputs(2, 3, 33, 48, 96, True, dtype)
    want, want_state = gla_chunked(q, k, v, g, scale, 64, s)
    tol, state_tol = (r.tolerance for r in ops_rounding(gla_chunked, q, k, v, g, scale, 64, s))
    for name, run in kernel_runs():
        out, state = run(q, k, v, g, scale, s)
        assert max_difference(want, out) <= tol, name
        assert max_difference(want_state, state) <= state_tol, name


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200, 257])
def test_chunked_without_python_loop_equals_loop(T):
    q, k, v, g, scale, s = inputs(2, 3, T, 16, 32, True)
    a, sa = gla_chunked(q, k, v, g, scale, 64, s)
    b, sb = gla_chunked_parallel(q, k, v, g, scale, 64, s)
    tol, state_tol = (r.tolerance for r in ops_rounding(gla_chunked, q, k, v, g, scale, 64, s))
    assert max_difference(a, b) <= tol and max_difference(sa, sb) <= state_tol


def test_chunked_parallel_gradients_equal_loop():
    q, k, v, g, scale, s = inputs(1, 2, 150, 16, 32, True)

    def loss(fn, q, k, v, g):
        out, state = fn(q, k, v, g, scale, 64, s)
        return (out * out).sum() + state.sum()

    for arg in range(4):
        grad = mx.grad(lambda *a: loss(gla_chunked, *a), argnums=arg)
        ga = grad(q, k, v, g)
        gb = mx.grad(lambda *a: loss(gla_chunked_parallel, *a), argnums=arg)(q, k, v, g)
        tol = ops_rounding(grad, q, k, v, g).tolerance
        assert np.isfinite(np.array(gb)).all() and max_difference(ga, gb) <= tol, arg


def test_dispatch_uses_kernel_only_where_available(kernels_choice):
    q, k, v, g, scale, s = inputs(1, 3, 1, 48, 96, True)
    kernels_choice("off")
    out, _ = gla(q, k, v, g, scale, 64, s, cached=True)
    want, _ = gla_step(q, k, v, exp(g)[..., None], scale, s)
    assert np.array_equal(np.array(out), np.array(want))  # the ops path, exactly
    kernels_choice("emulate")
    emulated, _ = gla(q, k, v, g, scale, 64, s, cached=True)
    step = ops_rounding(lambda q, k, v, g, s: gla_step(q, k, v, exp(g)[..., None], scale, s),
                        q, k, v, g, s)[0]
    assert max_difference(want, emulated) <= step.tolerance


def fox_inputs(B, H, Hkv, Tq, Tk, D, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((B, H, Tq, D)).astype(dtype)
    k = mx.random.normal((B, Hkv, Tk, D)).astype(dtype)
    v = mx.random.normal((B, H, Tk, D)).astype(dtype)
    ck = mx.cumsum(-mx.random.uniform(0, 0.3, (B, H, Tk)), axis=-1)
    return q, k, v, ck[..., Tk - Tq:], ck, D ** -0.5


def tiled_runs():
    backends = ["emulate"] + [b for b in [gpu_backend()] if b in ("metal", "cuda")]
    return [(b, lambda *a, b=b: fox_attention_tiled(*a, backend=b)) for b in backends]


# (B, H, Hkv, Tq, Tk, D): rows not a multiple of the 32-row tile, keys not a multiple
# of the 32-key tile, one row, GQA 3:1, MHA, new queries after cached keys.
TILED_SHAPES = [(1, 3, 1, 1, 1, 64), (2, 9, 3, 37, 37, 64), (1, 4, 4, 130, 130, 16),
                (1, 6, 2, 45, 301, 32)]


@pytest.mark.parametrize("shape", TILED_SHAPES)
def test_tiled_fox_kernel_equals_ops(shape):
    """The threadgroup-memory kernel, its threads emulated as real threads that meet
    at barriers: == ops, with left padding (a padded row sees only itself)."""
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v, cq, ck, scale = fox_inputs(B, H, Hkv, Tq, Tk, D)
    for key_start in [None, mx.array([min(33, Tk - 1)] * B, mx.int32)]:
        want = fox_attention(q, k, v, cq, ck, scale, key_start)
        tol = ops_rounding(fox_attention, q, k, v, cq, ck, scale, key_start).tolerance
        for name, run in tiled_runs():
            assert max_difference(want, run(q, k, v, cq, ck, scale, key_start)) <= tol, name


def test_fox_kernel_left_padding_and_reduced_precision():
    q, k, v, cq, ck, scale = fox_inputs(3, 6, 2, 40, 40, 32, dtype=mx.bfloat16)
    key_start = mx.array([0, 7, 39], mx.int32)
    want = fox_attention(q, k, v, cq, ck, scale, key_start)
    tol = ops_rounding(fox_attention, q, k, v, cq, ck, scale, key_start).tolerance
    for name, run in tiled_runs():
        got = run(q, k, v, cq, ck, scale, key_start)
        assert np.isfinite(np.array(got)).all() and max_difference(want, got) <= tol, name


def test_whole_model_decode_with_kernel_equals_without(reference_checkpoint, kernels_choice):
    from conftest import CONFIGS, logits_tolerance, mlx_model, tokens

    _, path = reference_checkpoint(**CONFIGS["gqa3"])
    ids = tokens(40)
    results = {}
    kernel = gpu_backend() if gpu_backend() in ("metal", "cuda") else "emulate"
    for mode in ("off", kernel if kernel == "emulate" else "auto"):
        kernels_choice(mode)
        model = mlx_model(path)
        cache = model.make_cache()
        outs = [model(mx.array(ids[:, :20]), cache=cache)]
        outs += [model(mx.array(ids[:, t : t + 1]), cache=cache) for t in range(20, 40)]
        results[mode] = np.concatenate([np.array(o) for o in outs], axis=1)
    a, b = results.values()
    assert np.abs(a - b).max() <= logits_tolerance(mlx_model(path), ids)


# (B, H, Hkv, Tq, Tk, D, key_start): a prompt, decode, a chat turn after cached keys, a
# left-padded batch, MHA, GQA 3:1 at the real head size.
CACHE_CASES = [(1, 9, 3, 37, 37, 64, None), (1, 9, 3, 1, 50, 64, None),
               (2, 6, 2, 7, 40, 32, [3, 0]), (2, 4, 4, 5, 5, 32, None),
               (1, 6, 2, 64, 64, 32, [10]), (2, 6, 2, 70, 70, 32, [0, 30])]


@pytest.mark.parametrize("form", [fox_attention_grouped, fox_attention_sdpa],
                         ids=["cpu-grouped", "fused-sdpa"])
@pytest.mark.parametrize("case", CACHE_CASES)
def test_fox_forms_equal_ops(form, case):
    """The CPU's grouped form (each head a product over the cache as laid out) and
    mx.fast.scaled_dot_product_attention (the forget bias as its mask, one call per
    head of each KV group, K never repeated), against the plain form."""
    B, H, Hkv, Tq, Tk, D, starts = case
    q, k, v, cq, ck, scale = fox_inputs(B, H, Hkv, Tq, Tk, D)
    key_start = None if starts is None else mx.array(starts, mx.int32)
    want = fox_attention(q, k, v, cq, ck, scale, key_start)
    tol = ops_rounding(fox_attention, q, k, v, cq, ck, scale, key_start).tolerance
    assert max_difference(want, form(q, k, v, cq, ck, scale, key_start)) <= tol


def quantized_kv(k, v, bits):
    """K and V as a quantized FoX cache stores them, and what they hold once rounded."""
    k_q, v_q = (mx.quantize(a, group_size=32, bits=bits) for a in (k, v))
    return k_q, v_q, *(mx.dequantize(*a, group_size=32, bits=bits) for a in (k_q, v_q))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_grouped_fox_equals_ops_on_dequantized_cache(bits):
    """With a quantized cache, attention is exact given the stored (rounded) K and V."""
    B, H, Hkv, Tq, Tk, D = 2, 6, 2, 3, 70, 32
    q, k, v, cq, ck, scale = fox_inputs(B, H, Hkv, Tq, Tk, D)
    k_q, v_q, k_stored, v_stored = quantized_kv(k, v, bits)
    want = fox_attention(q, k_stored, v_stored, cq, ck, scale)
    got = fox_attention_grouped(q, k_q, v_q, cq, ck, scale, quantized=(32, bits))
    tol = ops_rounding(fox_attention, q, k_stored, v_stored, cq, ck, scale).tolerance
    assert max_difference(want, got) <= tol
    # and the rounding is real: the exact K/V give different outputs
    assert max_difference(fox_attention(q, k, v, cq, ck, scale), got) > tol


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_attention_on_a_quantized_cache_equals_ops_on_dequantized_cache(bits):
    """mlx-lm's quantized attention with the forget bias as its mask."""
    B, H, Hkv, Tq, Tk, D = 2, 6, 2, 3, 70, 32
    q, k, v, cq, ck, scale = fox_inputs(B, H, Hkv, Tq, Tk, D)
    k_q, v_q, k_stored, v_stored = quantized_kv(k, v, bits)
    key_start = mx.array([0, 9], mx.int32)
    want = fox_attention(q, k_stored, v_stored, cq, ck, scale, key_start)
    got = fox_attention_sdpa(q, k_q, v_q, cq, ck, scale, key_start, quantized=(32, bits))
    tol = ops_rounding(fox_attention, q, k_stored, v_stored, cq, ck, scale, key_start).tolerance
    assert max_difference(want, got) <= tol


@pytest.mark.parametrize("Tq,Tk,starts", [(300, 300, None), (200, 333, None), (257, 257, [0, 30])])
def test_fox_spread_over_cpu_streams_equals_ops(Tq, Tk, starts):
    B = 1 if starts is None else len(starts)
    q, k, v, cq, ck, scale = fox_inputs(B, 6, 2, Tq, Tk, 32)
    key_start = None if starts is None else mx.array(starts, mx.int32)
    want = fox_attention(q, k, v, cq, ck, scale, key_start)
    got = fox_attention_parallel(q, k, v, cq, ck, scale, key_start, block_size=64)
    assert max_difference(want, got) <= ops_rounding(fox_attention, q, k, v, cq, ck, scale,
                                                      key_start).tolerance


def test_work_dealt_out_evenly():
    owner = deal_out([1, 2, 3, 4, 5, 6, 7, 8], 2)
    loads = [sum(c for c, o in zip(range(1, 9), owner) if o == s) for s in (0, 1)]
    assert loads == [18, 18]


def elementwise_rel(want, got, floor=0.0, bound=1.0):
    """Largest |got - want| / max(|want|, floor) / bound, element by element (a max over
    the whole range would let the largest values hide every small one's error)."""
    want, got = np.array(want, np.float64), np.array(got, np.float64)
    return float((np.abs(got - want) / np.maximum(np.abs(want), floor) / bound).max())


def test_fast_math_equals_mlx():
    from genesis_mlx.cpu import fastmath

    x = mx.linspace(-80, 80, 100_001)
    exact = np.exp(np.array(x, np.float64))
    # Two float32 evaluations: within the sum of their bounds (conftest.exp_error ...).
    assert elementwise_rel(exact, fastmath.exp(x), bound=exp_error(x)) <= 1
    assert elementwise_rel(mx.exp(x), fastmath.exp(x), bound=2 * exp_error(x)) <= 1
    assert elementwise_rel(mx.sigmoid(x), fastmath.sigmoid(x), bound=2 * sigmoid_error(x)) <= 1
    assert elementwise_rel(x * mx.sigmoid(x), fastmath.silu(x), floor=1e-30,
                           bound=2 * (sigmoid_error(x) + U32)) <= 1
    scores = mx.random.normal((4, 50)) * 20
    scores = mx.where(mx.random.uniform(shape=(4, 50)) < 0.5, scores, -mx.inf)
    scores[:, 0] = 1.0  # every row keeps one finite entry
    want = mx.softmax(scores, axis=-1)
    # A weight: its exp's error (of x - max, itself rounded: u |x - max| more), the
    # sum's (its terms' largest, n roundings) and the division's.
    shifted = np.array(scores, np.float64) - np.array(scores, np.float64).max(-1, keepdims=True)
    term = exp_error(shifted) + U32 * np.abs(shifted)
    worst = np.where(np.isfinite(shifted), term, 0).max(-1, keepdims=True)
    bound = 2 * (term + worst + (scores.shape[-1] + 1) * U32)
    assert elementwise_rel(want, fastmath.softmax(scores), floor=2.0**-126, bound=bound) <= 1


def test_fused_sigmoid_and_silu_hold_at_the_extremes_and_in_every_form():
    """The fused forms (large arrays) against float64 and against the plain forms
    (small arrays): overflow, underflow (to float32's smallest normal), inf and nan, bfloat16,
    the gated product and the gradient."""
    from genesis_mlx.cpu import fastmath

    edges = [-np.inf, np.inf, np.nan, 0.0, -87.0, -88.7, -103.0, -104.0, 88.0, 89.0, 200.0]
    x64 = np.concatenate([np.linspace(-120.0, 120.0, 2 * fastmath.FUSED_MIN_SIZE), edges])
    x = mx.array(x64.astype(np.float32))
    want = 1.0 / (1.0 + np.exp(-np.array(x, np.float64)))
    got = np.array(fastmath.sigmoid(x), np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    normal, tiny = want >= 2.0**-126, want < 2.0**-126  # nan: neither
    assert elementwise_rel(want[normal], got[normal], bound=sigmoid_error(x)[normal]) <= 1
    assert (got[tiny] < 2.0**-126).all()
    small = x[: fastmath.FUSED_MIN_SIZE // 2]
    assert small.size < fastmath.FUSED_MIN_SIZE <= x.size  # both paths ran
    # the same float32 exponent in both forms: only 2 ** y (faithful, 2 u, in both)
    # and the sum, reciprocal and product after it differ: 2 * 5 u
    assert elementwise_rel(fastmath.silu(x)[: small.size], fastmath.silu(small),
                           floor=1e-30, bound=10 * U32) <= 1
    gate, up = mx.random.normal((2, 4096)) * 6, mx.random.normal((2, 4096))
    assert elementwise_rel(gate * mx.sigmoid(gate) * up, fastmath.silu_gate(gate, up),
                           floor=1e-30, bound=2 * (sigmoid_error(gate) + 2 * U32)) <= 1
    gate16 = gate.astype(mx.bfloat16)
    half = fastmath.silu(gate16)
    assert half.dtype == mx.bfloat16
    exact = gate16.astype(mx.float32) * mx.sigmoid(gate16.astype(mx.float32))
    # one rounding to bfloat16 (unit roundoff 2 ** -8) of float32 results
    bound = 2.0**-8 + 2 * (sigmoid_error(gate16) + U32)
    assert elementwise_rel(exact, half.astype(mx.float32), bound=bound) <= 1
    grad = mx.grad(lambda g: fastmath.silu(g).sum())(gate)
    want = mx.grad(lambda g: (g * mx.sigmoid(g)).sum())(gate)
    assert (np.abs(np.array(grad) - np.array(want)) <= 2 * silu_derivative_error(gate)).all()
    # Decoding's compiled steps are traced with the plain forms, whatever the size.
    plain = gate * (1.0 / (1.0 + mx.power(2.0, -gate * fastmath.LOG2_E)))
    with fastmath.plain_ops():
        assert mx.array_equal(fastmath.silu(gate), plain)
    assert not mx.array_equal(fastmath.silu(gate), plain)  # bits apart somewhere


def test_fused_sigmoid_and_silu_gradients_hold_where_the_exponential_overflows():
    """Below x of about -88, 2 ** (-x log2 e) overflows to inf, and differentiating
    1 / (1 + inf) through its ops gives 0 * inf = nan; the fused forms' gradients
    are sigmoid's own, as mx.sigmoid's (LoRA training goes through them)."""
    from genesis_mlx.cpu import fastmath

    edges = [-88.5, -100.0, -200.0, -87.0, 0.0, 3.0, 50.0]
    x = mx.array(np.concatenate([edges, np.linspace(-10.0, 10.0, fastmath.FUSED_MIN_SIZE)])
                 .astype(np.float32))
    up = mx.random.normal(x.shape)
    pairs = [(fastmath.sigmoid, mx.sigmoid),
             (fastmath.silu, lambda v: v * mx.sigmoid(v)),
             (lambda v: fastmath.silu_gate(v, up), lambda v: v * mx.sigmoid(v) * up)]
    # two float32 evaluations each: twice conftest's bounds (silu_gate's: times |up|,
    # and one product more)
    silu_gate_derivative = np.abs(np.array(up, np.float64)) * (
        silu_derivative_error(x) + U32 * (1 + np.abs(np.array(x, np.float64))))
    bounds = [sigmoid_derivative_error(x), silu_derivative_error(x), silu_gate_derivative]
    for (ours, theirs), bound in zip(pairs, bounds):
        got = np.array(mx.grad(lambda v: ours(v).sum())(x))
        want = np.array(mx.grad(lambda v: theirs(v).sum())(x))
        assert np.isfinite(got).all()
        assert (np.abs(got - want) <= 2 * bound).all()
    d_up = mx.grad(lambda u: fastmath.silu_gate(x, u).sum())(up)
    assert elementwise_rel(x * mx.sigmoid(x), d_up, floor=SMALLEST_NORMAL,
                           bound=2 * (sigmoid_error(x) + U32)) <= 1
    at_minus_inf = mx.full(x.shape, -np.inf)
    assert (np.array(mx.grad(lambda v: fastmath.sigmoid(v).sum())(at_minus_inf)) == 0).all()


def test_softmax_flushes_weights_below_the_smallest_normal():
    """FoX scores biased by a long context's forget gates spread over ~1000: the
    weights float32 can hold match float64 softmax, the rest are exactly 0."""
    from genesis_mlx.cpu import fastmath

    scores = np.concatenate([np.linspace(-1500.0, 0.0, 2048), [3.0, -86.0, -88.0, -104.0]])
    got = np.array(fastmath.softmax(mx.array(scores[None], mx.float32)))[0]
    unnormalized = np.exp(scores - scores.max())
    exact = unnormalized / unnormalized.sum()
    # float32 rounding decides the entries within a factor 2 of the threshold.
    normal, tiny = unnormalized >= 2.0**-125, unnormalized < 2.0**-127
    assert normal.sum() > 60 and tiny.sum() > 1900
    # as in test_fast_math_equals_mlx, one evaluation: the sum over the normal terms
    shifted = scores[normal] - scores.max()
    term = exp_error(shifted) + U32 * np.abs(shifted)
    bound = term + term.max() + (normal.sum() + 1) * U32
    assert elementwise_rel(exact[normal], got[normal], bound=bound) <= 1
    assert (got[tiny] == 0).all()


# Every thread attribute mx.fast.metal_kernel knows (it declares one in the kernel's
# signature only when the name occurs in the source it is given, not in the header).
MLX_METAL_ATTRIBUTES = (
    "dispatch_quadgroups_per_threadgroup", "dispatch_simdgroups_per_threadgroup",
    "dispatch_threads_per_threadgroup", "grid_origin", "grid_size",
    "quadgroup_index_in_threadgroup", "quadgroups_per_threadgroup",
    "simdgroup_index_in_threadgroup", "simdgroups_per_threadgroup", "thread_execution_width",
    "thread_index_in_quadgroup", "thread_index_in_simdgroup", "thread_index_in_threadgroup",
    "thread_position_in_grid", "thread_position_in_threadgroup", "threadgroup_position_in_grid",
    "threadgroups_per_grid", "threads_per_grid", "threads_per_simdgroup", "threads_per_threadgroup",
)


@pytest.mark.parametrize("kernel", ["fox.kernel.KERNEL", "gla.recurrent.KERNEL"])
def test_metal_source_names_the_attributes_its_prelude_uses(kernel):
    """No Mac here: this checks the one rule the Metal path needs beyond what the CUDA
    and CPU runs of the same body already check."""
    import importlib

    from genesis_mlx.kernels.launcher import PRELUDES

    module, name = kernel.rsplit(".", 1)
    shared = getattr(importlib.import_module(f"genesis_mlx.kernels.{module}"), name)
    used = [a for a in MLX_METAL_ATTRIBUTES if a in PRELUDES["metal"]]
    assert used, "the Metal prelude maps GLOBAL_THREAD_ID to some attribute"
    source = shared.gpu_source("metal")
    assert all(a in source for a in used), [a for a in used if a not in source]
    assert shared.gpu_source("cuda") == shared.body()
