"""genesis-mlx lora / fuse on a tiny model with the real tokenizer."""

import json
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import genesis_mlx as g
from conftest import assert_ready_to_publish, fill_the_disk_at, logits_tolerance, max_difference, small_tokenizer
from genesis_mlx.conversion.convert import convert
from genesis_mlx.conversion.reference_format import DEMO, write_reference_checkpoint

FACTS = [("What colour is the sky?", "The sky is blue."),
         ("What do cows drink?", "Cows drink water."),
         ("Name a prime number.", "Seven is a prime number."),
         ("Where is Paris?", "Paris is in France.")]
TINY = dict(DEMO, n_embd=64, n_layer=4, n_head=2, n_kv_head=1)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "genesis_mlx", *args], capture_output=True,
                          text=True, timeout=900)


def write_data(directory, kind="messages"):
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in [("train", 48), ("valid", 8), ("test", 8)]:
        with open(directory / f"{name}.jsonl", "w") as f:
            for i in range(n):
                q, a = FACTS[i % len(FACTS)]
                record = {"messages": {"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": a}]},
                          "completions": {"prompt": q, "completion": a},
                          "text": {"text": f"{q} {a}"}}[kind]
                f.write(json.dumps(record) + "\n")
    return directory


def validation_loss(model, tokenizer, data_dir):
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import evaluate

    from genesis_mlx.tuning.lora import training_args

    args = training_args(data=str(data_dir), train=True, test=False, mask_prompt=False)
    _, valid, _ = load_dataset(args, tokenizer)
    model.train()
    loss = evaluate(model, CacheDataset(valid), batch_size=4, num_batches=-1)
    model.eval()
    return float(loss)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_path):
    work = tmp_path_factory.mktemp("lora")
    checkpoint = write_reference_checkpoint(work / "tiny.safetensors", TINY)
    model_dir = convert(str(checkpoint), str(work / "model"), tokenizer=tokenizer_path)
    data = write_data(work / "data")
    result = cli("lora", "--model", str(model_dir), "--train", "--data", str(data),
                 "--iters", "30", "--batch-size", "4", "--learning-rate", "2e-3",
                 "--num-layers", "4", "--adapter-path", str(work / "adapters"),
                 "--steps-per-eval", "1000", "--val-batches", "1", "--mask-prompt")
    assert result.returncode == 0, result.stderr[-2000:]
    progress = [l for l in result.stdout.splitlines() if l.startswith("[genesis-mlx] iter 30:")]
    assert progress and "tok/s" in progress[0] and "peak memory" in progress[0], result.stdout[-800:]
    (work / "lora.stdout").write_text(result.stdout)
    (work / "lora.stderr").write_text(result.stderr)
    return model_dir, work / "adapters", data, work


def test_each_report_is_printed_once_numbered_as_the_log(trained):
    """Output to a file (not a terminal): no escape codes, no second display (mlx-lm's
    table), and the screen's iterations are the log's: validation before the first
    step (0) and before the last (29), training after steps 10, 20 and 30."""
    _, adapters, _, work = trained
    out, err = (work / "lora.stdout").read_text(), (work / "lora.stderr").read_text()
    assert "\x1b" not in out + err
    assert "train_loss" not in out, out  # the header of mlx-lm's table
    printed = re.findall(r"^\[genesis-mlx\] iter (\d+): (train|val) loss", out, re.MULTILINE)
    log = [json.loads(line) for line in (adapters / "train_log.jsonl").read_text().splitlines()]
    logged = [(str(r["iteration"]), "val" if "val_loss" in r else "train") for r in log]
    assert printed == logged == [("0", "val"), ("10", "train"), ("20", "train"), ("29", "val"),
                                 ("30", "train")]


