"""genesis-mlx convert: round trips, tokenizer, quantization, and bad input."""

import json
import os
import stat
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import reference as R
from conftest import U32, fill_the_disk_at, logits_tolerance, max_difference, measured, small_tokenizer
from genesis_mlx.conversion.convert import convert
from genesis_mlx.conversion.tokenizer import render_chat
from genesis_mlx.errors import GenesisError
from genesis_mlx.loading import load

IDS = np.random.RandomState(7).randint(0, 512, (1, 90))

# Storage dtypes and their unit roundoff (half the spacing above 1: 2 ** -(mantissa
# bits + 1)).
ROUND_TRIPS = {
    "float32": (dict(dtype="float32"), U32),
    "bfloat16": (dict(dtype="bfloat16"), 2.0**-8),
    "float16": (dict(dtype="float16"), 2.0**-11),
}


def cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "genesis_mlx", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def in_process(capsys, *argv):
    """The CLI in this process (no start-up cost): (exit code, stdout, stderr)."""
    from genesis_mlx.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error_in_process(outcome, *needles):
    code, _, err = outcome
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    from genesis_mlx.conversion.reference_format import DEMO, write_reference_checkpoint

    return write_reference_checkpoint(tmp_path_factory.mktemp("demo") / "demo.safetensors", DEMO)


@pytest.fixture(scope="module")
def tiny_with_real_vocab(reference_checkpoint):
    """Real vocabulary (50279 rows), tiny width: for tokenizer round trips."""
    return reference_checkpoint(vocab_size=50279, n_embd=32, n_head=2, n_kv_head=1)


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_round_trip(reference_checkpoint, tokenizer_path, tmp_path, case):
    """Every weight stored as the checkpoint's, rounded once to the dtype; the logits
    those weights give within the dtype's rounding of the forward."""
    from mlx.utils import tree_flatten

    from genesis_mlx.conversion.checkpoint import load_reference_checkpoint

    options, unit_roundoff = ROUND_TRIPS[case]
    ref, path = reference_checkpoint(vocab_size=50279)
    out = convert(str(path), str(tmp_path / case), tokenizer=tokenizer_path, **options)
    model, _ = load(str(out))
    stored = dict(tree_flatten(model.parameters()))
    _, weights = load_reference_checkpoint(path)
    assert stored.keys() == weights.keys()
    for key, value in weights.items():
        assert mx.array_equal(stored[key], value.astype(getattr(mx, case))), key
    got = model(mx.array(IDS))
    # The reference on the stored weights, in float32 and float64: the float32 forward's
    # rounding. To first order every rounding scales with the unit roundoff, so a
    # forward in the dtype rounds unit_roundoff / U32 times as much.
    model32, model64 = R.reference_of(model)
    exact = R.reference_logits_float64(model64, IDS)
    rounding = measured(R.reference_logits(model32, IDS), exact)
    assert max_difference(got, exact) <= rounding.tolerance * unit_roundoff / U32
    rel = max_difference(got, R.reference_logits(ref, IDS)) / np.abs(exact).max()
    print(f"\n[round trip] {case}: max |delta| / max |logit| against the checkpoint = {rel:.2e}")


