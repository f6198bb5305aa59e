"""Which kernels run: the GPU backend MLX was built with (Metal, CUDA), none (the ops
path), or the CPU emulation of the kernel bodies (tests, ``genesis-mlx doctor``).

The choice is made once, from ``GENESIS_MLX_KERNELS`` (auto, off, emulate) when the
package is imported, and can be changed with ``select_kernels``: model code asks
``gpu_backend()`` and never reads the environment itself.
"""

import os
from typing import Optional

import mlx.core as mx

CHOICES = ("auto", "off", "emulate")
ENV_VARIABLE = "GENESIS_MLX_KERNELS"

_choice = "auto"


def select_kernels(choice: str) -> None:
    """auto: the device's GPU kernels where it has them; off: the ops path; emulate:
    the kernel bodies compiled for the CPU (slow: for checking their logic)."""
    global _choice
    if choice not in CHOICES:
        raise ValueError(f"kernels {choice!r}: choose one of {', '.join(CHOICES)}")
    _choice = choice


def selected_kernels() -> str:
    return _choice


def device_gpu() -> Optional[str]:
    """The GPU backend this MLX runs on, if any."""
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


def gpu_backend() -> Optional[str]:
    """"metal", "cuda", "emulate", or None (the ops path)."""
    if _choice == "off":
        return None
    if _choice == "emulate":
        return "emulate"
    return device_gpu()


def environment_setting() -> str:
    """GENESIS_MLX_KERNELS, checked (the CLI says a wrong one in one line)."""
    value = os.environ.get(ENV_VARIABLE, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        from ..errors import GenesisError

        raise GenesisError(f"{ENV_VARIABLE}={value}: choose one of {', '.join(CHOICES)}")
    return value


_choice = os.environ.get(ENV_VARIABLE, "auto").strip().lower() or "auto"
if _choice not in CHOICES:  # said by environment_setting() where the CLI starts
    _choice = "auto"
