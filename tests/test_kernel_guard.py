"""The kernels' first-use guard, by fault injection: a kernel body that does not
compile, or computes something else, is switched to the ops path for the process
with one warning line, and the model's logits stay those of the ops path. Faults run
through the CPU emulation here, and through the GPU's own compiler on a GPU machine."""

import mlx.core as mx
import numpy as np
import pytest

from genesis_mlx.kernels import fox_attend, gla, gpu_backend, guard
from genesis_mlx.kernels.emulation import KernelCompileError
from genesis_mlx.kernels.fox import fox_attention
from genesis_mlx.kernels.fox import kernel as fox_kernel
from genesis_mlx.kernels.gla import gla_chunked
from genesis_mlx.kernels.gla import recurrent as gla_kernel

from conftest import FAULTS, max_difference, ops_rounding

pytestmark = pytest.mark.usefixtures("fresh_guards")

# name -> (the guard, as conftest's FAULTY_KERNELS names the kernels)
GUARDS = {"gla": gla_kernel.GUARD, "fox": fox_kernel.GUARD}

GPU = [b for b in [gpu_backend()] if b in ("metal", "cuda")]
BACKENDS = ["emulate"] + GPU


def warning_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def gla_case(dtype=mx.float32, T=1):
    rng = np.random.RandomState(1)
    q, k = (guard.probe_array(rng, (1, 3, T, 48), dtype, s) for s in (1.0, 0.2))
    v = guard.probe_array(rng, (1, 3, T, 96), dtype)
    g = mx.array(-rng.uniform(0, 0.7, (1, 3, T)).astype(np.float32))
    return q, k, v, g, 48 ** -0.5, guard.probe_array(rng, (1, 3, 48, 96))


def fox_case(dtype=mx.float32):
    return fox_kernel.probe(5, 40)(dtype, (6, 2, 32))


