"""The bench's table: rows merged from interleaved rounds, the machine line, ratios."""

import os
import platform
import statistics
from pathlib import Path

OURS = ("genesis-mlx", "genesis-mlx-kv8")  # exact, and with the 8-bit FoX K/V cache
TIMINGS = ("prefill_tps", "decode_tps", "prefill_generate_tps", "prefill_forward_tps")

# Other processes' CPU per second of a worker's run above which its timings are
# flagged: a multi-threaded worker on a busy machine loses far more than that share.
BUSY_MACHINE = 0.1


def summarize(values):
    return {"min": min(values), "median": statistics.median(values)} if values else None


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
    for key in ("wall_s", "others_cpu_s"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        row[key] = sum(values) if values else None
    return dict(row, prefill=summarize(row.pop("prefill_tps")),
                decode=summarize(row.pop("decode_tps")))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_line() -> str:
    return f"{platform.system()} {platform.machine()}, {cpu_name()} x {os.cpu_count()}"


def min_median(summary) -> str:
    return f"{summary['min']:.1f} / {summary['median']:.1f}"


def format_table(results, lengths):
    """One row per impl and context; "runs on" is the worker's own account of its
    framework and BLAS, so a quoted table carries it."""
    rows = ["| impl | context | prefill tok/s (min / median) | decode tok/s (min / median) "
            "| cache MB (attention part) | peak RSS MB | runs on |",
            "|---|---|---|---|---|---|---|"]
    for impl in results:
        for L in lengths:
            r = results[impl].get(L, {})
            if "error" in r:
                rows.append(f"| {impl} | {L} | error: {r['error']} | | | | |")
                continue
            rows.append(f"| {impl} | {L} | {min_median(r['prefill'])} | {min_median(r['decode'])} "
                        f"| {r['cache_mb']:.1f} ({r['attention_cache_mb']:.1f}) "
                        f"| {r['rss_peak_mb']:.0f} | {r.get('backend', '?')} |")
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


def busy_machine_line(results, lengths):
    """A warning naming the rows during which other processes used the CPU (their
    CPU seconds per second of the run), or None on a quiet machine."""
    busy = []
    for impl in results:
        for L in lengths:
            r = results[impl].get(L, {})
            if r.get("others_cpu_s") is not None and r.get("wall_s"):
                share = r["others_cpu_s"] / r["wall_s"]
                if share > BUSY_MACHINE:
                    busy.append(f"{impl} @ {L} {share:.2f}")
    if not busy:
        return None
    return ("warning: other processes used the CPU while these rows ran (CPU seconds per "
            f"second): {', '.join(busy)}; timings of a busy machine, not comparable")
