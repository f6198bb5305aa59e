"""``genesis-mlx bench``: converts the model, runs every worker in rounds, prints the
table. The driving process only waits while a worker runs, so nothing of its own
competes with the one being measured (its CPU time over the rounds goes into the
report to show it)."""

import json
import subprocess
from pathlib import Path

from .environments import worker_command, worker_environment
from .machine_load import interference, own_cpu_seconds
from .report import busy_machine_line, format_table, machine_line, merge_rounds, ratio_lines

IMPLS = ("genesis-mlx", "genesis-mlx-kv8", "reference", "mlx-lm")


def run_worker(impl, model_dir, checkpoint, length, gen, reps, phase="generate",
               dtype="float32"):
    """One fresh worker process, in the environment its users would run it in. The
    result also says how much CPU the rest of the machine took meanwhile."""
    cmd = worker_command(impl, model_dir, checkpoint, length, gen, reps, phase, dtype)
    with interference() as load:
        result = subprocess.run(cmd, capture_output=True, text=True,
                                env=worker_environment(impl))
    lines = [l for l in result.stdout.splitlines() if l.startswith("BENCH ")]
    if result.returncode or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:200]}
    return dict(json.loads(lines[-1][6:]), **load)


def measure(impl, model_dir, checkpoint, length, gen, dtype="float32"):
    """One round of one impl at one prompt length: a fresh process, one warm-up, one
    timed generation. The reference's prefill is the faster of its no-cache forward
    and its generate's first token, so no choice of ours makes it look slow."""
    r = run_worker(impl, model_dir, checkpoint, length, gen, 1, dtype=dtype)
    if impl != "reference" or "error" in r:
        return r
    forward = run_worker(impl, model_dir, checkpoint, length, gen, 1, phase="forward")
    return r if "error" in forward else with_forward_phase(r, forward)


def with_forward_phase(generate, forward):
    """The reference's round from its two processes: both prefills kept, the faster
    one as its prefill; their wall and interference times added."""
    r = dict(generate, prefill_generate_tps=generate["prefill_tps"],
             prefill_forward_tps=forward["prefill_tps"])
    r["prefill_tps"] = [max(a, b) for a, b in zip(generate["prefill_tps"], forward["prefill_tps"])]
    for key in ("wall_s", "others_cpu_s"):
        if key in generate and key in forward:
            r[key] = generate[key] + forward[key]
    return r


def measure_rounds(impls, lengths, reps, measure_one):
    """Runs ``measure_one(impl, length)`` in rounds: each round measures every impl
    once, so a shared machine's drift hits every row alike instead of whichever ran
    in a slow spell. An impl that failed is not run again."""
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


def prepare_model(model: str, work: Path, revision=None, dtype="float32"):
    """The reference checkpoint and its conversion to ``dtype``: ``random`` writes one
    of the real shape."""
    from ..conversion.checkpoint import resolve_source
    from ..conversion.convert import convert
    from ..conversion.reference_format import GENESIS_152M, write_reference_checkpoint

    if model == "random":
        checkpoint = write_reference_checkpoint(work / "genesis-152m-random.safetensors",
                                                GENESIS_152M)
    else:  # a reference checkpoint: the reference needs the raw file
        checkpoint = resolve_source(model, revision)
    return checkpoint, convert(str(checkpoint), str(work / "mlx"), dtype, force=True,
                               with_tokenizer=False)


def bench(model: str, lengths, gen: int, reps: int, compare, json_out=None, work=None,
          revision=None, dtype=None):
    """``dtype``: the MLX rows' (default: bfloat16 on a GPU, float32 on the CPU)."""
    import tempfile

    from ..conversion.convert import device_dtype

    dtype = dtype or device_dtype()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, model_dir = prepare_model(model, Path(work or tmp), revision, dtype)
        cpu_before = own_cpu_seconds()
        results = measure_rounds(
            ["genesis-mlx", *compare], lengths, reps,
            lambda impl, L: measure(impl, model_dir, checkpoint, L, gen, dtype))
        driver_cpu = own_cpu_seconds() - cpu_before
    report = {"machine": machine_line(), "gen": gen, "reps": reps, "dtype": dtype,
              "driver_cpu_s": driver_cpu, "results": results}
    print(f"\nMachine: {report['machine']}; MLX rows in {dtype}; {gen} generated tokens, "
          f"{reps} interleaved rounds (each impl in a fresh process per round, after a "
          "warm-up; the reference without any preload, the MLX rows with one BLAS between "
          "them)")
    print(format_table(results, lengths))
    for line in ratio_lines(results, lengths):
        print(line)
    warning = busy_machine_line(results, lengths)
    if warning:
        print(warning)
    print(f"(the driving process itself used {driver_cpu:.2f} s of CPU over all the rounds)")
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))
    return report
