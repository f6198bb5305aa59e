"""Forgetting attention: ``naive`` (the reference), ``sdpa`` (MLX's fused attention,
the GPU forms), ``kernel`` (the tiled GPU kernel for long prompts). The CPU forms
live in ``genesis_mlx.cpu.fox``."""

from .kernel import fox_attention_tiled
from .naive import fox_attention
from .sdpa import fox_attention_sdpa

__all__ = ["fox_attention", "fox_attention_sdpa", "fox_attention_tiled"]