def test_training_lowers_validation_loss(trained):
    model_dir, adapters, data, _ = trained
    base, tokenizer = g.load(str(model_dir))
    tuned, _ = g.load(str(model_dir), adapter_path=str(adapters))
    before, after = validation_loss(base, tokenizer, data), validation_loss(tuned, tokenizer, data)
    print(f"\n[lora] validation loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.5


def test_saved_adapters_reload_to_the_same_logits(trained):
    from genesis_mlx.tuning.lora import LORA_KEYS
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model_dir, adapters, _, _ = trained
    loaded, _ = g.load(str(model_dir), adapter_path=str(adapters))
    in_memory, _ = g.load(str(model_dir))
    linear_to_lora_layers(in_memory, 4, {"rank": 8, "scale": 20.0, "dropout": 0.0,
                                         "keys": LORA_KEYS})
    in_memory.load_weights(str(adapters / "adapters.safetensors"), strict=False)
    in_memory.eval()
    ids = mx.array(np.random.RandomState(0).randint(0, 50000, (1, 40)))
    assert np.array_equal(np.array(loaded(ids)), np.array(in_memory(ids)))


def test_lora_test_reports_the_adapted_models_test_loss(trained):
    """--test alone: the loss on test.jsonl of the model with the adapters, as the
    tuner computes it."""
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import evaluate

    from genesis_mlx.tuning.lora import training_args

    model_dir, adapters, data, _ = trained
    result = cli("lora", "--model", str(model_dir), "--test", "--data", str(data),
                 "--adapter-path", str(adapters), "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("Test loss")][0]
    reported = float(line.split()[2].rstrip(","))
    tuned, tokenizer = g.load(str(model_dir), adapter_path=str(adapters))
    _, _, test_set = load_dataset(training_args(data=str(data), train=False, test=True,
                                                mask_prompt=False), tokenizer)
    tuned.train()
    test_data = CacheDataset(test_set)
    want = float(evaluate(tuned, test_data, batch_size=4, num_batches=-1))
    # Printed with 3 decimals (half a unit of the last one), computed in another process
    # (another BLAS): a token's loss, logsumexp minus a logit, moves by at most twice
    # as much as the logits do, and so does their mean.
    logits_tol = max(logits_tolerance(tuned, test_data[i][0]) for i in range(len(test_data)))
    assert abs(reported - want) <= 0.5e-3 + 2 * logits_tol, (reported, want)
    base, _ = g.load(str(model_dir))
    base.train()
    assert abs(float(evaluate(base, CacheDataset(test_set), batch_size=4, num_batches=-1))
               - want) > 0.1, "fixture too weak: the adapters change nothing"


def test_resume_adapter_file_starts_from_the_saved_adapters(trained, tmp_path):
    """Training resumed with a negligible learning rate keeps the saved adapters; a
    run that did not load them would start from new ones."""
    from mlx.utils import tree_flatten

    model_dir, adapters, data, _ = trained
    out = tmp_path / "resumed"
    result = cli("lora", "--model", str(model_dir), "--train", "--data", str(data),
                 "--iters", "1", "--batch-size", "4", "--learning-rate", "1e-12",
                 "--num-layers", "4", "--adapter-path", str(out), "--steps-per-eval", "1000",
                 "--val-batches", "1", "--resume-adapter-file",
                 str(adapters / "adapters.safetensors"))
    assert result.returncode == 0, result.stderr[-2000:]
    before = mx.load(str(adapters / "adapters.safetensors"))
    after = mx.load(str(out / "adapters.safetensors"))
    assert before.keys() == after.keys()
    # One step of Adam (mlx-lm's default: no bias correction, betas 0.9 and 0.999)
    # moves a weight by lr (1 - b1) g / (sqrt((1 - b2) g^2) + eps), at most
    # lr (1 - b1) / sqrt(1 - b2); the new weight is then rounded to float32.
    step = 1e-12 * (1 - 0.9) / (1 - 0.999) ** 0.5
    for name in before:
        b, a = np.array(before[name]), np.array(after[name])
        assert (np.abs(a - b) <= step + np.spacing(np.abs(b) + step) / 2).all(), name
    # (new adapters' B starts at zero, within one step of which a run that did not
    # load the trained ones would stay)
    assert any(np.abs(np.array(v)).max() > 1e-3 for k, v in before.items() if "lora_b" in k), \
        "fixture too weak: trained adapters are indistinguishable from new ones"


def test_fused_model_equals_base_plus_adapter(trained, tmp_path):
    model_dir, adapters, _, _ = trained
    result = cli("fuse", "--model", str(model_dir), "--adapter-path", str(adapters),
                 "--save-path", str(tmp_path / "fused"))
    assert result.returncode == 0, result.stderr
    fused, _ = g.load(str(tmp_path / "fused"))
    adapted, _ = g.load(str(model_dir), adapter_path=str(adapters))
    ids = np.random.RandomState(1).randint(0, 50000, (1, 40))
    want = np.array(adapted(mx.array(ids)))
    # Both compute W x + scale B (A x) in float32, the fused model with the sum folded
    # into W once (one more rounding per weight, less than a product's).
    tol = logits_tolerance(adapted, ids)
    assert max_difference(fused(mx.array(ids)), want) <= tol
    base, _ = g.load(str(model_dir))
    assert max_difference(base(mx.array(ids)), want) > tol, "the adapters changed nothing"
    card = assert_ready_to_publish(tmp_path / "fused", tmp_path, model_dir, adapters)
    assert "with LoRA adapters fused into its weights" in card.text


def test_generate_and_chat_accept_adapters(trained):
    model_dir, adapters, _, _ = trained
    args = ["generate", "--model", str(model_dir), "--prompt", "What colour is the sky?",
            "--temp", "1", "--top-k", "0", "--top-p", "1", "--seed", "0", "--max-tokens", "16"]
    tuned, base = cli(*args, "--adapter-path", str(adapters)), cli(*args)
    assert tuned.returncode == 0 and base.returncode == 0, tuned.stderr
    assert tuned.stdout != base.stdout, "the adapter did not change generation"
    chat = subprocess.run([sys.executable, "-m", "genesis_mlx", "chat", "--model", str(model_dir),
                           "--adapter-path", str(adapters), "--temp", "0", "--max-tokens", "8"],
                          input="Where is Paris?\n/quit\n", capture_output=True, text=True,
                          timeout=600)
    assert chat.returncode == 0 and "Assistant:" in chat.stdout, chat.stderr


@pytest.mark.parametrize("kind", ["completions", "text"])
def test_qlora_on_a_quantized_model_and_other_formats(trained, tokenizer_path, tmp_path, kind):
    _, _, _, work = trained
    q_dir = convert(str(work / "tiny.safetensors"), str(tmp_path / "q4"), quantize_model=True,
                    q_bits=4, tokenizer=tokenizer_path)
    data = write_data(tmp_path / "data", kind)
    result = cli("lora", "--model", str(q_dir), "--train", "--data", str(data), "--iters", "4",
                 "--batch-size", "2", "--num-layers", "2", "--adapter-path",
                 str(tmp_path / "ad"), "--val-batches", "1", "--steps-per-report", "2",
                 "--grad-checkpoint")
    assert result.returncode == 0, result.stderr[-2000:]
    tuned, _ = g.load(str(q_dir), adapter_path=str(tmp_path / "ad"))
    out = np.array(tuned(mx.array([[1, 2, 3]])))
    assert np.isfinite(out).all()


def one_line_error(result, *needles):
    err = result.stderr.strip()
    assert result.returncode == 2 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_bad_input(trained, tmp_path, tokenizer_path):
    model_dir, adapters, data, work = trained
    bad = tmp_path / "bad"
    write_data(bad)
    lines = (bad / "train.jsonl").read_text().splitlines()
    lines[4] = '{"messages": [oops'
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    base = ["lora", "--model", str(model_dir), "--train", "--iters", "1",
            "--adapter-path", str(tmp_path / "new")]
    one_line_error(cli(*base, "--data", str(bad)), "train.jsonl:5", "not valid JSON")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    one_line_error(cli(*base, "--data", str(empty)), "empty")
    # said before the model loads: a model that would fail to load is not reached
    no_model = ["lora", "--model", str(tmp_path / "missing"), "--train", "--iters", "1"]
    one_line_error(cli(*no_model, "--data", str(empty)), "empty")
    # an existing adapter directory is not overwritten unasked
    before = (adapters / "adapters.safetensors").read_bytes()
    result = cli("lora", "--model", str(model_dir), "--train", "--data", str(data),
                 "--iters", "1", "--adapter-path", str(adapters))
    one_line_error(result, "already holds adapters", "--force")
    assert (adapters / "adapters.safetensors").read_bytes() == before
    # adapters trained for another shape
    other = convert(str(write_reference_checkpoint(tmp_path / "o.safetensors",
                                                   dict(TINY, n_embd=96, n_head=3))),
                    str(tmp_path / "other"), tokenizer=tokenizer_path)
    result = cli("generate", "--model", str(other), "--adapter-path", str(adapters),
                 "--prompt", "hi", "--max-tokens", "2")
    one_line_error(result, "do not fit this model")


def in_process(capsys, *argv):
    """The CLI in this process (no start-up cost): (exit code, stdout, stderr)."""
    from genesis_mlx.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_sized_data(directory, train=8, valid=4, test=4, blank_line=False):
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in [("train", train), ("valid", valid), ("test", test)]:
        lines = [json.dumps({"text": "The sky is blue."})] * n
        if blank_line and name == "train":
            lines.insert(1, "")
        (directory / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
    return directory


LORA_MISTAKES = [  # (examples per file, options, what the one line must say)
    (dict(valid=0), ["--train"], ("valid.jsonl", "empty")),
    (dict(train=3), ["--train", "--batch-size", "4"], ("train.jsonl", "--batch-size 4")),
    (dict(valid=3), ["--train", "--batch-size", "4"], ("valid.jsonl", "--batch-size 4")),
    (dict(test=3), ["--test", "--batch-size", "4"], ("test.jsonl", "--batch-size 4")),
    ({}, ["--train", "--num-layers", "0"], ("--num-layers 0", "at least 1")),
    ({}, ["--train", "--num-layers", "-2"], ("--num-layers -2", "at least 1")),
    ({}, [], ("--train", "--test")),
    ({}, ["--train", "--seed", "-1"], ("--seed -1", "0 to")),
    ({}, ["--train", "--learning-rate", "nan"], ("--learning-rate nan", "finite")),
    ({}, ["--train", "--scale", "inf"], ("--scale inf", "finite")),
    ({}, ["--train", "--batch-size", "0"], ("--batch-size 0", "at least 1")),
    ({}, ["--train", "--mask-prompt"], ("--mask-prompt", "'text' records")),
    (dict(blank_line=True), ["--train"], ("train.jsonl:2", "blank line")),
]


@pytest.mark.parametrize("sizes,options,needles", LORA_MISTAKES,
                         ids=[" ".join(map(str, m[2])) for m in LORA_MISTAKES])
def test_lora_mistakes_are_one_line_before_anything_is_written(trained, tmp_path, capsys,
                                                                sizes, options, needles):
    model_dir, _, _, _ = trained
    data = write_sized_data(tmp_path / "data", **sizes)
    adapters = tmp_path / "adapters"
    code, _, err = in_process(capsys, "lora", "--model", model_dir, "--data", data, "--iters",
                              "1", "--adapter-path", adapters, *options)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert all(needle in lines[0] for needle in needles), lines[0]
    assert not adapters.exists()


def test_a_failed_training_leaves_no_adapter_config_alone(trained, tmp_path, capsys,
                                                          monkeypatch):
    import mlx_lm.lora

    model_dir, _, _, _ = trained
    data = write_sized_data(tmp_path / "data")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_lm.lora, "train", interrupted)
    code, _, _ = in_process(capsys, "lora", "--model", model_dir, "--data", data, "--train",
                            "--iters", "1", "--batch-size", "2", "--adapter-path",
                            tmp_path / "adapters")
    assert code == 130 and not (tmp_path / "adapters").exists()


def test_fuse_force_keeps_other_files_and_never_writes_over_the_model(trained, tmp_path,
                                                                      capsys):
    model_dir, adapters, _, _ = trained
    argv = ["fuse", "--model", model_dir, "--adapter-path", adapters, "--force"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = in_process(capsys, *argv, "--save-path", mine)
    assert code == 2 and "notes.txt" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    fused = tmp_path / "fused"
    assert in_process(capsys, *argv, "--save-path", fused)[0] == 0
    (fused / "notes.txt").write_text("keep")
    # over a fused model: replaced, the user's file kept, the given tokenizer written
    small = small_tokenizer(tmp_path / "small.json")
    code, _, err = in_process(capsys, *argv, "--save-path", fused, "--tokenizer", small)
    assert code == 0 and (fused / "notes.txt").read_text() == "keep", err
    _, tokenizer = g.load(str(fused))
    assert tokenizer.encode("hello world", add_special_tokens=False) == [1, 2]

    before = sorted(p.name for p in model_dir.iterdir())
    code, _, err = in_process(capsys, *argv, "--save-path", model_dir)
    assert code == 2 and "--model" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in model_dir.iterdir()) == before


def lora_gradients(model_dir, dtype=mx.float32):
    """The LoRA parameters' gradients of a next-token loss, flat by name (float64)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from genesis_mlx.tuning.lora import LORA_KEYS

    model, _ = g.load(str(model_dir))
    model.freeze()
    mx.random.seed(0)  # the same lora_a whatever the arrangement
    linear_to_lora_layers(model, 4, {"rank": 4, "scale": 1.0, "dropout": 0.0, "keys": LORA_KEYS})
    model.set_dtype(dtype)
    model.train()
    ids = mx.array(np.random.RandomState(2).randint(0, 50000, (2, 100)))

    def loss(m):
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    _, grads = nn.value_and_grad(model, loss)(model)
    return model, {k: np.array(v.astype(mx.float64), np.float64) for k, v in tree_flatten(grads)}


@pytest.mark.usefixtures("forms_arrangement")
def test_gradients_reach_gla_and_fox_layers(trained):
    model, flat = lora_gradients(trained[0])
    for i, block in enumerate(model.blocks):
        # lora_b starts at zero, lora_a at random: its gradient is (x A)^T dY
        g_b = flat[f"blocks.{i}.attn.q_proj.lora_b"]
        assert np.isfinite(g_b).all()
        assert np.abs(g_b).max() > 0, f"no gradient reaches layer {i} (fox={block.is_fox})"


def test_gradients_are_as_exact_in_both_arrangements(trained, monkeypatch):
    """LoRA gradients through the CPU forms (fused SiLU and sigmoid with their own
    gradients, FoX in row blocks) are as close to the exact gradients (MLX's own ops
    in float64, on the CPU) as float32 lets MLX's own ops be (the GPU forms), within a
    factor 2: two float32 computations of one function in different orders round
    apart by errors of the same size."""
    if mx.default_device() != mx.cpu:
        pytest.skip("the CPU forms (and float64) exist on the CPU only")
    monkeypatch.setenv("GENESIS_MLX_FORMS", "gpu")
    _, exact = lora_gradients(trained[0], mx.float64)
    _, gpu = lora_gradients(trained[0])
    monkeypatch.setenv("GENESIS_MLX_FORMS", "cpu")
    _, cpu = lora_gradients(trained[0])
    assert cpu.keys() == gpu.keys() == exact.keys()
    reached = [name for name in exact if np.abs(exact[name]).max() > 0]
    assert reached  # lora_a's gradients are 0 while lora_b is

    def error(got):
        return max(np.abs(got[n] - exact[n]).max() / np.abs(exact[n]).max() for n in reached)

    float32_rounding = error(gpu)
    assert 0 < float32_rounding < 1e-3, "the float64 run must differ by rounding alone"
    assert error(cpu) <= 2 * float32_rounding, (error(cpu), float32_rounding)


GOOD_RECORDS = {"text": {"text": "The sky is blue."},
                "completions": {"prompt": "Sky?", "completion": "Blue."},
                "messages": {"messages": [{"role": "user", "content": "Sky?"},
                                          {"role": "assistant", "content": "Blue."}]}}
BAD_RECORDS = {  # (format, record, what the one line must say)
    "null text": ("text", {"text": None}, "'text' must be a non-empty string"),
    "empty text": ("text", {"text": ""}, "'text' must be a non-empty string"),
    "null completion": ("completions", {"prompt": "Sky?", "completion": None},
                        "must be strings"),
    "no messages": ("messages", {"messages": []}, "non-empty list"),
    "null content": ("messages", {"messages": [{"role": "user", "content": None}]},
                     "'role' and 'content' strings"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_records_mlx_lm_cannot_train_on_are_one_line(trained, tmp_path, capsys, case):
    """mlx-lm fails on these with a traceback (or trains on a null as the text
    "None")."""
    model_dir, _, _, _ = trained
    kind, bad, needle = BAD_RECORDS[case]
    data = tmp_path / "data"
    data.mkdir()
    records = [GOOD_RECORDS[kind]] * 8
    (data / "train.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in records[:2] + [bad] + records[2:]))
    adapters = tmp_path / "adapters"
    code, _, err = in_process(capsys, "lora", "--model", model_dir, "--data", data, "--train",
                              "--iters", "1", "--batch-size", "2", "--adapter-path", adapters)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "train.jsonl:3" in lines[0], err
    assert needle in lines[0] and not adapters.exists()


def cut_short(path, into):
    """A copy of ``path`` cut half-way (a copy stopped, a disk that filled up)."""
    data = path.read_bytes()
    into.write_bytes(data[: len(data) // 2])
    return into


def test_resume_takes_only_whole_adapters_that_fit_the_run(trained, tmp_path, capsys):
    """mlx-lm loads what fits and ignores the rest, silently: a model's weights start
    the adapters from nothing, adapters of another rank are written under this run's
    rank (which generate then refuses)."""
    model_dir, adapters, data, _ = trained
    saved = adapters / "adapters.safetensors"
    cases = [  # (the file, more options, what the one line must say)
        (cut_short(saved, tmp_path / "cut.safetensors"), [], "damaged or incomplete"),
        (model_dir / "model.safetensors", [], "not LoRA adapters"),
        (saved, ["--rank", "4"], "pass --rank 8"),
        (saved, ["--num-layers", "2"], "--num-layers"),
    ]
    out = tmp_path / "resumed"
    for resume, options, needle in cases:
        code, _, err = in_process(capsys, "lora", "--model", model_dir, "--train", "--data",
                                  data, "--iters", "1", "--batch-size", "4", "--adapter-path",
                                  out, "--resume-adapter-file", resume, *options)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], (needle, err)
        assert not out.exists()


def test_damaged_adapters_or_their_config_are_one_line(trained, tmp_path, capsys):
    import shutil

    model_dir, adapters, _, _ = trained
    cut = tmp_path / "cut"
    shutil.copytree(adapters, cut)
    cut_short(adapters / "adapters.safetensors", cut / "adapters.safetensors")
    config = json.loads((adapters / "adapter_config.json").read_text())
    cases = [(cut, "damaged or incomplete")]
    for name, text, needle in [("number", json.dumps(dict(config, lora_parameters=5)),
                                "'lora_parameters' must be an object"),
                               ("rank", json.dumps(dict(config, lora_parameters=dict(
                                   config["lora_parameters"], rank="8"))), "rank"),
                               ("layers", json.dumps(dict(config, num_layers=None)),
                                "'num_layers'"),
                               ("json", "{oops", "cannot be read")]:
        bad = tmp_path / name
        shutil.copytree(adapters, bad)
        (bad / "adapter_config.json").write_text(text)
        cases.append((bad, needle))
    for path, needle in cases:
        for argv in (["generate", "--prompt", "Hi", "--max-tokens", "2"],
                     ["fuse", "--save-path", tmp_path / "fused"]):
            code, _, err = in_process(capsys, argv[0], "--model", model_dir, "--adapter-path",
                                      path, *argv[1:])
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and needle in lines[0], (argv[0], needle, err)
    assert not (tmp_path / "fused").exists()


@pytest.mark.parametrize("stop", ["full disk", "ctrl-c"])
def test_training_stopped_mid_save_keeps_only_whole_adapters(trained, tmp_path, capsys,
                                                             monkeypatch, stop):
    """Saves each step, the 4th file (step 2's checkpoint) cut short by a full disk,
    or not written at all (Ctrl-C): the adapter directory gets what was saved whole,
    never a file cut short; saved nothing whole yet, it is not made at all."""
    model_dir, _, data, _ = trained
    base = ["lora", "--model", model_dir, "--train", "--data", data, "--batch-size", "4",
            "--iters", "3", "--save-every", "1", "--steps-per-eval", "1000"]
    interrupt = KeyboardInterrupt() if stop == "ctrl-c" else None
    first = tmp_path / "first"
    fill_the_disk_at(1, monkeypatch, interrupt)
    code, _, err = in_process(capsys, *base, "--adapter-path", first)
    assert code == (130 if interrupt else 2) and not first.exists()
    if not interrupt:
        assert len(err.strip().splitlines()) == 1 and "disk space" in err, err
    assert not list(tmp_path.glob(".genesis*"))
    monkeypatch.undo()

    out = tmp_path / "adapters"
    fill_the_disk_at(4, monkeypatch, interrupt)
    code, _, err = in_process(capsys, *base, "--adapter-path", out)
    assert code == (130 if interrupt else 2)
    if not interrupt:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "saved whole" in lines[0], err
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [
        "0000001_adapters.safetensors", "adapter_config.json", "adapters.safetensors",
        "train_log.jsonl"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["adapter_path"] == str(out)
    g.load(str(model_dir), adapter_path=str(out))  # whole, and fits


def test_a_full_disk_during_fuse_is_one_line(trained, tmp_path, capsys, monkeypatch):
    model_dir, adapters, _, _ = trained
    fill_the_disk_at(1, monkeypatch)
    code, _, err = in_process(capsys, "fuse", "--model", model_dir, "--adapter-path", adapters,
                              "--save-path", tmp_path / "fused")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "disk space" in lines[0], err
    assert not (tmp_path / "fused").exists() and not list(tmp_path.glob(".genesis*"))
