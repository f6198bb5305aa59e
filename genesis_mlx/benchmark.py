"""Side-by-side speed and memory: this port, the PyTorch reference on the same
weights, and mlx-lm running a Llama of the same size. Every measurement runs in its
own fresh process (so peak memory is that process's own), and all of them in one run
on one machine, so the ratios are comparable.

    python -m genesis_mlx.benchmark worker IMPL --model DIR --prompt-length L --gen N

prints one JSON line; ``genesis-mlx bench`` drives the workers and prints the table.
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

IMPLS = ("genesis-mlx", "reference", "mlx-lm")

# SmolLM2-135M's shape: the standard Llama of Genesis-152M's size.
SMOLLM2_135M = dict(
    model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True, head_dim=64,
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prompt_ids(length: int, vocab: int) -> np.ndarray:
    return np.random.RandomState(0).randint(0, min(vocab, 50000), (1, length))


def timed(fn):
    tic = time.perf_counter()
    result = fn()
    return time.perf_counter() - tic, result


def cache_nbytes(cache) -> int:
    return sum(c.nbytes for c in cache)


def run_mlx(model, ids, gen, make_cache, reps):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    prompt = mx.array(ids)
    prefill, decode, cache_bytes = [], [], 0
    for rep in range(reps + 1):  # the first round is the warm-up
        cache = make_cache()
        t_prefill, logits = timed(lambda: mx.eval(model(prompt, cache=cache)))
        y = mx.argmax(model(prompt[:, -1:], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
        steps = generate_step(y, model, max_tokens=gen, prompt_cache=cache)
        t_decode, _ = timed(lambda: [t for t, _ in steps])
        cache_bytes = cache_nbytes(cache)
        if rep:
            prefill.append(ids.shape[1] / t_prefill)
            decode.append(gen / t_decode)
    return dict(prefill_tps=prefill, decode_tps=decode, cache_mb=cache_bytes / 2**20,
                peak_mb=mx.get_peak_memory() / 2**20)


def worker_genesis(args):
    import mlx.core as mx

    from .loading import load_model_only

    model = load_model_only(args.model)
    ids = prompt_ids(args.prompt_length, model.args.vocab_size)
    out = run_mlx(model, ids, args.gen, model.make_cache, args.reps)
    out["backend"] = str(mx.default_device())
    return out


def worker_mlx_lm(args):
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    model = llama.Model(llama.ModelArgs.from_dict(SMOLLM2_135M))
    mx.eval(model.parameters())
    ids = prompt_ids(args.prompt_length, SMOLLM2_135M["vocab_size"])
    out = run_mlx(model, ids, args.gen, lambda: make_prompt_cache(model), args.reps)
    out["backend"] = str(mx.default_device())
    return out


def worker_reference(args):
    """The reference on the same weights: its no-cache forward for prefill, its
    cached generate (top_k=1) for decoding."""
    import contextlib
    import io

    import torch
    from genesis import Genesis, GenesisConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads) if args.threads else None
    with safe_open(args.checkpoint, framework="pt") as f:
        config = GenesisConfig(**json.loads(f.metadata()["genesis_config_json"]))
    config.vocab_size = load_file(args.checkpoint)["tok_emb.weight"].shape[0]
    # Its generate() would otherwise cut every prompt to the last block_size tokens.
    config.block_size = max(config.block_size, args.prompt_length)
    with contextlib.redirect_stdout(io.StringIO()):
        model = Genesis(config)
    model.load_state_dict(load_file(args.checkpoint), strict=False)
    model.eval()
    ids = torch.tensor(prompt_ids(args.prompt_length, config.vocab_size))
    prefill, decode, cache_bytes = [], [], 0
    with torch.no_grad():
        for rep in range(args.reps + 1):
            t_prefill, _ = timed(lambda: model(ids))
            t_one, _ = timed(lambda: model.generate(ids, max_new_tokens=1, top_k=1))
            t_all, _ = timed(lambda: model.generate(ids, max_new_tokens=args.gen + 1, top_k=1))
            if rep:
                prefill.append(ids.shape[1] / t_prefill)
                decode.append(args.gen / max(t_all - t_one, 1e-9))
        _, _, _, kv = model(ids, use_cache=True)
        for layer in kv:
            tensors = layer.values() if isinstance(layer, dict) else layer
            cache_bytes += sum(t.nbytes for t in tensors if torch.is_tensor(t))
        cache_bytes += sum(s.nbytes for s in getattr(model, "_segment_states", {}).values())
    return dict(prefill_tps=prefill, decode_tps=decode, cache_mb=cache_bytes / 2**20,
                peak_mb=None, backend=f"torch {torch.__version__} cpu")


WORKERS = {"genesis-mlx": worker_genesis, "reference": worker_reference, "mlx-lm": worker_mlx_lm}


def worker_main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("impl", choices=IMPLS)
    p.add_argument("--model")
    p.add_argument("--checkpoint")
    p.add_argument("--prompt-length", type=int)
    p.add_argument("--gen", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    out = WORKERS[args.impl](args)
    out["rss_peak_mb"] = peak_rss_mb()
    print("BENCH " + json.dumps(out))


def run_worker(impl, model_dir, checkpoint, length, gen, reps):
    cmd = [sys.executable, "-m", "genesis_mlx.benchmark", "worker", impl, "--model",
           str(model_dir), "--checkpoint", str(checkpoint), "--prompt-length", str(length),
           "--gen", str(gen), "--reps", str(reps)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in result.stdout.splitlines() if l.startswith("BENCH ")]
    if result.returncode or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:200]}
    return json.loads(lines[-1][6:])


def summarize(values):
    return {"min": min(values), "median": statistics.median(values)} if values else None


def machine_line(backends):
    return (f"{platform.system()} {platform.machine()}, {platform.processor() or 'cpu'}; "
            f"backends: {', '.join(sorted(set(backends)))}")


def format_table(results, lengths):
    rows = ["| impl | context | prefill tok/s (median) | decode tok/s (median) | cache MB | peak RSS MB |",
            "|---|---|---|---|---|---|"]
    for impl in results:
        for L in lengths:
            r = results[impl].get(L, {})
            if "error" in r:
                rows.append(f"| {impl} | {L} | error: {r['error']} | | | |")
                continue
            rows.append(f"| {impl} | {L} | {r['prefill']['median']:.1f} | "
                        f"{r['decode']['median']:.1f} | {r['cache_mb']:.2f} | {r['rss_peak_mb']:.0f} |")
    return "\n".join(rows)


def ratio_lines(results, lengths):
    lines = []
    ours = results.get("genesis-mlx", {})
    for other in ("reference", "mlx-lm"):
        for L in lengths:
            a, b = ours.get(L, {}), results.get(other, {}).get(L, {})
            if not a or not b or "error" in a or "error" in b:
                continue
            lines.append(
                f"vs {other} at {L}: decode x{a['decode']['median'] / b['decode']['median']:.2f}, "
                f"prefill x{a['prefill']['median'] / b['prefill']['median']:.2f}, "
                f"cache {a['cache_mb'] / max(b['cache_mb'], 1e-9):.2f} of theirs, "
                f"peak RSS {a['rss_peak_mb'] / b['rss_peak_mb']:.2f} of theirs")
    return lines


def bench(model: str, lengths, gen: int, reps: int, compare, json_out=None, work=None):
    import tempfile

    from .conversion.convert import convert
    from .conversion.reference_format import GENESIS_152M, write_reference_checkpoint
    from .conversion.checkpoint import resolve_source

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp)
        if model == "random":
            checkpoint = write_reference_checkpoint(work / "genesis-152m-random.safetensors",
                                                    GENESIS_152M)
            model_dir = convert(str(checkpoint), str(work / "mlx"), force=True,
                                with_tokenizer=False)
        else:  # a reference checkpoint: the reference needs the raw file
            checkpoint = resolve_source(model)
            model_dir = convert(str(checkpoint), str(work / "mlx"), force=True,
                                with_tokenizer=False)
        results = {}
        for impl in ["genesis-mlx", *compare]:
            results[impl] = {}
            for L in lengths:
                r = run_worker(impl, model_dir, checkpoint, L, gen, reps)
                if "error" not in r:
                    r = dict(r, prefill=summarize(r.pop("prefill_tps")),
                             decode=summarize(r.pop("decode_tps")))
                results[impl][L] = r
                print(f"[bench] {impl} @ {L}: {json.dumps(r)}", flush=True)
    backends = [r.get("backend", "?") for v in results.values() for r in v.values()]
    report = {"machine": machine_line(backends), "gen": gen, "reps": reps, "results": results}
    print(f"\nMachine: {report['machine']}; {gen} generated tokens, {reps} reps (+1 warm-up)")
    print(format_table(results, lengths))
    for line in ratio_lines(results, lengths):
        print(line)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
