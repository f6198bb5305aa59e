"""The bench's reference worker: genesis-llm on torch, as a user's own process runs it.

``genesis-mlx bench`` starts this file as a script (``python -I reference_worker.py``)
in an environment without our BLAS preload or flags, so torch computes with its own
BLAS and threads. It imports only the standard library, numpy, torch, safetensors and
genesis, never genesis_mlx: a preloaded OpenBLAS would take over torch's own exported
``sgemm_``/``sgemv_`` and run its thread pool against torch's, which is not what
``pip install genesis-llm`` gives anyone. It prints one JSON line, ``BENCH {...}``,
which also says what the process saw (``process_environment``), so the bench and its
tests can check that it ran clean.

The MLX workers share ``prompt_ids`` and ``process_environment`` from here, so every
implementation reads the same prompt and reports the same facts.
"""

import argparse
import contextlib
import io
import json
import os
import resource
import sys
import time

import numpy as np

# Prompt length of the warm-up round.
WARMUP_TOKENS = 128

# Environment variables that belong to genesis-mlx or MLX, never to a torch user.
OUR_VARIABLE_PREFIXES = ("GENESIS_MLX_", "MLX_")


def prompt_ids(length: int, vocab: int) -> np.ndarray:
    return np.random.RandomState(0).randint(0, min(vocab, 50000), (1, length))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mapped_blas_libraries() -> list:
    """File names of the BLAS libraries (and our GEMV forwarding) mapped into this
    process: what was preloaded, or loaded since."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    names = {os.path.basename(p) for p in paths}
    return sorted(n for n in names if "blas" in n.lower() or n.startswith("gemv_forward"))


def process_environment() -> dict:
    """What a worker ran with: its LD_PRELOAD, the BLAS libraries mapped, our own
    environment variables, whether genesis_mlx was imported."""
    return {
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "blas_libraries": mapped_blas_libraries(),
        "our_variables": sorted(k for k in os.environ if k.startswith(OUR_VARIABLE_PREFIXES)),
        "genesis_mlx_imported": "genesis_mlx" in sys.modules,
    }


def timed(fn):
    tic = time.perf_counter()
    result = fn()
    return time.perf_counter() - tic, result


def time_reference_generate(model, ids, gen):
    """The loop of the reference's ``generate`` (greedy), its two parts timed apart:
    the prompt's forward with use_cache, then ``gen`` one-token steps on its cache.
    (Timing generate(1) and generate(gen + 1) and subtracting would drown the steps
    in the prompt's run-to-run noise at long contexts.) Returns both times and the
    gen + 1 tokens."""
    tic = time.perf_counter()
    logits, _, _, cache = model(ids, use_cache=True)
    tokens = [logits[:, -1:].argmax(dim=-1)]
    t_prefill = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(gen):
        logits, _, _, cache = model(tokens[-1], past_key_values=cache, use_cache=True)
        tokens.append(logits[:, -1:].argmax(dim=-1))
    return t_prefill, time.perf_counter() - tic, [int(t) for t in tokens]


def load_reference(checkpoint: str, prompt_length: int):
    from genesis import Genesis, GenesisConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(checkpoint, framework="pt") as f:
        config = GenesisConfig(**json.loads(f.metadata()["genesis_config_json"]))
    weights = load_file(checkpoint)
    config.vocab_size = weights["tok_emb.weight"].shape[0]
    # Its generate() would otherwise cut every prompt to the last block_size tokens.
    config.block_size = max(config.block_size, prompt_length)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        model = Genesis(config)
    model.load_state_dict(weights, strict=False)
    return model.eval()


def cache_sizes(model, ids):
    """Bytes of the cache after the prompt: all of it, and its attention part (FoX
    layers' K/V/cumsum; GLA layers cache a dict of fixed-size states)."""
    import torch

    total = attention = 0
    _, _, _, kv = model(ids, use_cache=True)
    for layer in kv:
        tensors = layer.values() if isinstance(layer, dict) else layer
        nbytes = sum(t.nbytes for t in tensors if torch.is_tensor(t))
        total += nbytes
        attention += 0 if isinstance(layer, dict) else nbytes
    total += sum(s.nbytes for s in getattr(model, "_segment_states", {}).values())
    return total, attention


def run_reference(args) -> dict:
    """Phase "generate": its cached generate's loop (greedy): time to the first
    token, then decoding; the process's peak memory is that of generating. Phase
    "forward": its no-cache forward over the prompt."""
    import torch

    model = load_reference(args.checkpoint, args.prompt_length)
    ids = torch.tensor(prompt_ids(args.prompt_length, model.config.vocab_size))
    prefill, decode, cache_bytes, attention_bytes = [], [], 0, 0
    with torch.no_grad():
        for rep in range(args.reps + 1):
            # PyTorch on the CPU has nothing to compile or tune: a short warm-up round
            # does its job (a full one at long contexts would cost minutes).
            x = ids if rep else ids[:, :WARMUP_TOKENS]
            if args.phase == "forward":
                t_prefill, _ = timed(lambda: model(x))
            else:
                t_prefill, t_decode, _ = time_reference_generate(model, x, args.gen)
                if rep:
                    decode.append(args.gen / t_decode)
            if rep:
                prefill.append(ids.shape[1] / t_prefill)
        if args.phase == "generate":
            cache_bytes, attention_bytes = cache_sizes(model, ids)
    return dict(prefill_tps=prefill, decode_tps=decode, cache_mb=cache_bytes / 2**20,
                attention_cache_mb=attention_bytes / 2**20, peak_mb=None,
                backend=torch_backend())


def torch_backend() -> str:
    import torch

    blas = "MKL" if torch.backends.mkl.is_available() else "its own"
    preload = os.environ.get("LD_PRELOAD")
    return (f"torch {torch.__version__} ({blas} BLAS, {torch.get_num_threads()} threads"
            f"{', LD_PRELOAD=' + preload if preload else ''})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt-length", type=int, required=True)
    p.add_argument("--gen", type=int, required=True)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--phase", choices=("generate", "forward"), default="generate")
    args = p.parse_args(argv)
    out = run_reference(args)
    out["rss_peak_mb"] = peak_rss_mb()
    out["environment"] = process_environment()
    print("BENCH " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
