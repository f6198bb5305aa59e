"""How the bench starts each worker: its command line and the environment its own
users would run it in.

The ``genesis-mlx`` command re-executes itself with OpenBLAS and the GEMV forwarding
preloaded (``genesis_mlx.cpu.blas``), so the bench's own process carries that preload and
our flags. A child inherits both unless told otherwise, and a preloaded OpenBLAS
takes over torch's exported BLAS symbols: the reference would then compute with
another BLAS, its threads against torch's. So the reference runs as a torch user's
process (no preload, none of our variables, ``python -I`` on a script that does not
import genesis_mlx), and the MLX workers, ours and mlx-lm's, get one environment
between them, built here, whichever process started the bench.
"""

import os
import sys
from pathlib import Path
from typing import List, Mapping

from ..cpu.blas import CHILD_FLAG, command_preload
from .reference_worker import OUR_VARIABLE_PREFIXES

REFERENCE_WORKER = Path(__file__).with_name("reference_worker.py")


def reference_environment(env: Mapping[str, str]) -> dict:
    """A torch user's environment: no LD_PRELOAD, no genesis-mlx or MLX variables."""
    return {k: v for k, v in env.items()
            if k != "LD_PRELOAD" and not k.startswith(OUR_VARIABLE_PREFIXES)}


def is_gemv_forwarding(path: str) -> bool:
    return os.path.basename(path).startswith("gemv_forward-")


def mlx_environment(env: Mapping[str, str]) -> dict:
    """The environment of every MLX worker: the ``genesis-mlx`` command's preload in
    front of the user's own, so ours and mlx-lm's Llama compute with the same BLAS
    whether the bench was started by the command or from Python."""
    ours = command_preload()
    theirs = [p for p in env.get("LD_PRELOAD", "").split(":")
              if p and p not in ours and not is_gemv_forwarding(p)]
    out = {k: v for k, v in env.items() if k not in ("LD_PRELOAD", CHILD_FLAG)}
    if ours or theirs:
        out["LD_PRELOAD"] = ":".join([*ours, *theirs])
    return out


def worker_environment(impl: str, env: Mapping[str, str] = None) -> dict:
    env = os.environ if env is None else env
    return reference_environment(env) if impl == "reference" else mlx_environment(env)


def reference_command(arguments: List[str]) -> List[str]:
    """The reference worker as a plain script: -I keeps PYTHON* variables, the user
    site and the script's directory out (it imports nothing of ours)."""
    return [sys.executable, "-I", str(REFERENCE_WORKER), *arguments]


def worker_command(impl, model_dir, checkpoint, length, gen, reps, phase="generate",
                   dtype="float32"):
    """The reference runs as its users run it, in float32; the MLX workers in ``dtype``."""
    common = ["--prompt-length", str(length), "--gen", str(gen), "--reps", str(reps)]
    if impl == "reference":
        return reference_command(["--checkpoint", str(checkpoint), *common, "--phase", phase])
    return [sys.executable, "-m", "genesis_mlx.benchmark", "worker", impl,
            "--model", str(model_dir), "--dtype", dtype, *common]
