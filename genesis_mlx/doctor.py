"""The checks behind ``genesis-mlx doctor``: whether the GPU kernels work on this
machine, and what it runs.

Every kernel against its ops twin at the real model's shapes (fp32 and bf16), timed
beside the ops path the model takes without it; the whole model with kernels on and
off; the paths the model takes for decoding and long prompts, and why; versions,
chip and measured memory bandwidth. Everything goes into a JSON report to attach to
bug reports. Without a GPU the kernels are not used, so their bodies are checked
through the CPU emulation instead (slow: the shapes are cut, the head dims kept).
"""

import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


def run_doctor(report_path: Optional[str], quick: bool) -> int:
    """Runs every check, prints what it finds, writes the JSON report to
    ``report_path`` (None: nowhere); 0 if all passed, else 1."""
    report = {"system": system_report()}
    print_system(report["system"])
    report["memory_bandwidth_gb_s"] = memory_bandwidth(quick)
    print(f"memory bandwidth: {report['memory_bandwidth_gb_s']:.1f} GB/s "
          f"(read by a vector-matrix product over a large float32 matrix)")
    report["kernels"] = kernels_report(quick)
    report["model_parity"] = model_parity(report["kernels"]["checked_on"], quick)
    report["paths"] = paths_report()
    failed = failures(report)
    report["ok"] = not failed
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n")
    if failed:
        attach = (f"attach {report_path}" if report_path is not None else
                  "run again with --json PATH and attach that report")
        print(f"doctor: {len(failed)} check(s) failed ({'; '.join(failed)}); please {attach} "
              "to a bug report")
        return 1
    written = (f"report written to {report_path}" if report_path is not None else
               "--json PATH writes a report")
    print(f"doctor: all checks passed; {written}")
    return 0


# --- the machine ---

def system_report() -> dict:
    import mlx.core as mx

    from . import __version__
    from .kernels.backend import device_gpu, selected_kernels

    info = {"genesis_mlx": __version__, "mlx": mx.__version__,
            "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
            "device": str(mx.default_device()), "gpu_backend": device_gpu(),
            "kernels_setting": selected_kernels(), "cpu_cores": os.cpu_count()}
    info.update(darwin_report() if platform.system() == "Darwin" else linux_report())
    info["mlx_device_info"] = mlx_device_info()
    return info


def darwin_report() -> dict:
    memory = sysctl("hw.memsize")
    return {"macos": platform.mac_ver()[0], "chip": sysctl("machdep.cpu.brand_string"),
            "memory_gb": round(int(memory) / 1e9, 1) if memory.isdigit() else None}


def sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def linux_report() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return {"cpu": cpu or platform.processor(), "memory_gb": round(memory / 1e9, 1)}
    return {"cpu": cpu or platform.processor()}


def mlx_device_info() -> dict:
    """What MLX says about its device (Metal: the GPU's architecture and memory)."""
    import mlx.core as mx

    info = {}
    with contextlib.suppress(Exception):
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in info.items()}


def print_system(info: dict) -> None:
    print(f"genesis-mlx {info['genesis_mlx']}, mlx {info['mlx']}, python {info['python']}")
    if "macos" in info:
        print(f"system: macOS {info['macos']}, {info['chip']}, {info['memory_gb']} GB")
    else:
        print(f"system: {info['os']} {info['machine']}, {info['cpu']}, {info['cpu_cores']} "
              f"cores, {info.get('memory_gb')} GB")
    print(f"device: {info['device']}; GPU backend: {info['gpu_backend'] or 'none'}; "
          f"GENESIS_MLX_KERNELS={info['kernels_setting']}")


def memory_bandwidth(quick: bool) -> float:
    """GB/s read by a vector-matrix product over a large float32 matrix (median of
    5): what decoding is bound by, each weight read once per token, on every core
    the BLAS or GPU uses (a plain reduction runs on one CPU thread)."""
    import mlx.core as mx

    rows = (16 if quick else 64) * 1024
    matrix = mx.random.normal((rows, 1024))
    vector = mx.ones((1, rows))
    mx.eval(matrix, vector)
    seconds = median_ms(lambda: vector @ matrix, reps=5) / 1e3
    return matrix.nbytes / seconds / 1e9


