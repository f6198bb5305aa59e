"""`genesis-mlx bench` end to end on a small checkpoint the reference wrote: every
implementation measured in its own process, the table, the ratios, the JSON."""

import json
import subprocess
import sys

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
