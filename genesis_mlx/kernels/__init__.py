"""Sequence mixers, in flash-linear-attention's layout: per algorithm (``gla``, ``fox``)
a ``naive`` reference and the other forms of the same math, the GPU kernels' bodies
in ``metal/`` with their ``launcher`` and CPU ``emulation``.

This module is the dispatch, and the only one: ``gla_form`` and ``fox_form`` say which
form a call takes and why; the model runs ``gla`` and ``fox_attend``, which ask them,
and ``genesis-mlx doctor`` reports them. The rules, in order:

1. A GPU kernel where the device has one (``backend.gpu_backend``), the call is
   inference, its shape is one the kernel is for, and it passed its first-use check
   (``guard``). ``GENESIS_MLX_KERNELS=emulate`` runs the kernel bodies on the CPU.
2. Else the GPU forms (MLX's own ops: the loop-free chunked GLA,
   ``mx.fast.scaled_dot_product_attention`` for FoX), or on the CPU the CPU forms
   (``genesis_mlx.forms`` decides which; ``genesis_mlx.cpu`` holds the CPU's).
"""

from typing import Optional, Tuple

import mlx.core as mx

from .. import forms
from .backend import device_gpu, gpu_backend, select_kernels
from .fox import fox_attention, fox_attention_sdpa, fox_attention_tiled
from .fox import kernel as fox_kernel
from .fox.naive import kv_heads
from .gla import gla_chunked, gla_chunked_parallel, gla_recurrent, gla_step
from .gla import recurrent as gla_kernel

# Up to this many new tokens, the recurrent kernel (sequential in time, parallel over
# batch * heads * value columns) beats the chunked form.
RECURRENT_MAX_T = 64

# The tiled FoX kernel never holds the [heads, queries, keys] bias matrix that the
# fused attention reads as its mask: it takes the long prompts, where that matrix
# is large.
FOX_KERNEL_MIN_QUERIES = 1024

# On the CPU, up to this many queries against a cache use the grouped form (each head
# a matrix-vector product over the cache as it is laid out); longer pieces use the
# blocks of the plain form.
FOX_GROUPED_MAX_QUERIES = 64

Form = Tuple[str, str]


def kernel_refusal(guard, backend: Optional[str], dtype, dims) -> Optional[str]:
    """Why the guarded kernel may not run (None: it may)."""
    if backend is None:
        return ("kernels switched off (GENESIS_MLX_KERNELS=off)" if device_gpu()
                else "no GPU here, so no kernels")
    if dtype is not None and not guard.usable(backend, dtype, dims):
        return f"the {guard.title} kernel is {guard.state(backend)}"
    return None


def gla_form(n_tokens: int, cached: bool, delta_rule: bool = False, dtype=None,
             dims: Optional[tuple] = None) -> Form:
    """(form, why) of GLA over ``n_tokens`` new tokens: "recurrent kernel", "step",
    "chunked" (chunk after chunk) or "chunked, loop-free". ``cached``: continuing
    from a cache (inference); ``dims``: (heads, Dk, Dv) for the kernel's check."""
    backend = gpu_backend()
    if cached and n_tokens <= RECURRENT_MAX_T:
        refused = kernel_refusal(gla_kernel.GUARD, backend, dtype, dims)
        if refused is None:
            return "recurrent kernel", (f"{n_tokens} token(s) against a cache "
                                        f"(<= {RECURRENT_MAX_T}) on {backend}")
        if n_tokens == 1:
            return "step", f"one token against a cache; {refused}"
    if delta_rule:
        return "chunked", "the delta rule makes each chunk read the state before it"
    if forms.cpu_forms():
        return "chunked", ("CPU forms: the loop-free form's extra product costs what "
                           "the loop saves")
    return "chunked, loop-free", "GPU forms: the chunks' recurrence as one product"


