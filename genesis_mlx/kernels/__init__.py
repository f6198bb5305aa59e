"""Sequence-mixer implementations: plain MLX reference ops (``naive``) and the
dispatch the model calls through. Fused kernels plug in here; the ops path is the
fallback everywhere and the only path with gradients."""

from .naive import causal_decay, fox_attention, gla_chunk, gla_chunked, gla_step

__all__ = ["causal_decay", "fox_attention", "gla_chunk", "gla_chunked", "gla_step"]
