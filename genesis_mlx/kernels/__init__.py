"""Sequence mixers: plain MLX reference ops (``naive``), fused GPU kernels, and the
dispatch the model calls. The ops path runs everywhere and is the only one with
gradients; a GPU kernel is used when the device has one and the call is inference.
``GENESIS_MLX_KERNELS=off`` forces the ops path."""

import mlx.core as mx

from .cpu import fox_attention_parallel, fox_decode_step, use_cpu_streams
from .fox_attention import fox_attention_kernel
from .gla_recurrent import gla_recurrent
from .shared import gpu_backend
from .naive import (causal_decay, fox_attention, fox_attention_grouped, gla_chunk, gla_chunked,
                    gla_chunked_parallel, gla_step, group_values, ungroup_values)

# Up to this many new tokens, the recurrent kernel (sequential in time, parallel over
# batch * heads * value columns) beats the chunked form.
RECURRENT_MAX_T = 64


def gla_prefill(q, k, v, log_g, scale, chunk_size, state=None, beta=None):
    """Whole-sequence GLA (no-cache forward, training). The delta rule makes each
    chunk depend on the previous state, so it keeps the sequential form."""
    if beta is not None or mx.default_device() == mx.cpu:
        # On the CPU the two cost about the same (59 vs 56 ms per layer at 2048 tokens
        # here; the loop-free form's extra [N, N] x [N, Dk*Dv] product eats what the
        # Python loop costs). On a GPU it is 14x faster (0.49 vs 7.05 ms on an H100).
        return gla_chunked(q, k, v, log_g, scale, chunk_size, state, beta)
    return gla_chunked_parallel(q, k, v, log_g, scale, chunk_size, state)


def gla_decode(q, k, v, log_g, scale, chunk_size, state):
    """GLA continuing from a cached state (inference)."""
    T = q.shape[2]
    if T <= RECURRENT_MAX_T and gpu_backend() is not None:
        return gla_recurrent(q, k, v, log_g, scale, state)
    if T == 1:
        return gla_step(q, k, v, log_g, scale, state)
    return gla_prefill(q, k, v, log_g, scale, chunk_size, state)


# The FoX kernel is a memory kernel: no bias matrix (18 MB instead of 4.7 GB at 8192
# tokens on an H100) but slower than the ops path for prefills (4.1 vs 1.8 ms per
# layer at 2048, measured when it had one thread per row), so it takes the long
# prefills, where the bias matrix would be large. Decoding keeps the ops path (0.17 ms
# per layer there): the kernel's key splits (one thread per 64 keys, where it had 9
# threads per token before) have not been timed on a GPU yet.
FOX_KERNEL_MIN_QUERIES = 1024


# Up to this many queries against a cache, the grouped form (no per-head copy of
# V) is used; longer chunks copy V once into per-head layout.
FOX_GROUPED_MAX_QUERIES = 64


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


__all__ = ["group_values", "ungroup_values", "fox_attend", "fox_decode_step", "fox_attention_grouped", "fox_attention_kernel", "causal_decay", "fox_attention", "gla_chunk", "gla_chunked", "gla_chunked_parallel",
           "gla_decode", "gla_prefill", "gla_recurrent", "gla_step", "gpu_backend"]
