"""What importing the package does, and the thin entry points."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset,want", [(None, "0"), ("1", "1")])
def test_import_keeps_float32_matmuls_unless_told_otherwise(preset, want):
    """MLX runs float32 matmuls as TF32 on GPUs that have it unless MLX_ENABLE_TF32=0,
    which breaks parity with the reference: the package sets it, a user's value wins."""
    env = {k: v for k, v in os.environ.items() if k != "MLX_ENABLE_TF32"}
    if preset is not None:
        env["MLX_ENABLE_TF32"] = preset
    code = "import os, genesis_mlx; print(os.environ['MLX_ENABLE_TF32'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == want


def test_convert_py_is_genesis_mlx_convert(reference_checkpoint, tokenizer_path, tmp_path):
    _, path = reference_checkpoint(vocab_size=50279)  # the tokenizer's vocabulary
    out = tmp_path / "converted"
    result = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--hf-path", str(path),
                             "--mlx-path", str(out), "--tokenizer", tokenizer_path],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    bad = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--hf-path",
                          str(tmp_path / "missing.safetensors"), "--mlx-path", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