def median_ms(fn: Callable, reps: int, warmup: int = 1) -> float:
    import mlx.core as mx

    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - tic) * 1e3)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def kernels_set(choice: str):
    from .kernels.backend import select_kernels, selected_kernels

    previous = selected_kernels()
    select_kernels(choice)
    try:
        yield
    finally:
        select_kernels(previous)


# --- the kernels against their ops twins ---

@dataclass
class Case:
    """One kernel on inputs shaped as one of the model's calls. ``ops``: the path the
    dispatch takes without the kernel, timed beside it; ``memory``: measure both's
    extra memory too (long prefills, where the FoX kernel saves the bias matrix)."""
    guard: object
    label: str
    inputs: Callable
    ops: Callable
    memory: bool = False


def real_dims():
    """(GLA heads, Dk, Dv), (FoX heads, KV heads, D) of the published model."""
    from .conversion.reference_format import GENESIS_152M
    from .model.genesis import ForgettingAttention, GatedLinearAttention, ModelArgs

    args = ModelArgs.from_dict(GENESIS_152M)
    gla, fox = GatedLinearAttention(args), ForgettingAttention(args)
    return (gla.n_head, gla.head_qk_dim, gla.head_v_dim), (fox.n_head, fox.n_kv_head, fox.head_dim)


def gla_inputs(T: int, dims):
    import mlx.core as mx
    import numpy as np

    from .kernels.guard import probe_array

    def make(dtype):
        H, Dk, Dv = dims
        rng = np.random.RandomState(T)
        q, k = (probe_array(rng, (1, H, T, Dk), dtype, s) for s in (1.0, 0.2))
        v = probe_array(rng, (1, H, T, Dv), dtype)
        log_g = mx.array(-rng.uniform(0, 0.5, (1, H, T)).astype(np.float32))
        return q, k, v, log_g, Dk ** -0.5, probe_array(rng, (1, H, Dk, Dv))

    return make


def fox_inputs(n_queries: int, n_keys: int, dims):
    import mlx.core as mx
    import numpy as np

    from .kernels.guard import probe_array

    def make(dtype):
        H, Hkv, D = dims
        rng = np.random.RandomState(n_queries)
        q = probe_array(rng, (1, H, n_queries, D), dtype)
        k = probe_array(rng, (1, Hkv, n_keys, D), dtype)
        v = probe_array(rng, (1, H, n_keys, D), dtype)
        cumsum = np.cumsum(-rng.uniform(0, 0.1, (1, H, n_keys)), axis=-1).astype(np.float32)
        return (q, k, v, mx.array(cumsum[..., n_keys - n_queries:]), mx.array(cumsum),
                D ** -0.5, None)

    return make


def kernel_cases(emulated: bool, quick: bool):
    from . import kernels
    from .generation.steps import PREFILL_STEP
    from .kernels.fox import kernel as fox_kernel
    from .kernels.gla import recurrent as gla_kernel

    gla_dims, fox_dims = real_dims()
    # The emulation runs one GPU thread after another: long prefills are cut there.
    prefill = 256 if quick and emulated else max(kernels.FOX_KERNEL_MIN_QUERIES, PREFILL_STEP)

    def gla_ops(q, k, v, log_g, scale, state):
        return kernels.gla(q, k, v, log_g, scale, 64, state, cached=True)

    def fox_ops(*inputs):
        return kernels.fox_attend(*inputs)

    T = kernels.RECURRENT_MAX_T
    return [
        Case(gla_kernel.GUARD, "decode: 1 token", gla_inputs(1, gla_dims), gla_ops),
        Case(gla_kernel.GUARD, f"prompt piece: {T} tokens", gla_inputs(T, gla_dims), gla_ops),
        Case(fox_kernel.GUARD, f"prefill: {prefill} queries",
             fox_inputs(prefill, prefill, fox_dims), fox_ops, memory=True),
    ]


