import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

# GENESIS_MLX_TEST_TOKENIZER names it elsewhere (say, for the tests of an unpacked sdist).
SHARED_TOKENIZER = Path(os.environ.get("GENESIS_MLX_TEST_TOKENIZER") or
                        Path(__file__).resolve().parents[2] / "shared/tokenizers/gpt-neox/tokenizer.json")


# GQA 4:2 with FoX last; no GQA with FoX every other layer; GQA 6:2 (as the real
# model, 3:1) with expand_k giving an odd rotary split and FoX deep.
CONFIGS = {
    "gqa": dict(),
    "mha": dict(n_kv_head=4, hybrid_full_attn_ratio=0.5),
    "gqa3": dict(n_embd=96, n_head=6, n_kv_head=2, n_layer=5, hybrid_full_attn_ratio=0.2),
    # every optional branch the other way round
    "variants": dict(gla_use_short_conv=False, use_fox_pro=False, gla_use_mamba_gate=False,
                     gla_qk_norm="rms", gla_fuse_norm_gate=False, use_zero_centered_norm=False,
                     tie_word_embeddings=False, use_mup=False),
}


def mlx_model(path, **options):
    """A model loaded from a reference checkpoint, ``options`` set on its ModelArgs."""
    from genesis_mlx.conversion.checkpoint import load_reference_checkpoint
    from genesis_mlx.model.genesis import Model

    args, weights = load_reference_checkpoint(path)
    for key, value in options.items():
        setattr(args, key, value)
    model = Model(args)
    model.load_weights(list(weights.items()))
    model.eval()
    return model


def tokens(T, B=1, vocab=512, seed=0):
    return np.random.RandomState(seed + T).randint(0, vocab, (B, T))


# --- Tolerances -----------------------------------------------------------------
# A comparison of float32 results allows what float32 rounding explains: derived where
# a bound is known (a dot product, an exponential), otherwise measured on the spot
# against a float64 computation of the same thing, so that it follows the CPU, the
# BLAS and the weights at hand rather than one machine's figure.

# float32's unit roundoff: one rounding moves a value by at most this, relative.
U32 = 2.0**-24
# float32's smallest normal number: below it results may be flushed to 0.
SMALLEST_NORMAL = 2.0**-126

# How far apart in rounding two float32 evaluations of one computation may be. They
# differ in the order they accumulate in (BLAS blocking, SIMD lanes, a chunked scan
# against a recurrence, a fused kernel against separate ops). A sum's rounding grows
# like the square root of its accumulation chain's length for independent errors, and
# SIMD shortens a chain by its lane count, at most 16 float32 lanes (AVX-512): so an
# evaluation may round up to sqrt(16) = 4 times as much as the measured one, and two
# evaluations, each within that, are up to 2 * 4 of it apart.
SPREAD = 4


@dataclass
class Rounding:
    """The float32 rounding of a computation on given inputs: ``error``, the largest
    |float32 - float64| over its results, and ``scale``, their largest magnitude."""

    error: float
    scale: float

    def floor(self) -> float:
        # The results' own last rounding (one float32 spacing at the largest):
        # what no evaluation can promise better than.
        return float(np.spacing(np.float32(self.scale)))

    @property
    def tolerance(self) -> float:
        """Two float32 evaluations of the computation (ours against the reference, or
        two of our paths) agree within this."""
        return 2 * SPREAD * max(self.error, self.floor())

    def tolerance_for(self, values) -> float:
        """The tolerance for an intermediate of the computation (a cache array, a
        layer's output), relative to its size: the relative rounding of the results,
        which are built from it and carry its rounding on."""
        relative = max(self.error, self.floor()) / max(self.scale, np.finfo(np.float32).tiny)
        return 2 * SPREAD * relative * float(np.abs(as_float64(values)).max())


def as_float64(values) -> np.ndarray:
    import mlx.core as mx

    if isinstance(values, mx.array) and values.dtype != mx.float64:
        values = values.astype(mx.float32)  # numpy has no bfloat16
    return np.asarray(values, np.float64)


def measured(float32, float64) -> Rounding:
    float32, float64 = as_float64(float32), as_float64(float64)
    return Rounding(float(np.abs(float32 - float64).max()), float(np.abs(float64).max()))


# A forward's float32 error is largest at its few worst-conditioned positions, where
# each evaluation's rounding is a random draw along the direction that position
# amplifies: one draw can come out several times smaller than another. So a forward's
# rounding is the largest error of several draws: the reference's float32 forward as
# it is, and with every weight moved one float32 spacing up or down at random (one
# more rounding of each weight, as a fused or converted model has).
ROUNDING_DRAWS = 4


