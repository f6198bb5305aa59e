"""Gated linear attention: ``naive`` (the reference recurrence), ``chunk`` (the
loop-free chunked form), ``recurrent`` (the GPU kernel)."""

from .chunk import gla_chunked_parallel
from .naive import causal_decay, gla_chunk, gla_chunked, gla_step
from .recurrent import gla_recurrent

__all__ = ["causal_decay", "gla_chunk", "gla_chunked", "gla_chunked_parallel", "gla_recurrent",
           "gla_step"]
