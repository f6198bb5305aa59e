"""`genesis-mlx bench` end to end on a small checkpoint the reference wrote: every
implementation measured in its own process, in the environment its users would run
it in; the table, the ratios, the JSON."""

import json
import os
import subprocess
import sys

import pytest

from genesis_mlx.benchmark import bench

SMALL = dict(n_embd=64, n_head=2, n_kv_head=1)  # head size 32: the 8-bit cache applies


def test_bench_measures_every_impl_and_writes_json(reference_checkpoint, tmp_path, capsys):
    _, checkpoint = reference_checkpoint(**SMALL)
    out = tmp_path / "bench.json"
    report = bench(str(checkpoint), [16, 40], gen=3, reps=1,
                   compare=["genesis-mlx-kv8", "reference"], json_out=str(out))
    assert json.loads(out.read_text())["results"].keys() == report["results"].keys()
    for impl in ("genesis-mlx", "genesis-mlx-kv8", "reference"):
        for L in ("16", "40"):
            r = json.loads(out.read_text())["results"][impl][L]
            assert "error" not in r, (impl, L, r)
            assert r["prefill"]["min"] > 0 and r["decode"]["median"] >= r["decode"]["min"] > 0
            assert r["rss_peak_mb"] > 0 and r["attention_cache_mb"] > 0
    results = report["results"]
    assert results["genesis-mlx-kv8"][40]["attention_cache_mb"] < results["genesis-mlx"][40]["attention_cache_mb"]
    assert len(results["reference"][40]["prefill_forward_tps"]) == 1
    printed = capsys.readouterr().out
    assert "| genesis-mlx | 40 |" in printed and "genesis-mlx vs reference at 40: decode x" in printed
    assert results["genesis-mlx"][40]["backend"] == results["genesis-mlx-kv8"][40]["backend"]
    assert results["reference"][40]["backend"].startswith("torch ") and "| torch " in printed


def test_rounds_interleave_the_impls_and_merge_their_timings():
    """Round n measures every impl before round n + 1 starts; a row's min / median are
    over its rounds, its memory the largest of them; a failed impl is not rerun."""
    from genesis_mlx.benchmark import measure_rounds

    calls = []

    def fake(impl, L):
        calls.append((impl, L))
        if impl == "broken":
            return {"error": "no such thing"}
        n = sum(c == (impl, L) for c in calls)
        return {"prefill_tps": [10.0 * n], "decode_tps": [float(n)], "rss_peak_mb": 100.0 + n,
                "peak_mb": None, "cache_mb": 1.0, "attention_cache_mb": 0.5}

    results = measure_rounds(["ours", "theirs", "broken"], [8, 16], 3, fake)
    first_round = [("ours", 8), ("ours", 16), ("theirs", 8), ("theirs", 16), ("broken", 8),
                   ("broken", 16)]
    assert calls[:6] == first_round
    assert calls[6:] == first_round[:4] * 2
    row = results["ours"][16]
    assert row["decode"] == {"min": 1.0, "median": 2.0} and row["prefill"]["min"] == 10.0
    assert row["rss_peak_mb"] == 103.0 and row["peak_mb"] is None
    assert results["broken"][8] == {"error": "no such thing"}


def test_reference_timing_runs_the_loop_of_its_generate(reference_checkpoint):
    """The reference's decode is timed on its own cached steps: the tokens they give
    are its generate()'s greedy tokens."""
    import torch

    from genesis_mlx.benchmark import prompt_ids, time_reference_generate

    model, _ = reference_checkpoint(**SMALL)
    ids = torch.tensor(prompt_ids(30, 512))
    with torch.no_grad():
        t_prefill, t_decode, tokens = time_reference_generate(model, ids, 8)
        want = model.generate(ids, max_new_tokens=9, top_k=1)[0, 30:].tolist()
    assert tokens == want and t_prefill > 0 and t_decode > 0


def test_bench_rejects_unknown_comparison():
    result = subprocess.run([sys.executable, "-m", "genesis_mlx", "bench", "--compare", "vllm"],
                            capture_output=True, timeout=300)
    err = result.stderr.decode().strip()
    assert result.returncode == 2 and len(err.splitlines()) == 1 and "--compare" in err, err


def preloaded_as_the_cli_does(monkeypatch):
    """This process's environment as `genesis-mlx` leaves it after re-executing
    itself: our OpenBLAS and GEMV forwarding preloaded, its flag set. Returns the
    real names of the preloaded libraries (as /proc/self/maps shows them)."""
    from genesis_mlx.cpu.blas import CHILD_FLAG, preload_libraries

    libraries = preload_libraries()
    if not libraries:
        pytest.skip("no OpenBLAS on this machine: the CLI preloads nothing")
    monkeypatch.setenv("LD_PRELOAD", ":".join(libraries))
    monkeypatch.setenv(CHILD_FLAG, "1")
    monkeypatch.setenv("GENESIS_MLX_KERNELS", "auto")
    return {os.path.basename(os.path.realpath(p)) for p in libraries}