def logits_rounding(model, ids, delta_rule=False) -> Rounding:
    """The float32 rounding of a forward over ``ids`` (rows run one at a time): the
    reference's no-cache forward in float32 (ROUNDING_DRAWS draws) against the same
    in float64. ``model`` is a reference model, or an MLX model, whose weights and
    options the reference then takes (reference.reference_of: LoRA folded in, quantized
    weights dequantized). For a cache's or a batch's forward of the same network this
    is the scale of its rounding, not its exact value."""
    import torch

    import reference as R

    if isinstance(model, torch.nn.Module):
        model32, model64 = model, model
    else:
        model32, model64 = R.reference_of(model)
        delta_rule = delta_rule or model.args.gla_delta_rule_at_inference
    roundings = []
    for row in np.atleast_2d(np.asarray(ids)):
        exact = R.reference_logits_float64(model64, row[None], delta_rule)
        for draw in R.redrawn_weights(model32, ROUNDING_DRAWS):
            roundings.append(measured(R.reference_logits(draw, row[None], delta_rule), exact))
    return Rounding(max(r.error for r in roundings), max(r.scale for r in roundings))


def logits_tolerance(model, ids, delta_rule=False) -> float:
    return logits_rounding(model, ids, delta_rule).tolerance


def logprobs_tolerance(model, ids) -> float:
    """For log-probabilities (logits minus their logsumexp): each moves by at most its
    logit's change plus the largest logit change, twice the logits' tolerance."""
    return 2 * logits_tolerance(model, ids)


def ops_rounding(fn, *args):
    """The float32 rounding of an ops-path function on these inputs: ``fn`` again on
    float64 copies of its floating-point inputs (on the CPU, where MLX has float64).
    One Rounding per result (a tuple for several)."""
    import mlx.core as mx

    def widened(a):
        floating = isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating)
        return a.astype(mx.float64) if floating else a

    got = fn(*args)
    with mx.stream(mx.cpu):
        exact = fn(*[widened(a) for a in args])
        if isinstance(got, tuple):
            return tuple(measured(g, e) for g, e in zip(got, exact))
        return measured(got, exact)


def exp_error(x) -> np.ndarray:
    """Bound on the relative error of exp(x) evaluated in float32 as 2 ** (x log2 e),
    as fastmath and MLX's CPU backend do: log2 e rounded to float32 and the product
    rounded each move the exponent by up to u |x| log2 e, which moves 2 ** y by ln 2
    times that, relative (2 u |x| in all); 2 ** y itself is faithful (one unit in the
    last place, 2 u)."""
    return (2 * np.abs(as_float64(x)) + 2) * U32


def sigmoid_error(x) -> np.ndarray:
    """Relative error bound of a float32 sigmoid, 1 / (1 + exp(-x)): exp's, then one
    rounding for the sum and one for the reciprocal."""
    return exp_error(x) + 2 * U32


def sigmoid_derivative_error(x) -> np.ndarray:
    """Absolute error bound of a float32 sigmoid derivative s (1 - s): s's error (the
    derivative moves by at most as much) and two roundings (1 - s, the product); s
    flushed to 0 below the smallest normal."""
    x = as_float64(x)
    s = 1 / (1 + np.exp(-x))
    return s * sigmoid_error(x) + 2 * U32 * s * (1 - s) + SMALLEST_NORMAL


def silu_derivative_error(x) -> np.ndarray:
    """Absolute error bound of a float32 SiLU derivative s + x s (1 - s), s = sigmoid(x):
    s's error, through the derivative's dependence on s (at most 1 + |x|), four
    roundings of the terms (1 - s, two products, the sum); s flushed to 0 below the
    smallest normal."""
    x = as_float64(x)
    s = 1 / (1 + np.exp(-x))
    return ((s * sigmoid_error(x) + SMALLEST_NORMAL) * (1 + np.abs(x))
            + 4 * U32 * (s + np.abs(x) * s * (1 - s)))


def max_difference(a, b) -> float:
    return float(np.abs(as_float64(a) - as_float64(b)).max())


