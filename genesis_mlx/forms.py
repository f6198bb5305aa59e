"""The boundary between the model and MLX's CPU backend: which forms of the math it
computes with.

* The GPU forms, on a GPU: MLX's own ops, as every mlx-lm model uses them
  (``mx.exp``, ``mx.sigmoid``, ``nn.silu``, ``mx.softmax``,
  ``mx.fast.scaled_dot_product_attention``), fused and tuned by MLX on Metal and CUDA.
* The CPU forms, when the default device is the CPU: ``genesis_mlx.cpu``, the same
  math laid out for how MLX's CPU backend runs it.

``GENESIS_MLX_FORMS=gpu`` makes the model take the GPU forms on the CPU too (the tests
run both arrangements there); ``cpu`` or unset keeps the choice by device. The
variable is read at every decision, so a test or a process may switch it; compiled
steps are keyed by the arrangement they were traced under.
"""

import contextlib
import os

import mlx.core as mx
import mlx.nn as nn

from .errors import GenesisError

ENV_VARIABLE = "GENESIS_MLX_FORMS"
SETTINGS = ("gpu", "cpu")


def setting() -> str:
    """GENESIS_MLX_FORMS as given: "gpu", "cpu", or "" (unset)."""
    value = os.environ.get(ENV_VARIABLE, "").strip().lower()
    if value and value not in SETTINGS:
        raise GenesisError(f"{ENV_VARIABLE}={value}: use gpu (MLX's own ops on every device) "
                           f"or cpu (the forms chosen by device, as when unset)")
    return value


def cpu_forms() -> bool:
    """Whether the model takes the CPU forms: on the CPU, unless GENESIS_MLX_FORMS=gpu."""
    return setting() != "gpu" and mx.default_device() == mx.cpu


def arrangement() -> str:
    return "cpu" if cpu_forms() else "gpu"


def why_arrangement() -> str:
    """One line: which forms, and why (for ``genesis-mlx doctor``)."""
    device = "the CPU" if mx.default_device() == mx.cpu else "a GPU"
    if cpu_forms():
        return f"CPU forms (genesis_mlx.cpu): the default device is {device}"
    if setting() == "gpu" and mx.default_device() == mx.cpu:
        return f"GPU forms (MLX's own ops) on the CPU: {ENV_VARIABLE}=gpu"
    return f"GPU forms (MLX's own ops): the default device is {device}"


def traced():
    """A context for graphs that ``mx.compile`` fuses whole: the CPU forms' plain ops
    (their fused forms' float32 bit view would split the graph into more kernels)."""
    if cpu_forms():
        return cpu_math().plain_ops()
    return contextlib.nullcontext()


def cpu_math():
    from .cpu import fastmath

    return fastmath


# --- the elementwise forms the model and the plain kernels share ---

def exp(x: mx.array) -> mx.array:
    return cpu_math().exp(x) if cpu_forms() else mx.exp(x)


def sigmoid(x: mx.array) -> mx.array:
    return cpu_math().sigmoid(x) if cpu_forms() else mx.sigmoid(x)


def silu(x: mx.array) -> mx.array:
    return cpu_math().silu(x) if cpu_forms() else nn.silu(x)


def silu_gate(gate: mx.array, x: mx.array) -> mx.array:
    """x * silu(gate): SwiGLU's product and the gated norms' output."""
    return cpu_math().silu_gate(gate, x) if cpu_forms() else nn.silu(gate) * x


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    return cpu_math().softmax(x, axis=axis) if cpu_forms() else mx.softmax(x, axis=axis,
                                                                           precise=True)
