"""The OpenBLAS preload: automatic when a system OpenBLAS exists, off on request,
and numerically equivalent to the reference BLAS path."""

import os
import subprocess
import sys

import numpy as np

from genesis_mlx.blas import find_openblas

LOGITS = """
import sys, numpy as np, mlx.core as mx
sys.path.insert(0, {tests!r})
from test_parity import mlx_model
from genesis_mlx.blas import loaded_blas
model = mlx_model({path!r})
ids = np.random.RandomState(0).randint(0, 512, (1, 80))
np.save({out!r}, np.array(model(mx.array(ids))))
print(loaded_blas())
"""


def info(**env):
    result = subprocess.run([sys.executable, "-m", "genesis_mlx", "info"], capture_output=True,
                            text=True, env=dict(os.environ, **env), timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_preloads_openblas_when_present():
    line = [l for l in info().splitlines() if l.startswith("blas:")][0]
    if find_openblas():
        assert line.startswith("blas: openblas")
    else:  # nothing to preload: the CLI says what to install
        assert "apt install libopenblas0-pthread" in line
    assert info(GENESIS_MLX_BLAS="off").splitlines()[-1].startswith("blas: reference")


def test_openblas_gives_the_same_logits(reference_checkpoint, tmp_path):
    library = find_openblas()
    _, path = reference_checkpoint()
    outputs = {}
    for name, preload in [("reference", None), ("openblas", library)]:
        if name == "openblas" and library is None:
            continue
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
    if len(outputs) == 2:
        a, b = outputs["reference"], outputs["openblas"]
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())