def small_tokenizer(path):
    """A tokenizer unlike GPT-NeoX: 'hello' is token 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "hello": 1, "world": 2},
                                     unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def assert_ready_to_publish(directory, *local_paths):
    """A model directory as the Hub and other tools want it: a model card with the
    Hub's front matter and how to run it with genesis-mlx and with mlx-lm's tools, a
    generation config whose stop tokens end a chat turn, and none of ``local_paths``
    (nor their parents two levels below / or deeper) in any of its files."""
    import json

    from huggingface_hub import ModelCard

    directory = Path(directory)
    card = ModelCard.load(directory / "README.md")
    assert card.data.library_name == "mlx" and card.data.pipeline_tag == "text-generation"
    assert card.data.license and {"mlx", "genesis-mlx", "custom_code"} <= set(card.data.tags)
    name = directory.name
    for usage in (f"genesis-mlx generate --model {name}",
                  f"mlx_lm.generate --model {name} --trust-remote-code"):
        assert usage in card.text, usage
    generation = json.loads((directory / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == [0, 50278]  # <|endoftext|>, <|im_end|>
    paths = {str(q) for p in local_paths for q in [Path(p), *Path(p).parents]
             if len(q.parts) > 2}
    for file in directory.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            found = [p for p in paths if p.encode() in data]
            assert not found, f"{file.name} holds {found}"
    return card


@pytest.fixture(scope="session")
def tokenizer_path():
    if not SHARED_TOKENIZER.is_file():
        pytest.fail(f"the offline GPT-NeoX tokenizer is missing: {SHARED_TOKENIZER} (set "
                    "GENESIS_MLX_TEST_TOKENIZER to its tokenizer.json)")
    return str(SHARED_TOKENIZER)


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """Builds (and caches) reference models and the checkpoints they write."""
    import reference as R

    made = {}

    def make(seed=0, diagonal_w0=False, **overrides):
        key = (seed, diagonal_w0, tuple(sorted(overrides.items())))
        if key not in made:
            model = R.build_reference(R.make_config(**overrides), seed, diagonal_w0=diagonal_w0)
            path = tmp_path_factory.mktemp("ckpt") / "genesis.safetensors"
            made[key] = (model, R.save_reference_checkpoint(model, path))
        return made[key]

    return make


@pytest.fixture(params=["cpu", "gpu"])
def forms_arrangement(request, monkeypatch):
    """The test runs under each arrangement of the model's math: the CPU's own forms
    (genesis_mlx.cpu) and MLX's own ops, as the model takes them on a GPU
    (GENESIS_MLX_FORMS=gpu)."""
    import mlx.core as mx

    if request.param == "cpu" and mx.default_device() != mx.cpu:
        pytest.skip("the CPU forms exist on the CPU only")
    monkeypatch.setenv("GENESIS_MLX_FORMS", request.param)
    return request.param


@pytest.fixture
def kernels_choice():
    """select_kernels for one test, the previous choice restored after it."""
    from genesis_mlx.kernels import backend

    previous = backend.selected_kernels()
    yield backend.select_kernels
    backend.select_kernels(previous)


# Fault injection into the kernel bodies. Every body has LINE; the faults are a syntax
# error for C++, Metal and CUDA alike, and a body that compiles but computes with twice
# the scale.
FAULT_LINE = "float sc = scale[0];"
FAULTS = {"syntax": "float sc = scale[0]", "wrong": "float sc = 2.0f * scale[0];"}
# name -> (module holding the Kernel, its attribute)
FAULTY_KERNELS = {"gla": ("gla.recurrent", "KERNEL"), "fox": ("fox.kernel", "KERNEL")}


@pytest.fixture
def fresh_guards():
    """No first-use verdict leaks into or out of a test (a kernel left disabled would
    let later kernel tests pass on the ops path)."""
    from genesis_mlx.kernels import guard

    for g in guard.guards().values():
        g.reset()
    yield
    for g in guard.guards().values():
        g.reset()


@pytest.fixture
def inject_fault(monkeypatch, fresh_guards):
    """inject_fault(kernel name, fault name): the kernel's module holds a Kernel with
    the shipped body so altered, for this test."""
    import importlib

    from genesis_mlx.kernels.launcher import SOURCE_DIR

    def inject(name, fault):
        module_name, attribute = FAULTY_KERNELS[name]
        module = importlib.import_module(f"genesis_mlx.kernels.{module_name}")
        kernel = getattr(module, attribute)
        body = (SOURCE_DIR / kernel.source).read_text()  # the shipped body, not an injected one
        assert body.count(FAULT_LINE) == 1, "the fault must land in the body"
        monkeypatch.setattr(module, attribute,
                            kernel.with_body(body.replace(FAULT_LINE, FAULTS[fault])))

    return inject


def fill_the_disk_at(call: int, monkeypatch, stop=None):
    """From the ``call``-th file MLX saves on (1-based), the disk is full: the write
    stops half-way through the file, with the error MLX raises then. ``stop``: an
    exception to raise instead, before that file is written (a Ctrl-C)."""
    import mlx.core as mx

    calls = []
    real = mx.save_safetensors

    def save(path, arrays, metadata=None):
        calls.append(path)
        if len(calls) < call:
            return real(path, arrays, metadata=metadata or {})
        if stop is not None:
            raise stop
        real(path, arrays)
        name = path if str(path).endswith(".safetensors") else f"{path}.safetensors"
        with open(name, "r+b") as f:
            f.truncate(os.path.getsize(name) // 2)
        raise RuntimeError("[write] Unable to write 8 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", save)
    return calls