def rel(a, b):
    return guard.relative_error(np.array(a), np.array(b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(GUARDS))
def test_injected_faults_are_real(inject_fault, name, backend):
    """Without the guard, the broken body raises and the wrong one answers wrongly."""
    kernel_guard = GUARDS[name]
    inputs = gla_case() if name == "gla" else fox_case()
    want = guard.as_tuple(kernel_guard.twin(*inputs))[0]

    def kernel_output():
        return guard.as_tuple(kernel_guard.run(backend, *inputs))[0]

    assert rel(want, kernel_output()) <= guard.TOLERANCE  # the shipped body
    inject_fault(name, "wrong")
    assert rel(want, kernel_output()) > 0.1
    inject_fault(name, "syntax")
    with pytest.raises(Exception) as error:
        mx.eval(kernel_output())
    if backend == "emulate":
        assert error.type is KernelCompileError and "error:" in str(error.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("name", list(GUARDS))
def test_guard_disables_a_faulty_kernel_with_one_warning(inject_fault, capsys, name, fault,
                                                         backend):
    kernel_guard = GUARDS[name]
    inject_fault(name, fault)
    dims = (3, 48, 96) if name == "gla" else (6, 2, 32)
    for dtype in (mx.float32, mx.bfloat16, mx.float32):
        assert not kernel_guard.usable(backend, dtype, dims)
    lines = warning_lines(capsys)
    assert len(lines) == 1, lines
    assert kernel_guard.title in lines[0] and "genesis-mlx doctor" in lines[0]
    assert ("error" in lines[0]) if fault == "syntax" else ("differs from the ops path" in lines[0])
    assert kernel_guard.state(backend).startswith("disabled: ")
    assert all(g.state(backend) == "not checked yet" for g in guard.guards().values()
               if g is not kernel_guard)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_dispatch_takes_the_ops_path_for_a_faulty_kernel(inject_fault, capsys, kernels_choice,
                                                         fault):
    """gla and fox_attend, every call after the first check included."""
    kernels_choice("emulate")
    inject_fault("gla", fault)
    inject_fault("fox", fault)
    q, k, v, g, scale, s = gla_case(T=5)
    want, want_state = gla_chunked(q, k, v, g, scale, 64, s)
    tol, state_tol = (r.tolerance for r in ops_rounding(gla_chunked, q, k, v, g, scale, 64, s))
    fox = fq, fk, fv, cq, ck, fscale, key_start = fox_case()
    fox_want, fox_tol = fox_attention(*fox), ops_rounding(fox_attention, *fox).tolerance
    for _ in range(3):
        out, state = gla(q, k, v, g, scale, 64, s, cached=True)
        assert max_difference(want, out) <= tol and max_difference(want_state, state) <= state_tol
        assert max_difference(fox_want, fox_attend(*fox)) <= fox_tol
    assert len(warning_lines(capsys)) == 2  # one per kernel


def test_probe_runs_once_per_backend_and_dtype(kernels_choice, monkeypatch):
    kernels_choice("emulate")
    calls = []
    compare = gla_kernel.GUARD.compare
    monkeypatch.setattr(gla_kernel.GUARD, "compare", lambda *a: calls.append(a) or compare(*a))
    for dtype in (mx.float32,) * 4 + (mx.bfloat16,) * 3 + (mx.float32,):
        q, k, v, g, scale, s = gla_case(dtype)
        gla(q, k, v, g, scale, 64, s, cached=True)
    assert len(calls) == 2


@pytest.mark.parametrize("fault", [None, "syntax", "wrong"])
def test_first_use_check_runs_inside_mx_compile(inject_fault, capsys, fault):
    """The GPU decode step traces the GLA layer with mx.compile, so the first check
    may happen during the trace: the probe still runs, and the verdict is traced."""
    if fault:
        inject_fault("gla", fault)

    @mx.compile
    def step(x):
        return x + float(gla_kernel.GUARD.usable("emulate", x.dtype, (3, 48, 96)))

    assert step(mx.zeros((2,))).tolist() == ([1.0, 1.0] if fault is None else [0.0, 0.0])
    assert len(warning_lines(capsys)) == (0 if fault is None else 1)


# The prompt's length: past the GLA kernel's 64 tokens (on a GPU its first use is then
# in the compiled decode step) and, on a GPU, as long as FoX's kernel needs.
PROMPT = 1030 if GPU else 70


@pytest.fixture(scope="module")
def ops_logits(reference_checkpoint):
    from genesis_mlx.kernels import backend

    previous = backend.selected_kernels()
    backend.select_kernels("off")
    try:
        return model_logits(reference_checkpoint, PROMPT)
    finally:
        backend.select_kernels(previous)


def model_logits(reference_checkpoint, n_prompt):
    """A prompt, then 8 tokens one at a time."""
    from conftest import CONFIGS, mlx_model, tokens

    _, path = reference_checkpoint(**CONFIGS["gqa3"])
    ids = tokens(n_prompt + 8)
    model = mlx_model(path)
    cache = model.make_cache()
    outs = [model(mx.array(ids[:, :n_prompt]), cache=cache)]
    outs += [model(mx.array(ids[:, t : t + 1]), cache=cache) for t in range(n_prompt, n_prompt + 8)]
    return np.concatenate([np.array(o) for o in outs], axis=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("name", ["gla", "fox"])
def test_whole_model_with_a_faulty_kernel_equals_ops(inject_fault, capsys, kernels_choice,
                                                     reference_checkpoint, ops_logits,
                                                     name, fault, backend):
    inject_fault(name, fault)
    kernels_choice("emulate" if backend == "emulate" else "auto")
    from conftest import CONFIGS, logits_tolerance, tokens

    got = model_logits(reference_checkpoint, PROMPT)
    ref, _ = reference_checkpoint(**CONFIGS["gqa3"])
    assert np.abs(got - ops_logits).max() <= logits_tolerance(ref, tokens(PROMPT + 8))
    lines = warning_lines(capsys)
    assert len(lines) == 1 and GUARDS[name].title in lines[0], lines
