"""Sequence mixers, in flash-linear-attention's layout: per algorithm (``gla``, ``fox``)
a ``naive`` reference, the ops forms, the GPU kernel and the CPU arrangement; the
kernel bodies in ``metal/`` with their ``launcher`` and CPU ``emulation``.

This module is the dispatch the model calls. The ops path runs everywhere and is the
only one with gradients; a GPU kernel is used when the device has one, the call is
inference (``backend.select_kernels`` / ``GENESIS_MLX_KERNELS``) and the kernel passed
its first-use check (``guard``). ``gla_decode_form`` and ``fox_form`` are the rules;
``genesis-mlx doctor`` reads them to say which path the model takes.
"""

import mlx.core as mx

from ..fastmath import exp

from .backend import gpu_backend, select_kernels
from .fox import (fox_attention, fox_attention_grouped, fox_attention_kernel,
                  fox_attention_parallel, fox_decode_step, group_values, ungroup_values,
                  use_cpu_streams)
from .fox import kernel as fox_kernel
from .fox.cached import kv_heads
from .gla import gla_chunked, gla_chunked_parallel, gla_recurrent, gla_step
from .gla import recurrent as gla_kernel

# Up to this many new tokens, the recurrent kernel (sequential in time, parallel over
# batch * heads * value columns) beats the chunked form.
RECURRENT_MAX_T = 64

# The FoX kernel saves memory (no bias matrix) but is slower than the ops path for
# prefills, so it takes only the long ones, where the bias matrix would be large.
# Decoding keeps the ops path until the kernel's key splits are timed on a GPU.
FOX_KERNEL_MIN_QUERIES = 1024

# Up to this many queries against a cache, the grouped form (no per-head copy of a
# quantized cache's V) is used; longer chunks copy V once into per-head layout.
FOX_GROUPED_MAX_QUERIES = 64


def gla_prefill(q, k, v, log_g, scale, chunk_size, state=None, beta=None):
    """Whole-sequence GLA (no-cache forward, training, prompts). The delta rule makes
    each chunk depend on the previous state, so it keeps the sequential form; on
    the CPU the loop-free form's extra [N, N] x [N, Dk*Dv] product costs what the
    Python loop saves."""
    if beta is not None or mx.default_device() == mx.cpu:
        return gla_chunked(q, k, v, log_g, scale, chunk_size, state, beta)
    return gla_chunked_parallel(q, k, v, log_g, scale, chunk_size, state)


def gla_decode_form(T: int, backend) -> str:
    """What ``gla_decode`` runs for T new tokens: "kernel" (the recurrent kernel, if
    its guard agrees), "step" (``gla_step``) or "chunked" (``gla_prefill``)."""
    if T <= RECURRENT_MAX_T and backend is not None:
        return "kernel"
    return "step" if T == 1 else "chunked"


def gla_decode(q, k, v, log_g, scale, chunk_size, state):
    """GLA continuing from a cached state (inference)."""
    _, H, T, Dk = q.shape
    backend = gpu_backend()
    if gla_decode_form(T, backend) == "kernel" and gla_kernel.GUARD.usable(
            backend, q.dtype, (H, Dk, v.shape[-1])):
        return gla_recurrent(q, k, v, log_g, scale, state)
    if T == 1:
        return gla_step(q, k, v, exp(log_g)[..., None], scale, state)
    return gla_prefill(q, k, v, log_g, scale, chunk_size, state)


def fox_form(n_queries: int, backend, training=False, cached=False) -> str:
    """What ``fox_attend`` runs: "kernel" (if its guard agrees), "grouped" (a few
    queries against a cache), "cpu streams" (long CPU prefills) or "blocks"."""
    if not training and backend is not None and (
            n_queries >= FOX_KERNEL_MIN_QUERIES or backend == "emulate"):
        return "kernel"
    if cached and n_queries <= FOX_GROUPED_MAX_QUERIES:
        return "grouped"
    return "cpu streams" if use_cpu_streams(n_queries, training) else "blocks"


def fox_attend(q, k, v, cumsum_q, cumsum_k, scale, key_start=None, training=False,
               cached=False, quantized=None):
    """FoX attention: the kernel for long inference prefills where there is one,
    else the ops path (for a few queries against a cache: its grouped form; for long
    CPU prefills: spread over the cores). ``cached``: k and v come from a FoX cache,
    where v is per head [B, H, Tk, D] or, in a quantized cache, grouped by KV head
    [B, Hkv, Tk, n_rep * D]. ``quantized=(group_size, bits)``: k and v are
    mx.quantize triples."""
    _, H, Tq, D = q.shape
    backend = gpu_backend()
    form = fox_form(Tq, backend, training, cached)
    if form == "kernel" and not fox_kernel.GUARD.usable(backend, q.dtype, (H, kv_heads(k), D)):
        form = fox_form(Tq, None, training, cached)
    if form == "grouped":
        return fox_attention_grouped(q, k, v, cumsum_q, cumsum_k, scale, key_start, quantized)
    if quantized is not None:
        group_size, bits = quantized
        k, v = (mx.dequantize(*a, group_size=group_size, bits=bits) for a in (k, v))
    if v.shape[1] != H:
        v = ungroup_values(v, H)
    if form == "kernel":
        return fox_attention_kernel(q, k, v, cumsum_q, cumsum_k, scale, key_start)
    if form == "cpu streams":
        return fox_attention_parallel(q, k, v, cumsum_q, cumsum_k, scale, key_start)
    return fox_attention(q, k, v, cumsum_q, cumsum_k, scale, key_start)


__all__ = ["fox_attend", "fox_attention", "fox_attention_grouped", "fox_attention_kernel",
           "fox_attention_parallel", "fox_decode_step", "fox_form", "gla_chunked",
           "gla_chunked_parallel", "gla_decode", "gla_decode_form", "gla_prefill",
           "gla_recurrent", "gla_step", "gpu_backend", "group_values", "select_kernels",
           "ungroup_values"]
