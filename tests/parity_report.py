"""Logit distances at the real model's shape over long sequences (too slow for the
test suite): this port and the reference in float32, and a float64 run of the
reference as the yardstick for float32 rounding. The README's "Long sequences"
figures come from

    LD_PRELOAD=... python tests/parity_report.py --lengths 2048,4096

(the preload line of ``genesis-mlx info``; needs the test dependencies).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402
from genesis_mlx.conversion.checkpoint import load_reference_checkpoint  # noqa: E402
from genesis_mlx.conversion.reference_format import GENESIS_152M  # noqa: E402
from genesis_mlx.model.genesis import Model  # noqa: E402


def real_shape_pair(directory: Path, seed: int):
    config = {k: v for k, v in GENESIS_152M.items() if k != "head_dim"}
    ref = R.build_reference(R.make_config(**config), seed, noise=0.02)
    args, weights = load_reference_checkpoint(
        R.save_reference_checkpoint(ref, directory / "genesis.safetensors"))
    ours = Model(args)
    ours.load_weights(list(weights.items()))
    return ref, ours.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours = real_shape_pair(Path(tmp), options.seed)
        print("tokens | max|logit| | ours vs ref fp32 | ref fp32 vs ref fp64 | ours vs ref fp64")
        for T in map(int, options.lengths.split(",")):
            ids = np.random.RandomState(options.seed + 1).randint(0, 50000, (1, T))
            ref32 = R.reference_logits(ref, ids)
            ref64 = R.reference_logits_float64(ref, ids)
            got = np.array(ours(mx.array(ids)))
            print(f"{T} | {np.abs(ref32).max():.2f} | {distance(got, ref32):.2e} | "
                  f"{distance(ref32, ref64):.2e} | {distance(got, ref64):.2e}", flush=True)


def distance(a, b):
    return float(np.abs(a - b).max())


if __name__ == "__main__":
    main()
