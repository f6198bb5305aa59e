"""genesis-mlx: Genesis-152M (GLA + FoX + TTT) on MLX."""

__version__ = "0.1.0"

from .errors import GenesisError
from .generation.generate import SamplingOptions, generate, stream_generate
from .loading import load
from .model.genesis import Model, ModelArgs

__all__ = ["GenesisError", "Model", "ModelArgs", "SamplingOptions", "generate", "load",
           "stream_generate"]
