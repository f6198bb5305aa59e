"""Forgetting attention: ``naive`` (the reference), ``cached`` (a few queries against
a cache), ``cpu`` (the CPU arrangements), ``kernel`` (the GPU kernels)."""

from .cached import fox_attention_grouped, group_values, ungroup_values
from .cpu import fox_attention_parallel, fox_decode_step, use_cpu_streams
from .kernel import fox_attention_kernel, fox_attention_tiled
from .naive import fox_attention

__all__ = ["fox_attention", "fox_attention_grouped", "fox_attention_kernel",
           "fox_attention_parallel", "fox_attention_tiled", "fox_decode_step", "group_values",
           "ungroup_values", "use_cpu_streams"]