def gla(q, k, v, log_g, scale: float, chunk_size: int, state=None, beta=None,
        cached: bool = False):
    """GLA over new tokens, from ``state``; -> (output fp32, new state)."""
    _, H, T, Dk = q.shape
    form, _ = gla_form(T, cached, beta is not None, q.dtype, (H, Dk, v.shape[-1]))
    if form == "recurrent kernel":
        return gla_recurrent(q, k, v, log_g, scale, state)
    if form == "step":
        return gla_step(q, k, v, forms.exp(log_g)[..., None], scale, state)
    if form == "chunked":
        return gla_chunked(q, k, v, log_g, scale, chunk_size, state, beta)
    return gla_chunked_parallel(q, k, v, log_g, scale, chunk_size, state)


def fox_form(n_queries: int, cached: bool = False, training: bool = False,
             quantized: bool = False, dtype=None, dims: Optional[tuple] = None) -> Form:
    """(form, why) of FoX attention for ``n_queries`` queries: "tiled kernel", "sdpa"
    (the GPU forms), or the CPU forms "decode step", "grouped", "cpu streams" and
    "blocks".
    ``dims``: (heads, KV heads, head dim) for the kernel's check."""
    backend = gpu_backend()
    long_enough = n_queries >= FOX_KERNEL_MIN_QUERIES or backend == "emulate"
    if not training and long_enough:
        refused = kernel_refusal(fox_kernel.GUARD, backend, dtype, dims)
        if refused is None:
            rule = ("emulated: every call" if backend == "emulate"
                    else f"{n_queries} queries >= {FOX_KERNEL_MIN_QUERIES}")
            return "tiled kernel", f"{rule} on {backend}: no bias matrix held"
    if not forms.cpu_forms():
        cache = ", quantized cache (mlx-lm's quantized attention)" if quantized else ""
        return "sdpa", f"GPU forms: fused attention, the forget bias as its mask{cache}"
    from ..cpu.fox import use_cpu_streams

    if cached and n_queries == 1 and not quantized:
        return "decode step", ("CPU forms: one token against the cache's buffers, one "
                               "compiled graph")
    if cached and n_queries <= FOX_GROUPED_MAX_QUERIES:
        return "grouped", (f"CPU forms: {n_queries} queries (<= {FOX_GROUPED_MAX_QUERIES}) "
                           f"against the cache as it is laid out")
    if use_cpu_streams(n_queries, training):
        return "cpu streams", f"CPU forms: {n_queries} queries in row blocks, one stream a core"
    return "blocks", "CPU forms: query row blocks (the bias matrix bounded)"


def fox_attend(q, k, v, cumsum_q, cumsum_k, scale: float, key_start=None, training=False,
               cached=False, quantized=None):
    """FoX attention. k [B, Hkv, Tk, D], v [B, H, Tk, D] (from a cache when
    ``cached``); ``quantized=(group_size, bits)``: k and v are mx.quantize triples."""
    _, H, Tq, D = q.shape
    form, _ = fox_form(Tq, cached, training, quantized is not None, q.dtype,
                       (H, kv_heads(k), D))
    if form == "sdpa":
        return fox_attention_sdpa(q, k, v, cumsum_q, cumsum_k, scale, key_start, quantized)
    if form in ("decode step", "grouped"):  # the step's math, on the rows written
        from ..cpu.fox import fox_attention_grouped

        return fox_attention_grouped(q, k, v, cumsum_q, cumsum_k, scale, key_start, quantized)
    if quantized is not None:
        group_size, bits = quantized
        k, v = (mx.dequantize(*a, group_size=group_size, bits=bits) for a in (k, v))
    if form == "tiled kernel":
        return fox_attention_tiled(q, k, v, cumsum_q, cumsum_k, scale, key_start)
    if form == "cpu streams":
        from ..cpu.fox import fox_attention_parallel

        return fox_attention_parallel(q, k, v, cumsum_q, cumsum_k, scale, key_start)
    return fox_attention(q, k, v, cumsum_q, cumsum_k, scale, key_start)


__all__ = ["FOX_KERNEL_MIN_QUERIES", "RECURRENT_MAX_T", "fox_attend", "fox_form", "gla",
           "gla_form", "gpu_backend", "select_kernels"]