def check_case(case: Case, backend: str, dtype, quick: bool) -> dict:
    """The kernel against its twin (the first-use check's comparison), then both
    timed; on a GPU, a prefill's extra memory too."""
    import mlx.core as mx

    inputs = case.inputs(dtype)
    check = case.guard.compare(backend, inputs)
    result = {"kernel": case.guard.title, "case": case.label,
              "dtype": str(dtype).split(".")[-1], "ok": check.ok,
              "max_rel_error": check.error, "reason": check.reason}
    if not check.ok:
        return result
    emulated = backend == "emulate"  # host memory and one thread at a time: time only
    reps = 1 if emulated else (5 if quick else 20)
    kernel = lambda: case.guard.run(backend, *inputs)  # noqa: E731
    with kernels_set("off"):
        result["ops_ms"] = median_ms(lambda: case.ops(*inputs), reps)
        if case.memory and not emulated:
            result["ops_extra_mb"] = peak_mb(lambda: case.ops(*inputs))
    result["kernel_ms"] = median_ms(kernel, reps, warmup=0 if emulated else 1)
    if case.memory and not emulated:
        result["kernel_extra_mb"] = peak_mb(kernel)
    mx.clear_cache()
    return result


def peak_mb(fn: Callable) -> float:
    """Memory a call takes beyond what is already allocated (after a warm-up)."""
    import mlx.core as mx

    mx.eval(fn())
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(fn())
    return (mx.get_peak_memory() - base) / 2**20


def kernels_report(quick: bool) -> dict:
    import mlx.core as mx

    from .kernels.backend import device_gpu

    gpu = device_gpu()
    backend = gpu or "emulate"
    if gpu:
        print(f"kernels: checking the {gpu} kernels against their ops twins "
              f"(tolerance as the tests)")
    else:
        print("kernels: not used on this device (no GPU): the model takes the ops path; "
              "checking the kernel bodies through the CPU emulation instead")
        if shutil.which("c++") is None:
            print("  skipped: no C++ compiler (c++) to build the emulation")
            return {"checked_on": None, "used_by_model": False, "results": [],
                    "skipped": "no C++ compiler"}
    results = []
    print(f"  {'kernel':<20} {'case':<28} {'dtype':<9} {'rel. error':>10}  check "
          f"{'kernel ms':>10} {'ops ms':>9}")
    for case in kernel_cases(emulated=not gpu, quick=quick):
        for dtype in (mx.float32, mx.bfloat16):
            results.append(check_case(case, backend, dtype, quick))
            print_result(results[-1])
    if not gpu:
        print("  (kernel ms: the emulation's, one GPU thread after another on the CPU)")
    return {"checked_on": backend, "used_by_model": gpu is not None, "results": results}


def print_result(r: dict) -> None:
    error = "-" if r["max_rel_error"] is None else f"{r['max_rel_error']:.1e}"
    timings = (f"{r['kernel_ms']:>10.2f} {r['ops_ms']:>9.2f}" if r["ok"] else
               f"  {r['reason']}")
    print(f"  {r['kernel']:<20} {r['case']:<28} {r['dtype']:<9} {error:>10}  "
          f"{'ok' if r['ok'] else 'FAIL':<5}{timings}")
    for key in ("kernel_extra_mb", "ops_extra_mb"):
        if key in r:
            print(f"    {key.replace('_', ' ')}: {r[key]:.1f}")


# --- the whole model, kernels on and off ---

