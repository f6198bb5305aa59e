"""A GPU kernel's first use, checked, so that a kernel that does not compile on the
user's GPU, or computes something else there, costs speed and never a crash or
wrong logits.

Each kernel declares a guard: how to run it, its ops twin (the plain MLX math it
must reproduce) and a probe (small inputs with the call's heads and head dims, so
the probe compiles the template the call will use). The first time the dispatch
would use the kernel for a (backend, dtype) in a process, ``usable`` runs the probe
through both and compares them; an exception or a mismatch disables the kernel on
that backend for the process, prints one warning line on stderr naming the kernel
and ``genesis-mlx doctor``, and the dispatch takes the ops path for that call and
every later one. After the first use, a call costs one dictionary lookup.

Under ``mx.compile`` (the GPU decode step traces the GLA layer, kernel included) the
probe runs all the same: its inputs are made from host data, not from the traced
arrays, and MLX evaluates arrays that do not depend on the trace's inputs; whichever
path the verdict picks is what gets traced.
"""

import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from .launcher import first_error_line

# Relative error allowed (max |kernel - twin| / max |twin|), as tests/test_kernels.py.
# bf16/fp16 inputs get the same bound: the kernels and the twins both read the same
# rounded inputs and compute in fp32, so only the fp32 summation order differs.
TOLERANCE = 1e-5

_registry: Dict[str, "KernelGuard"] = {}


@dataclass
class Check:
    """A kernel against its twin: ``error`` the max relative difference (None when the
    kernel raised), ``reason`` one line saying why it failed ("" when ok)."""
    ok: bool
    error: Optional[float]
    reason: str = ""


def relative_error(want, got) -> float:
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    if want.shape != got.shape:
        return float("inf")
    if not np.isfinite(got).all():
        return float("nan")
    return float(np.abs(want - got).max() / max(np.abs(want).max(), 1e-6))


def as_tuple(outputs) -> tuple:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


class KernelGuard:
    """``run(backend, *inputs)``: the kernel; ``twin(*inputs)``: its ops twin;
    ``probe(dtype, dims)``: small inputs for a call of this dtype whose heads and head
    dims are ``dims`` (the tuple the dispatch passes to ``usable``)."""

    def __init__(self, title: str, run: Callable, twin: Callable,
                 probe: Callable[[mx.Dtype, tuple], tuple]):
        self.title, self.run, self.twin, self.probe = title, run, twin, probe
        self.lock = threading.Lock()
        self.reset()
        _registry[title] = self

    def reset(self) -> None:
        """Forgets every verdict (tests)."""
        self.verdicts: Dict[Tuple[str, mx.Dtype], Check] = {}
        self.disabled: Dict[str, Check] = {}
        self.warned = False

    def usable(self, backend: str, dtype: mx.Dtype, dims: tuple) -> bool:
        """Whether the dispatch may call the kernel (probes it on first use)."""
        verdict = self.verdicts.get((backend, dtype))
        if verdict is None:
            verdict = self.first_use(backend, dtype, dims)
        return verdict.ok and backend not in self.disabled

    def first_use(self, backend: str, dtype: mx.Dtype, dims: tuple) -> Check:
        with self.lock:  # generation may run in several threads (a server)
            verdict = self.verdicts.get((backend, dtype))
            if verdict is None:
                verdict = self.compare(backend, self.probe(dtype, dims))
                self.verdicts[(backend, dtype)] = verdict
                if not verdict.ok:
                    self.disable(backend, dtype, verdict)
        return verdict

    def compare(self, backend: str, inputs: tuple) -> Check:
        """The kernel against its twin on ``inputs``. The twin runs on the CPU, whose
        fp32 matmuls are exact fp32 whatever MLX_ENABLE_TF32 says about the GPU's."""
        try:
            got = as_tuple(self.run(backend, *inputs))
            mx.eval(got)
        except Exception as e:  # any failure to build or launch means: not usable
            return Check(False, None, first_error_line(str(e)) if str(e).strip()
                         else type(e).__name__)
        with mx.stream(mx.cpu):
            want = as_tuple(self.twin(*inputs))
            mx.eval(want)
        error = max(relative_error(w, g) for w, g in zip(want, got))
        if not error <= TOLERANCE:  # NaN fails too
            return Check(False, error, f"differs from the ops path by {error:.1e} "
                                       f"(relative; allowed {TOLERANCE:.0e})")
        return Check(True, error)

    def disable(self, backend: str, dtype: mx.Dtype, verdict: Check) -> None:
        self.disabled.setdefault(backend, verdict)
        if not self.warned:
            self.warned = True
            print(f"genesis-mlx: the {self.title} kernel failed its check on {backend} "
                  f"({str(dtype).split('.')[-1]}): {verdict.reason}; using the ops path "
                  f"instead (slower, same results). Please run 'genesis-mlx doctor' and "
                  f"attach its report to a bug report.", file=sys.stderr, flush=True)

    def state(self, backend: str) -> str:
        """"disabled: why", "checked" or "not checked yet" on ``backend``."""
        if backend in self.disabled:
            return f"disabled: {self.disabled[backend].reason}"
        checked = any(b == backend for b, _ in self.verdicts)
        return "checked" if checked else "not checked yet"


def guards() -> Dict[str, KernelGuard]:
    """Every kernel's guard by title."""
    return dict(_registry)


def probe_array(rng: np.random.RandomState, shape, dtype=mx.float32, scale=1.0) -> mx.array:
    """Host-made random data (not an MLX random op: under mx.compile the probe must
    not depend on anything traced, the global random key included)."""
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)
