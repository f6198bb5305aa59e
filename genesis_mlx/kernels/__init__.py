"""Sequence mixers, in flash-linear-attention's layout: per algorithm (``gla``, ``fox``)
a ``naive`` reference, the ops forms, the GPU kernel and the CPU arrangement; the
kernel bodies in ``metal/`` with their ``launcher`` and CPU ``emulation``.

This module is the dispatch the model calls. The ops path runs everywhere and is the
only one with gradients; a GPU kernel is used when the device has one and the call
is inference (``backend.select_kernels`` / ``GENESIS_MLX_KERNELS``).
"""

import mlx.core as mx

from ..fastmath import exp

from .backend import gpu_backend, select_kernels
from .fox import (fox_attention, fox_attention_grouped, fox_attention_kernel,
                  fox_attention_parallel, fox_decode_step, group_values, ungroup_values,
                  use_cpu_streams)
from .gla import gla_chunked, gla_chunked_parallel, gla_recurrent, gla_step

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


def gla_decode(q, k, v, log_g, scale, chunk_size, state):
    """GLA continuing from a cached state (inference)."""
    T = q.shape[2]
    if T <= RECURRENT_MAX_T and gpu_backend() is not None:
        return gla_recurrent(q, k, v, log_g, scale, state)
    if T == 1:
        return gla_step(q, k, v, exp(log_g)[..., None], scale, state)
    return gla_prefill(q, k, v, log_g, scale, chunk_size, state)


def fox_attend(q, k, v, cumsum_q, cumsum_k, scale, key_start=None, training=False,
               cached=False, quantized=None):
    """FoX attention: the kernel for long inference prefills where there is one,
    else the ops path (for a few queries against a cache: its grouped form; for long
    CPU prefills: spread over the cores). ``cached``: k and v come from a FoX cache,
    where v is per head [B, H, Tk, D] or, in a quantized cache, grouped by KV head
    [B, Hkv, Tk, n_rep * D]. ``quantized=(group_size, bits)``: k and v are
    mx.quantize triples."""
    H, Tq = q.shape[1], q.shape[2]
    backend = gpu_backend()
    use_kernel = not training and backend is not None and (
        Tq >= FOX_KERNEL_MIN_QUERIES or backend == "emulate")
    if cached and Tq <= FOX_GROUPED_MAX_QUERIES and not use_kernel:
        return fox_attention_grouped(q, k, v, cumsum_q, cumsum_k, scale, key_start, quantized)
    if quantized is not None:
        group_size, bits = quantized
        k, v = (mx.dequantize(*a, group_size=group_size, bits=bits) for a in (k, v))
    if v.shape[1] != H:
        v = ungroup_values(v, H)
    if use_kernel:
        return fox_attention_kernel(q, k, v, cumsum_q, cumsum_k, scale, key_start)
    if use_cpu_streams(Tq, training):
        return fox_attention_parallel(q, k, v, cumsum_q, cumsum_k, scale, key_start)
    return fox_attention(q, k, v, cumsum_q, cumsum_k, scale, key_start)


__all__ = ["fox_attend", "fox_attention", "fox_attention_grouped", "fox_attention_kernel",
           "fox_attention_parallel", "fox_decode_step", "gla_chunked", "gla_chunked_parallel",
           "gla_decode", "gla_prefill", "gla_recurrent", "gla_step", "gpu_backend",
           "group_values", "select_kernels", "ungroup_values"]
