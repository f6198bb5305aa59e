"""genesis-mlx: Genesis-152M (GLA + FoX + TTT) on MLX."""

import os

# float32 means float32: MLX otherwise runs fp32 matmuls as TF32 on GPUs that have it
# (NVIDIA, Apple M5), a ~3e-4 relative error per product that breaks parity with the
# reference. Set MLX_ENABLE_TF32=1 yourself to trade that for speed.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

__version__ = "0.1.0"

from .errors import GenesisError
from .generation.generate import SamplingOptions, generate, stream_generate
from .loading import load
from .model.genesis import Model, ModelArgs

__all__ = ["GenesisError", "Model", "ModelArgs", "SamplingOptions", "generate", "load",
           "stream_generate"]
