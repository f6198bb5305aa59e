"""Sequence mixers: plain MLX reference ops (``naive``), fused GPU kernels, and the
dispatch the model calls. The ops path runs everywhere and is the only one with
gradients; a GPU kernel is used when the device has one and the call is inference.
``GENESIS_MLX_KERNELS=off`` forces the ops path."""

import mlx.core as mx

from .fox_attention import fox_attention_kernel
from .gla_recurrent import gla_recurrent
from .shared import gpu_backend
from .naive import (causal_decay, fox_attention, gla_chunk, gla_chunked,
                    gla_chunked_parallel, gla_step)

# Up to this many new tokens, the recurrent kernel (sequential in time, parallel over
# batch * heads * value columns) beats the chunked form.
RECURRENT_MAX_T = 64


def gla_prefill(q, k, v, log_g, scale, chunk_size, state=None, beta=None):
    """Whole-sequence GLA (no-cache forward, training). The delta rule makes each
    chunk depend on the previous state, so it keeps the sequential form."""
    if beta is not None or mx.default_device() == mx.cpu:
        # On the CPU the loop is faster (282 vs 369 ms per layer at 2048 tokens): the
        # loop-free form's extra [N, N] x [N, Dk*Dv] product costs more than the
        # Python loop saves. On a GPU it is 14x faster (0.49 vs 7.05 ms on an H100).
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


# The FoX kernel is a memory kernel: one thread per query row, no bias matrix (18 MB
# instead of 4.7 GB at 8192 tokens on an H100) but slower than the ops path (4.1 vs
# 1.8 ms per layer at 2048) and far slower for a handful of queries (decode: 9
# threads). So it takes the long prefills, where the bias matrix would be large.
FOX_KERNEL_MIN_QUERIES = 1024


def fox_attend(q, k, v, cumsum_q, cumsum_k, scale, key_start=None, training=False):
    """FoX attention: the kernel for long inference prefills where there is one,
    else the ops path."""
    backend = gpu_backend()
    long_prefill = q.shape[2] >= FOX_KERNEL_MIN_QUERIES or backend == "emulate"
    if not training and backend is not None and long_prefill:
        return fox_attention_kernel(q, k, v, cumsum_q, cumsum_k, scale, key_start)
    return fox_attention(q, k, v, cumsum_q, cumsum_k, scale, key_start)


__all__ = ["fox_attend", "fox_attention_kernel", "causal_decay", "fox_attention", "gla_chunk", "gla_chunked", "gla_chunked_parallel",
           "gla_decode", "gla_prefill", "gla_recurrent", "gla_step", "gpu_backend"]
