"""Side-by-side speed and memory: this port, the PyTorch reference on the same
weights, and mlx-lm running a Llama of the same size. Every measurement runs in its
own fresh process (so peak memory is that process's own), each in the environment
its users would run it in (``environments``), and all of them in one run on one
machine, so the ratios are comparable.

    python -m genesis_mlx.benchmark worker IMPL --model DIR --checkpoint FILE \\
        --prompt-length L --gen N

prints one JSON line; ``genesis-mlx bench`` drives the workers and prints the table.
"""

from .driver import IMPLS, bench, measure, measure_rounds, run_worker
from .reference_worker import prompt_ids, time_reference_generate

__all__ = ["IMPLS", "bench", "measure", "measure_rounds", "prompt_ids", "run_worker",
           "time_reference_generate"]