def test_reference_worker_runs_as_a_plain_torch_process(reference_checkpoint, monkeypatch):
    """Started by a bench that runs under our preload, the reference worker still
    runs as `pip install genesis-llm` gives it: no LD_PRELOAD, neither our OpenBLAS
    (which would take over torch's own sgemm) nor the GEMV forwarding mapped, none
    of our variables, genesis_mlx not imported. The worker reports what it saw."""
    from genesis_mlx.benchmark import run_worker

    preloaded = preloaded_as_the_cli_does(monkeypatch)
    _, checkpoint = reference_checkpoint(**SMALL)
    for phase in ("generate", "forward"):
        r = run_worker("reference", None, checkpoint, 16, 2, 1, phase=phase)
        assert "error" not in r, r
        seen = r["environment"]
        assert seen["ld_preload"] == "", seen
        assert not preloaded & set(seen["blas_libraries"]), seen
        assert not [n for n in seen["blas_libraries"] if n.startswith("gemv_forward")], seen
        assert seen["our_variables"] == [] and not seen["genesis_mlx_imported"], seen


def test_mlx_workers_share_one_blas_whoever_started_the_bench(monkeypatch):
    """Ours and mlx-lm's Llama get one environment: the CLI's preload, rebuilt the
    same whether the bench runs under it or from plain Python; the user's own
    preloads stay behind ours."""
    from genesis_mlx.benchmark.environments import worker_environment
    from genesis_mlx.cpu.blas import command_preload

    plain = {"PATH": os.environ["PATH"], "LD_PRELOAD": "/opt/mine.so"}
    under_cli = dict(plain, LD_PRELOAD=":".join([*command_preload(), "/opt/mine.so"]),
                     GENESIS_MLX_BLAS_REEXEC="1")
    want = ":".join([*command_preload(), "/opt/mine.so"])
    for env in (plain, under_cli):
        ours, theirs = (worker_environment(impl, env) for impl in ("genesis-mlx", "mlx-lm"))
        assert ours == theirs and ours["LD_PRELOAD"] == want
        assert "GENESIS_MLX_BLAS_REEXEC" not in ours
        assert "LD_PRELOAD" not in worker_environment("reference", env)


def test_worker_reference_by_hand_runs_clean(reference_checkpoint, monkeypatch):
    """`python -m genesis_mlx.benchmark worker reference ...` (as the bench's workers
    were once run by hand) starts the same clean reference worker."""
    preloaded = preloaded_as_the_cli_does(monkeypatch)
    _, checkpoint = reference_checkpoint(**SMALL)
    result = subprocess.run(
        [sys.executable, "-m", "genesis_mlx.benchmark", "worker", "reference", "--model", "x",
         "--checkpoint", str(checkpoint), "--prompt-length", "8", "--gen", "1", "--reps", "1"],
        capture_output=True, text=True, timeout=300)
    line = [l for l in result.stdout.splitlines() if l.startswith("BENCH ")]
    assert line, result.stderr
    seen = json.loads(line[-1][6:])["environment"]
    assert seen["ld_preload"] == "" and not preloaded & set(seen["blas_libraries"]), seen


def test_rows_measured_on_a_busy_machine_are_flagged():
    """Other processes' CPU during a row's runs, per second of them, above a tenth
    of a core names the row in a warning; a quiet machine prints none."""
    from genesis_mlx.benchmark.report import busy_machine_line, merge_rounds

    def rounds(others):
        return [{"prefill_tps": [1.0], "decode_tps": [1.0], "rss_peak_mb": 1.0,
                 "wall_s": 10.0, "others_cpu_s": o} for o in others]

    results = {"quiet": {128: merge_rounds(rounds([0.1, 0.3]))},
               "busy": {128: merge_rounds(rounds([0.1, 9.9]))}}
    assert results["busy"][128]["others_cpu_s"] == 10.0
    line = busy_machine_line(results, [128])
    assert "busy @ 128 0.50" in line and "quiet" not in line
    assert busy_machine_line({"quiet": results["quiet"]}, [128]) is None


def test_interference_counts_other_processes_not_the_bench(monkeypatch):
    """The machine's busy CPU seconds over a worker's run, less the bench's own and
    its children's: what everything else took."""
    from genesis_mlx.benchmark import machine_load

    clock = {"busy": 100.0, "children": 5.0, "own": 1.0}
    for name, key in (("machine_busy_seconds", "busy"), ("children_cpu_seconds", "children"),
                      ("own_cpu_seconds", "own")):
        monkeypatch.setattr(machine_load, name, lambda key=key: clock[key])
    with machine_load.interference() as load:
        clock.update(busy=112.0, children=12.5, own=1.5)  # the worker 7.5, the bench 0.5
    assert load["others_cpu_s"] == 4.0 and load["wall_s"] >= 0


@pytest.mark.parametrize("option,value,needle", [
    ("--prompt-lengths", "-5", "at least 1 token"), ("--prompt-lengths", "128,0", "at least 1"),
    ("--json", "/nonexistent-dir/report.json", "no directory"),
])
def test_bench_refuses_what_would_fail_every_row_before_running(capsys, option, value, needle):
    from genesis_mlx.cli.main import main

    assert main(["bench", option, value]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{option} {value}" in lines[0] and needle in lines[0], err
    assert not out
