"""Kernel vs ops timings on the current device (``python -m genesis_mlx.kernels.timing``).
Meaningful on a GPU; on a CPU only the ops paths run."""

import time

import mlx.core as mx

from . import gpu_backend
from .fox import fox_attention_kernel, fox_attention_tiled
from .gla import gla_recurrent
from . import (fox_attention, fox_attention_grouped, gla_chunked, gla_chunked_parallel,
                    gla_step, group_values)


def median_ms(fn, reps=20, warmup=3):
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - tic) * 1e3)
    return sorted(times)[len(times) // 2]


def gla_inputs(B, H, T, Dk=48, Dv=96, dtype=mx.float32):
    q = mx.random.normal((B, H, T, Dk)).astype(dtype)
    k = (mx.random.normal((B, H, T, Dk)) * 0.2).astype(dtype)
    v = mx.random.normal((B, H, T, Dv)).astype(dtype)
    g = -mx.random.uniform(0, 0.5, (B, H, T))
    s = mx.zeros((B, H, Dk, Dv))
    mx.eval(q, k, v, g, s)
    return q, k, v, g, Dk ** -0.5, s


def layer_rows(backend):
    rows = []
    q, k, v, g, scale, s = gla_inputs(1, 9, 1)
    rows.append(("GLA decode step, per layer", "ops", median_ms(lambda: gla_step(q, k, v, g, scale, s))))
    if backend:
        rows.append(("GLA decode step, per layer", backend,
                     median_ms(lambda: gla_recurrent(q, k, v, g, scale, s))))
    q, k, v, g, scale, s = gla_inputs(1, 9, 2048)
    rows.append(("GLA prefill 2048, per layer", "ops, loop over chunks",
                 median_ms(lambda: gla_chunked(q, k, v, g, scale, 64, s), reps=5)))
    rows.append(("GLA prefill 2048, per layer", "ops, no loop",
                 median_ms(lambda: gla_chunked_parallel(q, k, v, g, scale, 64, s), reps=5)))
    if backend:
        rows.append(("GLA prefill 2048, per layer", f"{backend} recurrent",
                     median_ms(lambda: gla_recurrent(q, k, v, g, scale, s), reps=5)))
    return rows


def peak_mb(fn):
    mx.eval(fn())  # warm-up, then measure from a clean slate
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(fn())
    return (mx.get_peak_memory() - base) / 2**20


def fox_rows(backend):
    rows = []
    for T in (2048, 8192):
        q = mx.random.normal((1, 9, T, 64))
        k = mx.random.normal((1, 3, T, 64))
        v = mx.random.normal((1, 9, T, 64))
        c = mx.cumsum(-mx.random.uniform(0, 0.1, (1, 9, T)), axis=-1)
        mx.eval(q, k, v, c)
        scale = 64 ** -0.5
        full = lambda: fox_attention(q, k, v, c, c, scale, block_size=T)
        blocked = lambda: fox_attention(q, k, v, c, c, scale)
        rows.append((f"FoX prefill {T}, peak extra memory (MB)", "ops, full T x T bias", peak_mb(full)))
        rows.append((f"FoX prefill {T}, peak extra memory (MB)", "ops, 512-row blocks", peak_mb(blocked)))
        if backend:
            kernel = lambda: fox_attention_kernel(q, k, v, c, c, scale)
            tiled = lambda: fox_attention_tiled(q, k, v, c, c, scale)
            rows.append((f"FoX prefill {T}, peak extra memory (MB)", backend, peak_mb(kernel)))
            rows.append((f"FoX prefill {T}, peak extra memory (MB)", f"{backend} tiled",
                         peak_mb(tiled)))
        if T == 2048:
            rows.append(("FoX prefill 2048, per layer", "ops, 512-row blocks",
                         median_ms(blocked, reps=5)))
            q1, c1 = q[:, :, -1:], c[..., -1:]
            rows.append(("FoX decode at 2048, per layer", "ops",
                         median_ms(lambda: fox_attention(q1, k, v, c1, c, scale))))
            rows.append(("FoX decode at 2048, per layer", "ops, exact cache (V per head)",
                         median_ms(lambda: fox_attention_grouped(q1, k, v, c1, c, scale))))
            v_grouped = mx.contiguous(group_values(v, 3))
            rows.append(("FoX decode at 2048, per layer", "ops, V grouped (quantized cache's)",
                         median_ms(lambda: fox_attention_grouped(q1, k, v_grouped, c1, c, scale))))
            if backend:
                rows.append(("FoX prefill 2048, per layer", backend, median_ms(kernel, reps=5)))
                rows.append(("FoX prefill 2048, per layer", f"{backend} tiled",
                             median_ms(tiled, reps=5)))
                rows.append(("FoX decode at 2048, per layer", backend,
                             median_ms(lambda: fox_attention_kernel(q1, k, v, c1, c, scale))))
    return rows


def model_rows(backend):
    import os

    from ..conversion.reference_format import GENESIS_152M
    from ..model.genesis import Model, ModelArgs

    rows = []
    for mode in (["off", "auto"] if backend else ["off"]):
        os.environ["GENESIS_MLX_KERNELS"] = mode
        model = Model(ModelArgs.from_dict(GENESIS_152M))
        mx.eval(model.parameters())
        model.eval()
        prompt = mx.random.randint(0, 50000, (1, 2048))
        mx.eval(model(prompt, cache=model.make_cache()))  # warm-up
        cache = model.make_cache()
        tic = time.perf_counter()
        mx.eval(model(prompt, cache=cache))
        prefill = 2048 / (time.perf_counter() - tic)
        token = prompt[:, -1:]
        for _ in range(3):
            mx.eval(model(token, cache=cache))
        n = 64
        tic = time.perf_counter()
        for _ in range(n):
            token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1)
            mx.eval(token)
        per_token = (time.perf_counter() - tic) / n * 1e3
        label = "ops" if mode == "off" else backend
        rows.append(("152M model, decode at 2048 context (ms/token)", label, per_token))
        rows.append(("152M model, prefill 2048 (tokens/s)", label, prefill))
    os.environ.pop("GENESIS_MLX_KERNELS", None)
    return rows


def main():
    backend = gpu_backend()
    backend = backend if backend in ("metal", "cuda") else None
    print(f"device: {mx.default_device()}, kernel backend: {backend or 'none (ops only)'}")
    for what, path, value in layer_rows(backend) + fox_rows(backend) + model_rows(backend):
        unit = "" if "(" in what else " ms"
        print(f"| {what} | {path} | {value:.3f}{unit} |")


if __name__ == "__main__":
    main()
