"""The OpenBLAS preload: automatic when a system OpenBLAS exists, off on request,
and numerically equivalent to the reference BLAS path; the GEMV forwarding in front
of it computes every sgemm call it takes over as sgemm does."""

import os
import subprocess
import sys

import numpy as np
import pytest

from genesis_mlx.cpu.blas import build_gemv_forward, find_openblas

# Every operand layout of a row-major sgemm with M = 1 (which the forwarding turns
# into GEMV), and M = 2 / N = 1 (which it passes on), through the process's global
# cblas_sgemm: the forwarding's when it is preloaded.
SGEMM_CASES = """
import ctypes, numpy as np
from genesis_mlx.cpu.blas import gemv_forwarding
assert gemv_forwarding()
sgemm = ctypes.CDLL(None).cblas_sgemm
f, i, P = ctypes.c_float, ctypes.c_int, ctypes.c_void_p
sgemm.argtypes = [i] * 6 + [f, P, i, P, i, f, P, i]
rng = np.random.default_rng(0)
worst = 0.0
for m, n, k in [(1, 37, 19), (1, 1440, 576), (2, 37, 19), (3, 1, 5), (1, 1, 9)]:
    for trans_a in (111, 112):
        for trans_b in (111, 112):
            for alpha, beta in [(1.0, 0.0), (0.5, 2.0)]:
                pad = 3  # leading dimensions larger than the rows
                a = rng.standard_normal((m, k) if trans_a == 111 else (k, m)).astype(np.float32)
                b = rng.standard_normal((k, n) if trans_b == 111 else (n, k)).astype(np.float32)
                a_buf = np.zeros((a.shape[0], a.shape[1] + pad), np.float32)
                b_buf = np.zeros((b.shape[0], b.shape[1] + pad), np.float32)
                a_buf[:, : a.shape[1]], b_buf[:, : b.shape[1]] = a, b
                c0 = rng.standard_normal((m, n)).astype(np.float32)
                c_buf = np.zeros((m, n + pad), np.float32)
                c_buf[:, :n] = c0
                sgemm(101, trans_a, trans_b, m, n, k, alpha, a_buf.ctypes.data, a_buf.shape[1],
                      b_buf.ctypes.data, b_buf.shape[1], beta, c_buf.ctypes.data, c_buf.shape[1])
                op_a = (a if trans_a == 111 else a.T).astype(np.float64)
                op_b = (b if trans_b == 111 else b.T).astype(np.float64)
                want = alpha * op_a @ op_b + beta * c0.astype(np.float64)
                # k products summed in any order, scaled and added to beta c: within
                # gamma(k + 2) = (k + 2) u / (1 - (k + 2) u) of the terms' magnitudes
                # (Higham, Accuracy and Stability of Numerical Algorithms, 3.1, 3.5).
                u = 2.0 ** -24
                gamma = (k + 2) * u / (1 - (k + 2) * u)
                bound = gamma * (abs(alpha) * np.abs(op_a) @ np.abs(op_b) + abs(beta) * np.abs(c0))
                err = np.abs(c_buf[:, :n] - want)
                assert (err <= bound).all(), (m, n, k, trans_a, trans_b, alpha, beta, err.max())
                assert not c_buf[:, n:].any(), "wrote past the row"
                worst = max(worst, (err / np.maximum(bound, 1e-300)).max())
print("ok", worst)
"""

LOGITS = """
import sys, numpy as np, mlx.core as mx
sys.path.insert(0, {tests!r})
from conftest import mlx_model
from genesis_mlx.cpu.blas import loaded_blas, gemv_forwarding
model = mlx_model({path!r})
ids = np.random.RandomState(0).randint(0, 512, (1, 80))
# The whole prompt (matrix products) and one decoding step (vector products).
cache = model.make_cache()
logits = [model(mx.array(ids[:, :-1]), cache=cache), model(mx.array(ids[:, -1:]), cache=cache)]
np.save({out!r}, np.array(mx.concatenate(logits, axis=1)))
print(loaded_blas() + ("+gemv" if gemv_forwarding() else ""))
"""