def dequantized(directory):
    """A quantized directory's model with every quantized layer replaced by its
    dequantized weights (mlx-lm's dequantize_model)."""
    from mlx_lm.utils import dequantize_model

    return dequantize_model(load(str(directory))[0])


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_round_trip(reference_checkpoint, tokenizer_path, tmp_path, bits):
    """A quantized model computes what its dequantized weights compute (mlx-lm's own
    dequantize_model), and those are the checkpoint's within half a quantization step."""
    from genesis_mlx.conversion.checkpoint import load_reference_checkpoint

    ref, path = reference_checkpoint(vocab_size=50279)
    out = convert(str(path), str(tmp_path / f"q{bits}"), quantize_model=True, q_bits=bits,
                  q_group_size=64, tokenizer=tokenizer_path)
    model, _ = load(str(out))
    got = np.array(model(mx.array(IDS)))
    exact = np.array(dequantized(out)(mx.array(IDS)))
    assert np.abs(got - exact).max() <= logits_tolerance(model, IDS)
    _, weights = load_reference_checkpoint(path)
    quantized = [(n, m) for n, m in model.named_modules() if hasattr(m, "scales")]
    assert quantized
    for name, layer in quantized:
        shape = (-1, layer.group_size)
        want = np.array(weights[f"{name}.weight"], np.float64).reshape(shape)
        stored = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases,
                                        layer.group_size, layer.bits), np.float64).reshape(shape)
        # MLX's affine grid: 2 ** bits levels a step (|scale|) apart from the group's
        # larger end, the step adjusted so that 0 is a level. A weight is within half a
        # step of a level, or past the grid's far end by what the grid falls short of
        # the group's range; then float32 rounds scale * q + bias.
        step = np.abs(np.array(layer.scales, np.float64).reshape(-1, 1))
        bias = np.abs(np.array(layer.biases, np.float64).reshape(-1, 1))
        levels = 2**layer.bits - 1
        short = np.maximum(0.0, np.ptp(want, axis=-1, keepdims=True) - levels * step)
        bound = step / 2 + short + 2 * U32 * (levels * step + bias)
        assert (np.abs(stored - want) <= bound).all(), name
    rel = max_difference(got, R.reference_logits(ref, IDS)) / np.abs(exact).max()
    print(f"\n[round trip] q{bits}: max |delta| / max |logit| against the checkpoint = {rel:.2e}")


def test_quantization_handles_widths_not_divisible_by_group(reference_checkpoint,
                                                            tokenizer_path, tmp_path):
    _, path = reference_checkpoint(vocab_size=50279)
    out = convert(str(path), str(tmp_path / "q4"), quantize_model=True, q_bits=4,
                  q_group_size=64, tokenizer=tokenizer_path)
    model, _ = load(str(out))
    o_proj = model.blocks[0].attn.o_proj  # input width 96: not a multiple of 64
    down = model.blocks[0].ffn.down_proj  # input width 160
    q_proj = model.blocks[0].attn.q_proj  # input width 64
    assert isinstance(o_proj, nn.QuantizedLinear) and o_proj.group_size == 32
    assert isinstance(down, nn.QuantizedLinear) and down.group_size == 32
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.group_size == 64
    assert not isinstance(model.blocks[0].attn.gk_proj, nn.QuantizedLinear)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["blocks.0.attn.o_proj"]["group_size"] == 32


