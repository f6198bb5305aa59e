"""The bench's MLX workers: this port (exact and 8-bit FoX cache) and mlx-lm running
a Llama of the same size, each timed through the token loop its users' generate runs
(``generation.steps.generate_step`` here, mlx-lm's ``generate_step`` there). The bench
starts them with one environment, so both compute with the same BLAS (see
``environments.mlx_environment``)."""

import argparse
import json

from .reference_worker import peak_rss_mb, process_environment, prompt_ids, timed

# SmolLM2-135M's shape: the standard Llama of Genesis-152M's size.
SMOLLM2_135M = dict(
    model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True, head_dim=64,
)

# mlx-lm's own default prefill step, for its Llama.
MLX_LM_PREFILL_STEP = 2048


def cache_nbytes(cache) -> int:
    return sum(c.nbytes for c in cache)


def attention_cache_nbytes(cache) -> int:
    """The part of the cache that grows with the context: FoX K/V/cumsum here,
    every KVCache in mlx-lm's Llama."""
    from mlx_lm.models.cache import KVCache

    from ..model.cache import FoxCache

    return sum(c.nbytes for c in cache if isinstance(c, (FoxCache, KVCache)))


def run_mlx(model, ids, gen, make_cache, reps, generate_step, prefill_step):
    """Times a token loop as a user's generate runs it: prefill = time to the first
    token (the prompt read in pieces of ``prefill_step``); decode = the ``gen`` tokens
    after the second. From the second token on, either loop runs one decoding step a
    token; before it, mlx-lm's runs two steps ahead of its first token and ours the
    one that feeds the first token after it."""
    import mlx.core as mx

    prompt = mx.array(ids[0])
    prefill, decode, cache_bytes, attention_bytes = [], [], 0, 0
    for rep in range(reps + 1):  # the first round is the warm-up
        cache = make_cache()
        steps = generate_step(prompt, model, max_tokens=gen + 2, prompt_cache=cache,
                              prefill_step_size=prefill_step)
        t_first, _ = timed(lambda: next(steps))
        # The cache holds the prompt now, as the reference's after its forward.
        cache_bytes, attention_bytes = cache_nbytes(cache), attention_cache_nbytes(cache)
        next(steps)
        t_decode, n_decoded = timed(lambda: len([t for t, _ in steps]))
        assert n_decoded == gen
        if rep:
            prefill.append(ids.shape[1] / t_first)
            decode.append(gen / t_decode)
    return dict(prefill_tps=prefill, decode_tps=decode, cache_mb=cache_bytes / 2**20,
                attention_cache_mb=attention_bytes / 2**20, peak_mb=mx.get_peak_memory() / 2**20)


def worker_genesis(args):
    from ..generation.steps import PREFILL_STEP, generate_step
    from ..loading import load_model_only

    model = load_model_only(args.model)
    ids = prompt_ids(args.prompt_length, model.args.vocab_size)
    kv_bits = 8 if args.impl == "genesis-mlx-kv8" else None
    return run_mlx(model, ids, args.gen, lambda: model.make_cache(kv_bits), args.reps,
                   generate_step, PREFILL_STEP)


def worker_mlx_lm(args):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    model = llama.Model(llama.ModelArgs.from_dict(SMOLLM2_135M))
    model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    ids = prompt_ids(args.prompt_length, SMOLLM2_135M["vocab_size"])
    return run_mlx(model, ids, args.gen, lambda: make_prompt_cache(model), args.reps,
                   generate_step, MLX_LM_PREFILL_STEP)


def mlx_backend() -> str:
    import mlx.core as mx

    from ..cpu.blas import describe

    if mx.default_device() == mx.cpu:
        return f"mlx {mx.__version__} cpu ({describe()} BLAS)"
    return f"mlx {mx.__version__} {'metal' if mx.metal.is_available() else 'cuda'}"


WORKERS = {"genesis-mlx": worker_genesis, "genesis-mlx-kv8": worker_genesis,
           "mlx-lm": worker_mlx_lm}


def main(argv):
    p = argparse.ArgumentParser(prog="python -m genesis_mlx.benchmark worker")
    p.add_argument("impl", choices=sorted(WORKERS))
    p.add_argument("--model")
    p.add_argument("--prompt-length", type=int, required=True)
    p.add_argument("--gen", type=int, required=True)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="the Llama's weights (ours: as converted)")
    args = p.parse_args(argv)
    out = WORKERS[args.impl](args)
    out["backend"] = f"{mlx_backend()}, {args.dtype}"
    out["rss_peak_mb"] = peak_rss_mb()
    out["environment"] = process_environment()
    print("BENCH " + json.dumps(out), flush=True)