def info(**env):
    result = subprocess.run([sys.executable, "-m", "genesis_mlx", "info"], capture_output=True,
                            text=True, env=dict(os.environ, **env), timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def blas_line(**env):
    return [l for l in info(**env).splitlines() if l.startswith("blas:")][0]


@pytest.fixture(scope="module")
def gemv_preload():
    """LD_PRELOAD for OpenBLAS with the forwarding in front. CI installs OpenBLAS
    (.ci/run) and has a C compiler: without them these tests would compare the
    reference BLAS with itself, so they fail instead."""
    library = find_openblas()
    assert library, "no system OpenBLAS: apt install libopenblas0-pthread"
    forward = build_gemv_forward()
    assert forward, "the GEMV forwarding did not build (no C compiler?)"
    return f"{forward}:{library}"


def test_cli_preloads_openblas_and_the_forwarding(gemv_preload):
    assert blas_line().startswith("blas: openblas + gemv forwarding")
    assert blas_line(GENESIS_MLX_GEMV="off").startswith("blas: openblas (")
    assert blas_line(GENESIS_MLX_BLAS="off").startswith("blas: reference")


def test_the_openblas_library_can_be_chosen(gemv_preload, tmp_path):
    """GENESIS_MLX_OPENBLAS names the library to preload (here a copy of the system's,
    under another name); a path that does not exist is passed over."""
    import shutil

    chosen = tmp_path / "libopenblas-chosen.so.0"
    shutil.copy(find_openblas(), chosen)
    preload = [l for l in info(GENESIS_MLX_OPENBLAS=str(chosen)).splitlines()
               if l.startswith("preload:")]
    assert preload and preload[0].endswith(f":{chosen}"), preload
    fallback = [l for l in info(GENESIS_MLX_OPENBLAS=str(tmp_path / "missing.so")).splitlines()
                if l.startswith("preload:")]
    assert fallback and fallback[0].endswith(f":{find_openblas()}"), fallback


def test_gemv_forwarding_computes_what_sgemm_computes(gemv_preload):
    result = subprocess.run([sys.executable, "-c", SGEMM_CASES], capture_output=True,
                            text=True, env=dict(os.environ, LD_PRELOAD=gemv_preload), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_openblas_gives_the_same_logits(reference_checkpoint, tmp_path, gemv_preload):
    from conftest import logits_tolerance

    ref, path = reference_checkpoint()
    outputs = {}
    configs = [("reference", None), ("openblas", find_openblas()), ("openblas+gemv", gemv_preload)]
    for name, preload in configs:
        env = dict(os.environ)
        env.pop("LD_PRELOAD", None)
        if preload:
            env["LD_PRELOAD"] = preload
        out = tmp_path / f"{name}.npy"
        code = LOGITS.format(tests=os.path.dirname(__file__), path=str(path), out=str(out))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == name
        outputs[name] = np.load(out)
    a = outputs["reference"]
    tol = logits_tolerance(ref, np.random.RandomState(0).randint(0, 512, (1, 80)))  # LOGITS' ids
    for name, b in outputs.items():
        assert np.abs(a - b).max() <= tol, name


def test_an_openblas_bundled_by_numpy_is_not_taken_for_the_preload(monkeypatch):
    """numpy 1.x's wheels map an OpenBLAS of their own (numpy.libs/libopenblas64_...),
    which MLX does not compute with."""
    from genesis_mlx.cpu import blas

    bundled = ("7f00-7f10 r-xp 0 08:01 1 /venv/lib/python3.11/site-packages/numpy.libs/"
               "libopenblas64_p-r0-15028c96.3.21.so\n")
    system = "7f20-7f30 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libopenblas.so.0\n"
    monkeypatch.setattr(blas, "mapped_libraries", lambda: bundled)
    assert blas.loaded_blas() == "reference"
    monkeypatch.setattr(blas, "mapped_libraries", lambda: bundled + system)
    assert blas.loaded_blas() == "openblas"
