"""genesis-mlx: Genesis-152M (GLA + FoX + TTT) on MLX."""

import importlib
import os

# float32 means float32: MLX otherwise runs fp32 matmuls as TF32 on GPUs that have it
# (NVIDIA, Apple M5), whose error per product is larger than the parity with the
# reference allows. Set MLX_ENABLE_TF32=1 yourself to trade that for speed.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

__version__ = "0.2.0"

from .conversion.mlx_lm_files import FORMAT_VERSION as MODEL_FORMAT  # noqa: E402
from .errors import GenesisError  # noqa: E402

# Imported on first use: mlx-lm brings in transformers (seconds of imports), which the CLI's
# start (it may re-execute itself to preload a BLAS) should not pay twice.
_LAZY = {
    "Model": ".model.genesis", "ModelArgs": ".model.genesis", "load": ".loading",
    "SamplingOptions": ".generation.generate", "generate": ".generation.generate",
    "stream_generate": ".generation.generate", "generate_step": ".generation.steps",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'genesis_mlx' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["MODEL_FORMAT", "GenesisError", "Model", "ModelArgs", "SamplingOptions", "generate",
           "generate_step", "load", "stream_generate"]
