"""Side-by-side speed and memory: this port, the PyTorch reference on the same
weights, and mlx-lm running a Llama of the same size. Every measurement runs in its
own fresh process (so peak memory is that process's own), and all of them in one run
on one machine, so the ratios are comparable.

    python -m genesis_mlx.benchmark worker IMPL --model DIR --prompt-length L --gen N

prints one JSON line; ``genesis-mlx bench`` drives the workers and prints the table.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

IMPLS = ("genesis-mlx", "genesis-mlx-kv8", "reference", "mlx-lm")
OURS = ("genesis-mlx", "genesis-mlx-kv8")  # exact, and with the 8-bit FoX K/V cache

# SmolLM2-135M's shape: the standard Llama of Genesis-152M's size.
SMOLLM2_135M = dict(
    model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True, head_dim=64,
)


# Prompt length of the reference's warm-up round.
WARMUP_TOKENS = 128


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


def attention_cache_nbytes(cache) -> int:
    """The part of the cache that grows with the context: FoX K/V/cumsum here,
    every KVCache in mlx-lm's Llama."""
    from mlx_lm.models.cache import KVCache

    from .model.cache import FoxCache

    return sum(c.nbytes for c in cache if isinstance(c, (FoxCache, KVCache)))


def run_mlx(model, ids, gen, make_cache, reps, prefill_step):
    """Times mlx-lm's generate_step as a user's generate runs it: prefill = time to
    the first token (the prompt read in pieces of ``prefill_step``, plus one step),
    decode = the ``gen`` tokens after it."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    prompt = mx.array(ids[0])
    prefill, decode, cache_bytes = [], [], 0
    for rep in range(reps + 1):  # the first round is the warm-up
        cache = make_cache()
        steps = generate_step(prompt, model, max_tokens=gen + 1, prompt_cache=cache,
                              prefill_step_size=prefill_step)
        t_first, _ = timed(lambda: next(steps))
        # The cache holds the prompt now, as the reference's after its forward.
        cache_bytes, attention_bytes = cache_nbytes(cache), attention_cache_nbytes(cache)
        t_decode, _ = timed(lambda: [t for t, _ in steps])
        if rep:
            prefill.append(ids.shape[1] / t_first)
            decode.append(gen / t_decode)
    return dict(prefill_tps=prefill, decode_tps=decode, cache_mb=cache_bytes / 2**20,
                attention_cache_mb=attention_bytes / 2**20, peak_mb=mx.get_peak_memory() / 2**20)


def worker_genesis(args):
    from .generation.generate import PREFILL_STEP
    from .loading import load_model_only

    model = load_model_only(args.model)
    ids = prompt_ids(args.prompt_length, model.args.vocab_size)
    kv_bits = 8 if args.impl == "genesis-mlx-kv8" else None
    out = run_mlx(model, ids, args.gen, lambda: model.make_cache(kv_bits), args.reps,
                  PREFILL_STEP)
    out["backend"] = mlx_backend()
    return out


def mlx_backend() -> str:
    import mlx.core as mx

    from .blas import describe

    device = mx.default_device()
    if device == mx.cpu:
        return f"mlx {mx.__version__} cpu ({describe()} BLAS)"
    return f"mlx {mx.__version__} {'metal' if mx.metal.is_available() else 'cuda'}"


def worker_mlx_lm(args):
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    model = llama.Model(llama.ModelArgs.from_dict(SMOLLM2_135M))
    mx.eval(model.parameters())
    ids = prompt_ids(args.prompt_length, SMOLLM2_135M["vocab_size"])
    # mlx-lm's own default prefill step.
    out = run_mlx(model, ids, args.gen, lambda: make_prompt_cache(model), args.reps, 2048)
    out["backend"] = mlx_backend()
    return out


def time_reference_generate(model, ids, gen):
    """The loop of the reference's ``generate`` (greedy), its two parts timed apart:
    the prompt's forward with use_cache, then ``gen`` one-token steps on its cache.
    (Timing generate(1) and generate(gen + 1) and subtracting drowns the steps in the
    prompt's run-to-run noise at long contexts: it came out negative at 8192.)
    Returns both times and the gen + 1 tokens."""
    tic = time.perf_counter()
    logits, _, _, cache = model(ids, use_cache=True)
    tokens = [logits[:, -1:].argmax(dim=-1)]
    t_prefill = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(gen):
        logits, _, _, cache = model(tokens[-1], past_key_values=cache, use_cache=True)
        tokens.append(logits[:, -1:].argmax(dim=-1))
    return t_prefill, time.perf_counter() - tic, [int(t) for t in tokens]


def worker_reference(args):
    """The reference on the same weights. Phase "generate": its cached generate's loop
    (greedy): time to the first token, then decoding; the process's peak memory is
    that of generating. Phase "forward": its no-cache forward over the prompt."""
    import contextlib
    import io

    import torch
    from genesis import Genesis, GenesisConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads) if args.threads else None
    with safe_open(args.checkpoint, framework="pt") as f:
        config = GenesisConfig(**json.loads(f.metadata()["genesis_config_json"]))
    weights = load_file(args.checkpoint)
    config.vocab_size = weights["tok_emb.weight"].shape[0]
    # Its generate() would otherwise cut every prompt to the last block_size tokens.
    config.block_size = max(config.block_size, args.prompt_length)
    with contextlib.redirect_stdout(io.StringIO()):
        model = Genesis(config)
    model.load_state_dict(weights, strict=False)
    del weights
    model.eval()
    ids = torch.tensor(prompt_ids(args.prompt_length, config.vocab_size))
    prefill, decode, cache_bytes, attention_bytes = [], [], 0, 0
    with torch.no_grad():
        for rep in range(args.reps + 1):
            # PyTorch on the CPU has nothing to compile or tune: a short warm-up round
            # does its job (a full one at 8192 tokens costs ~15 minutes).
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
            _, _, _, kv = model(ids, use_cache=True)
            for layer in kv:  # GLA layers cache a dict, FoX layers a (k, v, cumsum) tuple
                tensors = layer.values() if isinstance(layer, dict) else layer
                nbytes = sum(t.nbytes for t in tensors if torch.is_tensor(t))
                cache_bytes += nbytes
                attention_bytes += 0 if isinstance(layer, dict) else nbytes
            cache_bytes += sum(s.nbytes for s in getattr(model, "_segment_states", {}).values())
    return dict(prefill_tps=prefill, decode_tps=decode, cache_mb=cache_bytes / 2**20,
                attention_cache_mb=attention_bytes / 2**20, peak_mb=None,
                backend=f"torch {torch.__version__} cpu")


WORKERS = {"genesis-mlx": worker_genesis, "genesis-mlx-kv8": worker_genesis,
           "reference": worker_reference, "mlx-lm": worker_mlx_lm}


def worker_main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("impl", choices=IMPLS)
    p.add_argument("--model")
    p.add_argument("--checkpoint")
    p.add_argument("--prompt-length", type=int)
    p.add_argument("--gen", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--phase", choices=("generate", "forward"), default="generate")
    args = p.parse_args(argv)
    out = WORKERS[args.impl](args)
    out["rss_peak_mb"] = peak_rss_mb()
    print("BENCH " + json.dumps(out))


def run_worker(impl, model_dir, checkpoint, length, gen, reps, phase="generate"):
    cmd = [sys.executable, "-m", "genesis_mlx.benchmark", "worker", impl, "--model",
           str(model_dir), "--checkpoint", str(checkpoint), "--prompt-length", str(length),
           "--gen", str(gen), "--reps", str(reps), "--phase", phase]
    result = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in result.stdout.splitlines() if l.startswith("BENCH ")]
    if result.returncode or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:200]}
    return json.loads(lines[-1][6:])


def measure(impl, model_dir, checkpoint, length, gen):
    """One round of one impl at one prompt length: a fresh process, one warm-up, one
    timed generation. The reference's prefill is the faster of its no-cache forward
    and its generate's first token, so no choice of ours makes it look slow."""
    r = run_worker(impl, model_dir, checkpoint, length, gen, 1)
    if impl == "reference" and "error" not in r:
        forward = run_worker(impl, model_dir, checkpoint, length, gen, 1, phase="forward")
        if "error" not in forward:
            r["prefill_generate_tps"] = r["prefill_tps"]
            r["prefill_forward_tps"] = forward["prefill_tps"]
            r["prefill_tps"] = [max(a, b) for a, b in zip(r["prefill_tps"], forward["prefill_tps"])]
    return r


TIMINGS = ("prefill_tps", "decode_tps", "prefill_generate_tps", "prefill_forward_tps")


def merge_rounds(rounds):
    """A table row from its rounds: every round's timings (min / median over them),
    the largest memory figures."""
    errors = [r for r in rounds if "error" in r]
    if errors:
        return errors[0]
    row = dict(rounds[-1])
    for key in TIMINGS:
        if key in row:
            row[key] = [x for r in rounds for x in r[key]]
    for key in ("rss_peak_mb", "peak_mb"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        row[key] = max(values) if values else None
    return dict(row, prefill=summarize(row.pop("prefill_tps")),
                decode=summarize(row.pop("decode_tps")))


def measure_rounds(impls, lengths, reps, measure_one):
    """Runs ``measure_one(impl, length)`` in rounds: each round measures every impl
    once, so a shared machine's drift (its speed moved by 20% within minutes here)
    hits every row alike instead of whichever ran in a slow spell. An impl that
    failed is not run again."""
    rounds = {impl: {L: [] for L in lengths} for impl in impls}
    for n in range(reps):
        for impl in impls:
            for L in lengths:
                if any("error" in r for r in rounds[impl][L]):
                    continue
                r = measure_one(impl, L)
                rounds[impl][L].append(r)
                print(f"[bench] round {n + 1}/{reps} {impl} @ {L}: {json.dumps(r)}", flush=True)
    return {impl: {L: merge_rounds(rounds[impl][L]) for L in lengths} for impl in impls}


def summarize(values):
    return {"min": min(values), "median": statistics.median(values)} if values else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_line(backends):
    return (f"{platform.system()} {platform.machine()}, {cpu_name()} x {os.cpu_count()}; "
            f"backends: {', '.join(sorted(set(backends)))}")


def min_median(summary) -> str:
    return f"{summary['min']:.1f} / {summary['median']:.1f}"


def format_table(results, lengths):
    rows = ["| impl | context | prefill tok/s (min / median) | decode tok/s (min / median) "
            "| cache MB (attention part) | peak RSS MB |",
            "|---|---|---|---|---|---|"]
    for impl in results:
        for L in lengths:
            r = results[impl].get(L, {})
            if "error" in r:
                rows.append(f"| {impl} | {L} | error: {r['error']} | | | |")
                continue
            rows.append(f"| {impl} | {L} | {min_median(r['prefill'])} | {min_median(r['decode'])} "
                        f"| {r['cache_mb']:.1f} ({r['attention_cache_mb']:.1f}) "
                        f"| {r['rss_peak_mb']:.0f} |")
    return "\n".join(rows)


def ratio_lines(results, lengths):
    """Ours over theirs, medians (memory: ours as a fraction of theirs)."""
    lines = []
    pairs = [(mine, other) for mine in OURS for other in ("reference", "mlx-lm")]
    for (mine, other), L in ((pair, L) for pair in pairs for L in lengths):
        a, b = results.get(mine, {}).get(L, {}), results.get(other, {}).get(L, {})
        if not a or not b or "error" in a or "error" in b:
            continue
        lines.append(
            f"{mine} vs {other} at {L}: decode x{a['decode']['median'] / b['decode']['median']:.2f}, "
            f"prefill x{a['prefill']['median'] / b['prefill']['median']:.2f}, "
            f"attention cache {a['attention_cache_mb'] / max(b['attention_cache_mb'], 1e-9):.2f}"
            f" of theirs, peak RSS {a['rss_peak_mb'] / b['rss_peak_mb']:.2f} of theirs")
    return lines


def bench(model: str, lengths, gen: int, reps: int, compare, json_out=None, work=None,
          revision=None):
    import tempfile

    from .conversion.convert import convert
    from .conversion.reference_format import GENESIS_152M, write_reference_checkpoint
    from .conversion.checkpoint import resolve_source

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp)
        if model == "random":
            checkpoint = write_reference_checkpoint(work / "genesis-152m-random.safetensors",
                                                    GENESIS_152M)
        else:  # a reference checkpoint: the reference needs the raw file
            checkpoint = resolve_source(model, revision)
        model_dir = convert(str(checkpoint), str(work / "mlx"), force=True, with_tokenizer=False)
        results = measure_rounds(
            ["genesis-mlx", *compare], lengths, reps,
            lambda impl, L: measure(impl, model_dir, checkpoint, L, gen))
    backends = [r.get("backend", "?") for v in results.values() for r in v.values()]
    report = {"machine": machine_line(backends), "gen": gen, "reps": reps, "results": results}
    print(f"\nMachine: {report['machine']}; {gen} generated tokens, {reps} interleaved "
          "rounds (each impl in a fresh process per round, after a warm-up)")
    print(format_table(results, lengths))
    for line in ratio_lines(results, lengths):
        print(line)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