def reference_tokenizer(tokenizer_path, monkeypatch):
    """The reference's GPTNeoXTokenizer, with its Hub download pointed at the
    offline copy of the same tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    def offline(name, **kwargs):
        assert name == "EleutherAI/pythia-70m"
        return PreTrainedTokenizerFast(tokenizer_file=tokenizer_path,
                                       bos_token="<|endoftext|>", eos_token="<|endoftext|>")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    from genesis.tokenizer import GPTNeoXTokenizer

    tok = GPTNeoXTokenizer()
    tok.add_chat_tokens()
    return tok


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Say  hi\n\twith   spaces."},
     {"role": "assistant", "content": "hi"},
     {"role": "user", "content": "Ünïcödé, emoji 🙂 and <b>tags</b>"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_tokenizer_matches_reference(tiny_with_real_vocab, tokenizer_path, tmp_path,
                                     monkeypatch, messages):
    _, path = tiny_with_real_vocab
    out = convert(str(path), str(tmp_path / "m"), tokenizer=tokenizer_path)
    _, ours = load(str(out))
    ref = reference_tokenizer(tokenizer_path, monkeypatch)
    assert (ref.im_start_id, ref.im_end_id) == (50277, 50278)

    # The reference CLI's own prompt builder, on the same conversation.
    from genesis.cli import GenesisChat

    chat = GenesisChat.__new__(GenesisChat)
    system = [m for m in messages if m["role"] == "system"]
    chat.system_prompt = system[0]["content"] if system else "You are a helpful assistant."
    chat.history = [m for m in messages[:-1] if m["role"] != "system"]
    ref_text = chat.build_prompt(messages[-1]["content"])
    assert ref_text == render_chat(messages)
    ours_ids = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert ours_ids == ref.encode(ref_text)
    assert 50278 in ours.eos_token_ids


def write_checkpoint(path, state, metadata):
    from safetensors.numpy import save_file

    save_file(state, str(path), metadata=metadata)
    return path


def one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_give_one_line_errors(reference_checkpoint, tokenizer_path, tmp_path):
    _, good = reference_checkpoint()
    header_config = json.loads(json.dumps(R.asdict(R.make_config())))
    meta = {"genesis_config_json": json.dumps(header_config)}
    run = lambda src, *extra: cli("convert", "--hf-path", str(src), "--mlx-path",
                                  str(tmp_path / "out"), "--tokenizer", tokenizer_path, *extra)

    one_line_error(run(tmp_path / "missing.safetensors"), "no such file")
    pickle = tmp_path / "model.bin"
    pickle.write_bytes(b"\x80\x04\x95 not a safetensors file at all")
    one_line_error(run(pickle), "not a whole safetensors file")
    no_meta = write_checkpoint(tmp_path / "nometa.safetensors",
                               {"tok_emb.weight": np.zeros((4, 4), np.float32)}, {})
    one_line_error(run(no_meta), "genesis_147m", "tok_emb.weight")
    unknown = write_checkpoint(tmp_path / "unknown.safetensors",
                               {"tok_emb.weight": np.zeros((4, 4), np.float32)},
                               {"genesis_config_json": json.dumps({**header_config,
                                                                   "use_wormholes": True})})
    one_line_error(run(unknown), "unknown config key", "use_wormholes")

    from safetensors.numpy import load_file

    state = load_file(str(good))
    state["blocks.1.attn.q_proj.weight"] = state["blocks.1.attn.q_proj.weight"][:-1]
    bad_shape = write_checkpoint(tmp_path / "shape.safetensors", state, meta)
    one_line_error(run(bad_shape), "blocks.1.attn.q_proj.weight", "shape")
    del state["blocks.1.attn.q_proj.weight"]  # the reference would leave it random
    missing = write_checkpoint(tmp_path / "missing.safetensors", state, meta)
    one_line_error(run(missing), "Missing 1 parameters", "blocks.1.attn.q_proj.weight")

    offline = dict(__import__("os").environ, HF_HUB_OFFLINE="1")
    result = cli("convert", "--hf-path", "nobody/no-such-genesis", "--mlx-path",
                 str(tmp_path / "hub"), env=offline)
    one_line_error(result, "Hugging Face Hub", "local .safetensors")
    offline["HF_HOME"] = str(tmp_path / "empty-hf-cache")
    result = cli("convert", "--hf-path", str(good), "--mlx-path", str(tmp_path / "notok"),
                 env=offline)
    one_line_error(result, "EleutherAI/pythia-70m", "--tokenizer PATH")
    assert not (tmp_path / "notok").exists()


def test_default_tokenizer_comes_from_the_hub_snapshot(tokenizer_path, tmp_path, monkeypatch):
    """Without --tokenizer, pythia-70m's tokenizer files are fetched (here: a fake
    snapshot holding the same tokenizer.json) and loaded as a local file is."""
    import shutil

    import huggingface_hub

    from genesis_mlx.conversion.tokenizer import build_tokenizer

    asked = {}

    def snapshot(repo_id, allow_patterns=None, **kwargs):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        shutil.copy(tokenizer_path, tmp_path / "tokenizer.json")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    text = "<|im_start|>user\nHello, Genesis!<|im_end|>"
    assert build_tokenizer().encode(text) == build_tokenizer(tokenizer_path).encode(text)
    assert asked["repo_id"] == "EleutherAI/pythia-70m"
    assert "tokenizer.json" in asked["allow_patterns"]
    assert not any(p.endswith((".bin", ".safetensors", ".pt")) for p in asked["allow_patterns"])


def test_existing_output_is_not_overwritten(reference_checkpoint, tokenizer_path, tmp_path,
                                            capsys):
    _, path = reference_checkpoint(vocab_size=50279)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    # --force replaces a model, not a directory of someone else's files
    for force in ([], ["--force"]):
        outcome = in_process(capsys, "convert", "--hf-path", path, "--mlx-path", out,
                             "--tokenizer", tokenizer_path, *force)
        one_line_error_in_process(outcome, "notes.txt", "not part of a genesis-mlx model")
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
        assert (out / "notes.txt").read_text() == "precious"


def test_force_replaces_only_the_files_of_a_model(demo_checkpoint, tokenizer_path, tmp_path,
                                                  capsys):
    out = tmp_path / "model"
    convert(str(demo_checkpoint), str(out), tokenizer=tokenizer_path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask, "the directory is private"
    (out / "notes.txt").write_text("mine")
    (out / "model-00002-of-00002.safetensors").write_bytes(b"an earlier model's shard")
    argv = ["convert", "--hf-path", demo_checkpoint, "--mlx-path", f"{out}/",
            "--tokenizer", tokenizer_path, "-q"]
    one_line_error_in_process(in_process(capsys, *argv), "already holds a model", "--force")
    code, _, err = in_process(capsys, *argv, "--force")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "genesis.py", "model.safetensors",
        "model.safetensors.index.json", "notes.txt", "tokenizer.json", "tokenizer_config.json"]
    assert "quantization" in json.loads((out / "config.json").read_text())
    load(str(out))


def test_force_never_writes_over_a_directory_of_other_files(demo_checkpoint, tokenizer_path,
                                                            tmp_path, capsys, monkeypatch):
    # As typed in a directory of one's own: its files survive, one line says why.
    work = tmp_path / "d"
    work.mkdir()
    (work / "notes.txt").write_text("x")
    result = cli("convert", "--hf-path", str(demo_checkpoint), "--mlx-path", ".",
                 "--tokenizer", tokenizer_path, "--force", cwd=work)
    one_line_error(result, "--mlx-path .", "notes.txt", "new or empty directory")
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    argv = ["convert", "--hf-path", demo_checkpoint, "--tokenizer", tokenizer_path, "--force"]
    one_line_error_in_process(in_process(capsys, *argv, "--mlx-path", "~"), "home directory")
    assert not list(home.iterdir())

    from genesis_mlx.output_dir import MODEL, check_output_dir

    with pytest.raises(GenesisError, match="the root directory"):
        check_output_dir("/", True, "--mlx-path", MODEL)


def test_output_through_dot_trailing_slash_and_symlink(demo_checkpoint, tokenizer_path,
                                                       tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    argv = ["convert", "--hf-path", demo_checkpoint, "--tokenizer", tokenizer_path]
    code, _, err = in_process(capsys, *argv, "--mlx-path", ".")
    assert code == 0, err
    assert (empty / "config.json").is_file() and not list(empty.glob(".genesis*"))
    link = tmp_path / "link"
    link.symlink_to(empty)
    code, _, err = in_process(capsys, *argv, "--mlx-path", "../link/", "--force", "-q")
    assert code == 0, err
    assert link.is_symlink() and "quantization" in json.loads((empty / "config.json").read_text())


def test_an_interrupted_write_leaves_no_half_written_model(demo_checkpoint, tokenizer_path,
                                                           tmp_path, monkeypatch):
    from genesis_mlx import output_dir

    out = convert(str(demo_checkpoint), str(tmp_path / "m"), tokenizer=tokenizer_path)
    config = (out / "config.json").read_text()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    # Stopped while writing the new files: the old model is as it was.
    monkeypatch.setattr("genesis_mlx.conversion.convert.save_config", fail)
    with pytest.raises(KeyboardInterrupt):
        convert(str(demo_checkpoint), str(out), tokenizer=tokenizer_path, force=True,
                quantize_model=True)
    monkeypatch.undo()
    assert (out / "config.json").read_text() == config and not list(out.glob(".genesis*"))
    load(str(out))

    # Stopped while moving them in: the directory says so instead of loading.
    replace = output_dir.os.replace
    moved = []
    monkeypatch.setattr(output_dir.os, "replace",
                        lambda a, b: fail() if moved else moved.append(replace(a, b)))
    with pytest.raises(KeyboardInterrupt):
        convert(str(demo_checkpoint), str(out), tokenizer=tokenizer_path, force=True,
                quantize_model=True)
    monkeypatch.undo()
    with pytest.raises(GenesisError, match="interrupted.*--force"):
        load(str(out))
    convert(str(demo_checkpoint), str(out), tokenizer=tokenizer_path, force=True)
    load(str(out))


def test_q_bits_without_quantize_is_refused(demo_checkpoint, tokenizer_path, tmp_path, capsys):
    for option in (["--q-bits", "8"], ["--q-group-size", "32"]):
        outcome = in_process(capsys, "convert", "--hf-path", demo_checkpoint, "--mlx-path",
                             tmp_path / "q", "--tokenizer", tokenizer_path, *option)
        one_line_error_in_process(outcome, option[0], "-q")
        assert not (tmp_path / "q").exists()


def test_metadata_less_checkpoint_of_another_shape_gets_the_shape_error(
        demo_checkpoint, tokenizer_path, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(demo_checkpoint)), str(bare))
    outcome = in_process(capsys, "convert", "--hf-path", bare, "--mlx-path", tmp_path / "out",
                         "--tokenizer", tokenizer_path)
    one_line_error_in_process(outcome, "genesis_147m", "has shape", "implies")


def test_a_given_tokenizer_wins_over_the_models_own(demo_checkpoint, tokenizer_path, tmp_path,
                                                    monkeypatch):
    from genesis_mlx import loading

    monkeypatch.setattr(loading, "CACHE_ROOT", tmp_path / "cache")
    other = small_tokenizer(tmp_path / "small.json")
    converted = convert(str(demo_checkpoint), str(tmp_path / "m"), tokenizer=tokenizer_path)
    load(str(demo_checkpoint), tokenizer=tokenizer_path)  # the cache now has one too
    for source in (converted, demo_checkpoint):
        _, tok = load(str(source), tokenizer=other)
        assert tok.encode("hello world", add_special_tokens=False) == [1, 2], source
        _, own = load(str(source))
        assert own.encode("hello world", add_special_tokens=False) != [1, 2]


def test_cached_conversion_of_an_older_format_is_redone(tiny_with_real_vocab, tokenizer_path,
                                                        tmp_path, monkeypatch):
    """Raw checkpoints are converted once into the cache; a conversion written by an
    older version (no RoPE frequencies from the checkpoint) is converted again."""
    from genesis_mlx import loading
    from genesis_mlx.conversion.convert import FORMAT_VERSION

    _, path = tiny_with_real_vocab
    monkeypatch.setattr(loading, "CACHE_ROOT", tmp_path)
    target = loading.convert_once(path, tokenizer_path)
    config_file = target / "config.json"
    config = json.loads(config_file.read_text())
    assert config["genesis_mlx_format"] == FORMAT_VERSION and config["rope_inv_freq"]
    for key in ("genesis_mlx_format", "rope_inv_freq"):
        del config[key]
    config_file.write_text(json.dumps(config))
    assert loading.convert_once(path, tokenizer_path) == target
    config = json.loads(config_file.read_text())
    assert config["genesis_mlx_format"] == FORMAT_VERSION and config["rope_inv_freq"]


def test_loading_a_model_converted_by_an_older_version_says_so(tiny_with_real_vocab,
                                                               tokenizer_path, tmp_path, capsys):
    _, path = tiny_with_real_vocab
    out = convert(str(path), str(tmp_path / "mlx"), tokenizer=tokenizer_path)
    load(str(out))
    assert "older genesis-mlx" not in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    del config["genesis_mlx_format"]
    (out / "config.json").write_text(json.dumps(config))
    load(str(out))
    assert "converted by an older genesis-mlx" in capsys.readouterr().err


def test_files_without_metadata_get_the_references_default_config(tmp_path, monkeypatch):
    """Like the reference's CLI, a .safetensors without genesis_config_json is read as
    GenesisConfig.genesis_147m() (the vocabulary size taken from the weights)."""
    from safetensors.numpy import load_file, save_file

    from genesis_mlx.conversion import checkpoint
    from genesis_mlx.conversion.reference_format import DEMO, write_reference_checkpoint
    from genesis_mlx.model.genesis import ModelArgs

    want = R.asdict(R.genesis.GenesisConfig.genesis_147m())
    assumed = checkpoint.validate_config(checkpoint.config_from_metadata(tmp_path, {}))
    for name in ModelArgs.reference_fields():
        assert getattr(assumed, name) == want[name], name

    # The mechanism, on a small model standing in for genesis_147m.
    with_meta = write_reference_checkpoint(tmp_path / "meta.safetensors", DEMO)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(with_meta)), str(bare))
    monkeypatch.setattr(checkpoint, "GENESIS_147M", dict(DEMO, vocab_size=1))
    args, weights = checkpoint.load_reference_checkpoint(bare)
    expected_args, expected = checkpoint.load_reference_checkpoint(with_meta)
    assert args == expected_args
    assert all(mx.array_equal(weights[k], expected[k]).item() for k in expected)


def test_a_directory_without_tokenizer_needs_one_and_is_left_as_it_is(
        tiny_with_real_vocab, tokenizer_path, tmp_path, monkeypatch):
    """``bench`` writes model directories without a tokenizer; loading one says what to
    pass, and with --tokenizer it loads the same tokenizer a full conversion writes,
    without adding files to the user's directory."""
    monkeypatch.delenv("GENESIS_MLX_TOKENIZER", raising=False)
    _, path = tiny_with_real_vocab
    bare = convert(str(path), str(tmp_path / "bare"), with_tokenizer=False)
    full = convert(str(path), str(tmp_path / "full"), tokenizer=tokenizer_path)
    files = sorted(p.name for p in bare.iterdir())
    with pytest.raises(GenesisError, match="has no tokenizer.*--tokenizer"):
        load(str(bare))
    result = cli("generate", "--model", str(bare), "--prompt", "hi")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "has no tokenizer" in result.stderr and "Traceback" not in result.stderr

    _, given = load(str(bare), tokenizer=tokenizer_path)
    _, written = load(str(full))
    text = render_chat([{"role": "user", "content": "Hi there"}])
    assert given.encode(text) == written.encode(text)
    assert given.eos_token_ids == written.eos_token_ids
    assert sorted(p.name for p in bare.iterdir()) == files


