import os
import sys
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


def logits_tolerance(reference):
    return 1e-4 * max(1.0, float(np.abs(reference).max()))


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