def model_parity(backend: Optional[str], quick: bool) -> dict:
    """A random model of the published structure (fewer layers, a small vocabulary):
    a prompt and a few decoded tokens with the kernels on and off. The prompt reaches
    each kernel: on a GPU, FoX's takes prompts of FOX_KERNEL_MIN_QUERIES queries."""
    import numpy as np

    from . import kernels
    from .kernels.guard import guards

    if backend is None:
        return {"skipped": "no kernels to check"}
    on = "emulate" if backend == "emulate" else "auto"
    n_prompt = 24 if backend == "emulate" else kernels.FOX_KERNEL_MIN_QUERIES + 8
    args, weights, layers = parity_model(quick)
    ids = np.random.RandomState(0).randint(0, args.vocab_size, (1, n_prompt + 8))
    logits = {}
    for choice in ("off", on):
        with kernels_set(choice):
            logits[choice] = model_logits(args, weights, ids, n_prompt)
    diff = float(np.abs(logits[on] - logits["off"]).max())
    allowed = 1e-4 * max(1.0, float(np.abs(logits["off"]).max()))
    used = {title: g.state(backend) for title, g in guards().items()}
    result = {"kernels": backend, "layers": layers, "prompt_tokens": n_prompt,
              "decoded_tokens": 8, "max_logit_diff": diff, "allowed": allowed,
              "ok": diff <= allowed, "kernel_states": used}
    print(f"model parity ({layers} layers of the published shape, {n_prompt}-token prompt + "
          f"8 tokens, kernels {backend} vs off): max |logit diff| {diff:.1e} "
          f"(allowed {allowed:.1e}) {'ok' if result['ok'] else 'FAIL'}")
    return result


def parity_model(quick: bool):
    from .conversion.checkpoint import load_reference_checkpoint
    from .conversion.reference_format import GENESIS_152M, write_reference_checkpoint

    layers = 4 if quick else 8
    config = dict(GENESIS_152M, n_layer=layers, vocab_size=2048)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_reference_checkpoint(Path(tmp) / "doctor.safetensors", config)
        args, weights = load_reference_checkpoint(path)
    return args, weights, layers


def model_logits(args, weights, ids, n_prompt: int):
    import mlx.core as mx
    import numpy as np

    from .model.genesis import Model

    model = Model(args)
    model.load_weights(list(weights.items()))
    model.eval()
    cache = model.make_cache()
    outs = [model(mx.array(ids[:, :n_prompt]), cache=cache)]
    outs += [model(mx.array(ids[:, t : t + 1]), cache=cache) for t in range(n_prompt, ids.shape[1])]
    return np.concatenate([np.array(o.astype(mx.float32)) for o in outs], axis=1)


# --- the paths the model takes ---

def paths_report() -> dict:
    """The dispatch's own answers (forms.arrangement, kernels.gla_form and
    kernels.fox_form, at the published model's shapes) for a decoding token and for
    a long prompt's pieces."""
    import mlx.core as mx

    from . import forms, kernels
    from .generation.steps import PREFILL_STEP

    gla_dims, fox_dims = real_dims()
    report = {"forms": {"arrangement": forms.arrangement(), "why": forms.why_arrangement()}}
    print("paths the model takes here:")
    print(f"  forms: {report['forms']['why']}")
    for when, n in (("decode", 1), (f"prefill pieces of {PREFILL_STEP} tokens", PREFILL_STEP)):
        cached = n == 1
        layers = {"gla": kernels.gla_form(n, cached, dtype=mx.float32, dims=gla_dims),
                  "fox": kernels.fox_form(n, cached, dtype=mx.float32, dims=fox_dims)}
        for layer, (path, why) in layers.items():
            print(f"  {when}, {LAYER_NAMES[layer]}: {path} ({why})")
        report[when] = {layer: {"path": p, "why": w} for layer, (p, w) in layers.items()}
    return report


LAYER_NAMES = {"gla": "GLA", "fox": "FoX"}


def failures(report: dict) -> list:
    failed = [f"{r['kernel']} {r['case']} {r['dtype']}"
              for r in report["kernels"]["results"] if not r["ok"]]
    if not report["model_parity"].get("ok", True):
        failed.append("model parity")
    return failed