def test_the_cli_starts_without_importing_mlx_lm():
    """The CLI re-executes itself to preload a BLAS: that first process must not pay
    for mlx-lm and transformers (~2.5 s here)."""
    code = ("import sys, genesis_mlx.cli.main, genesis_mlx.cpu.blas; "
            "print(sorted(m for m in ('mlx_lm', 'transformers', 'mlx.core') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import genesis_mlx as g
    from genesis_mlx.generation.steps import generate_step

    assert g.load is load and "stream_generate" in dir(g)
    assert g.generate_step is generate_step and "generate_step" in dir(g)


# config.json of a converted directory, changed: (changes, what the one line must say).
# None deletes the field; a string replaces the whole file.
BAD_CONFIGS = {
    "a word for a number": (dict(n_layer="eight"), ("n_layer", "an integer")),
    "a vocabulary past 32 bits": (dict(vocab_size=10**12), ("vocab_size", "positive integer")),
    "fewer layers than the weights": (dict(n_layer=4), ("n_layer=4", "8 layers")),
    "a negative layer count": (dict(n_layer=-1), ("n_layer", "positive integer")),
    "a billion layers": (dict(n_layer=10**9), ("n_layer=1000000000", "8 layers")),
    "no heads": (dict(n_head=0), ("n_head", "positive integer")),
    "a width the weights lack": (dict(n_embd=192), ("n_embd=192", "ln_f.omega")),
    "a vocabulary the weights lack": (dict(vocab_size=60000),
                                      ("vocab_size=60000", "tok_emb.weight")),
    "NaN as norm_eps": (dict(norm_eps=float("nan")), ("norm_eps", "finite")),
    "a context of 0": (dict(block_size=0), ("block_size", "positive integer")),
    "no n_embd": (dict(n_embd=None), ("has no 'n_embd'",)),
    "another model type": (dict(model_type="llama"), ("model_type", "'genesis'")),
    "heads that do not divide the width": (dict(n_head=5), ("not divisible by n_head=5",)),
    "RoPE frequencies that are not numbers": (dict(rope_inv_freq=[1, "a"]), ("rope_inv_freq",)),
    "not JSON": ("{n_layer: 8", ("not valid JSON",)),
    "a list": ("[]", ("not a JSON object",)),
}


@pytest.fixture(scope="module")
def demo_dir(demo_checkpoint, tokenizer_path, tmp_path_factory):
    return convert(str(demo_checkpoint), str(tmp_path_factory.mktemp("demo_dir") / "model"),
                   tokenizer=tokenizer_path)


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_bad_config_is_one_line_before_anything_is_built(demo_dir, tmp_path, capsys,
                                                           monkeypatch, case):
    """Each field is checked (type, range, against the weights' shapes) before the
    model is built: no traceback, and no model built from a config its weights do
    not fit (a billion layers would fill the memory)."""
    import shutil

    from genesis_mlx import loading

    changes, needles = BAD_CONFIGS[case]
    model = tmp_path / "model"
    shutil.copytree(demo_dir, model)
    if isinstance(changes, str):
        (model / "config.json").write_text(changes)
    else:
        config = json.loads((model / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                del config[key]
            else:
                config[key] = value
        (model / "config.json").write_text(json.dumps(config))

    def never_built(*args, **kwargs):
        raise AssertionError("the model was built from a config that does not fit")

    monkeypatch.setattr(loading, "load_genesis_model", never_built)
    for command in (["generate", "--prompt", "Hi", "--max-tokens", "2"], ["chat"]):
        outcome = in_process(capsys, command[0], "--model", model, *command[1:])
        one_line_error_in_process(outcome, *needles)
    # serve: mlx-lm builds the model itself, from what servable_dir lets through
    from genesis_mlx.serving import servable_dir

    with pytest.raises(GenesisError) as refused:
        servable_dir(str(model))
    assert all(needle in str(refused.value) for needle in needles), refused.value


def test_the_checks_pass_what_convert_writes(demo_dir, reference_checkpoint, tokenizer_path,
                                             tmp_path):
    """Float and quantized directories, of the demo and of the test models."""
    from genesis_mlx.loading import check_model_dir

    check_model_dir(demo_dir)
    for config in ("gqa", "mha", "gqa3", "variants"):
        from conftest import CONFIGS

        _, path = reference_checkpoint(**CONFIGS[config])
        check_model_dir(convert(str(path), str(tmp_path / config), with_tokenizer=False))
    check_model_dir(convert(str(path), str(tmp_path / "q4"), quantize_model=True,
                            with_tokenizer=False))


def test_convert_of_a_converted_model_says_so(demo_dir, tmp_path, capsys):
    """Its weights are MLX's, without the reference's config (else it is read with the
    one the reference assumes, and fails on a tensor's shape)."""
    for source in (demo_dir, demo_dir / "model.safetensors"):
        outcome = in_process(capsys, "convert", "--hf-path", source, "--mlx-path",
                             tmp_path / "again")
        one_line_error_in_process(outcome, "a model genesis-mlx converted", "--model")
    assert not (tmp_path / "again").exists()


def test_a_run_converting_into_the_same_new_directory_meanwhile_is_not_replaced(
        demo_checkpoint, tokenizer_path, tmp_path, monkeypatch):
    """Two converts into one new directory: the one that comes second (its check
    passed before the first one wrote) is refused, whenever the first one wrote."""
    from genesis_mlx.conversion import convert as convert_module

    target = tmp_path / "model"

    def first_writes_then(original):
        def wrapped(*args, **kwargs):
            monkeypatch.setattr(convert_module, original.__name__, original)
            convert(str(demo_checkpoint), str(target), tokenizer=tokenizer_path)
            return original(*args, **kwargs)
        return wrapped

    # The first run writes after the second one's check, before its write starts ...
    monkeypatch.setattr(convert_module, "load_reference_checkpoint",
                        first_writes_then(convert_module.load_reference_checkpoint))
    with pytest.raises(GenesisError, match="already holds a model"):
        convert(str(demo_checkpoint), str(target), tokenizer=tokenizer_path, dtype="bfloat16")
    assert load(str(target))[0].tok_emb.weight.dtype == mx.float32  # the first one's
    written = (target / "model.safetensors").read_bytes()
    # ... or while the second one writes its files.
    target2 = tmp_path / "model2"
    from mlx_lm import utils

    def first_writes_meanwhile(original):
        def wrapped(*args, **kwargs):
            monkeypatch.setattr(convert_module, "save_model", original)
            convert(str(demo_checkpoint), str(target2), tokenizer=tokenizer_path)
            return original(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(convert_module, "save_model", first_writes_meanwhile(utils.save_model))
    with pytest.raises(GenesisError, match="another run"):
        convert(str(demo_checkpoint), str(target2), tokenizer=tokenizer_path, dtype="bfloat16")
    assert load(str(target2))[0].tok_emb.weight.dtype == mx.float32  # the first one's
    assert (target / "model.safetensors").read_bytes() == written
    assert not list(tmp_path.glob(".genesis*"))


def test_a_full_disk_during_convert_is_one_line_and_the_old_model_stays(
        demo_checkpoint, tokenizer_path, tmp_path, monkeypatch, capsys):
    target = tmp_path / "model"
    old = convert(str(demo_checkpoint), str(target), tokenizer=tokenizer_path)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    fill_the_disk_at(1, monkeypatch)
    for out, force in ((target, ["--force"]), (tmp_path / "new", [])):
        outcome = in_process(capsys, "convert", "--hf-path", demo_checkpoint, "--mlx-path", out,
                             "--tokenizer", tokenizer_path, *force)
        one_line_error_in_process(outcome, f"cannot write {out}", "disk space")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".genesis*"))


def test_first_use_conversion_is_by_device_with_dtype_overriding_it(demo_checkpoint,
                                                                   tokenizer_path, tmp_path,
                                                                   monkeypatch):
    """A raw checkpoint converted on first use: float32 on the CPU, bfloat16 where the
    default device is a GPU (decoding reads every weight once a token), --dtype over
    either; each dtype is a conversion of its own in the cache."""
    import mlx.core as mx

    from genesis_mlx import loading
    from genesis_mlx.conversion import convert as conversion

    monkeypatch.setattr(loading, "CACHE_ROOT", tmp_path / "cache")

    def weight_dtype(model):
        return model.blocks[0].attn.q_proj.weight.dtype

    assert conversion.device_dtype() == "float32" and mx.default_device() == mx.cpu
    on_cpu, _ = load(str(demo_checkpoint), tokenizer=tokenizer_path)
    assert weight_dtype(on_cpu) == mx.float32
    half, _ = load(str(demo_checkpoint), tokenizer=tokenizer_path, dtype="bfloat16")
    assert weight_dtype(half) == mx.bfloat16
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 2
    monkeypatch.setattr(conversion.mx, "default_device", lambda: mx.Device(mx.gpu))
    assert conversion.device_dtype() == "bfloat16"
    assert loading.resolve_model_dir(str(demo_checkpoint), tokenizer_path) == \
        loading.resolve_model_dir(str(demo_checkpoint), tokenizer_path, dtype="bfloat16")
    with pytest.raises(GenesisError, match="--dtype float8"):
        loading.resolve_model_dir(str(demo_checkpoint), tokenizer_path, dtype="float8")
