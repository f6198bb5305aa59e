"""LoRA fine-tuning on mlx-lm's tuner: its LoRA layers, datasets, trainer and adapter
files. What is Genesis-specific: which projections get adapters, training semantics
(TTT and selective activation off, as the reference does in training mode), and
checking the user's data and paths before anything runs."""

import contextlib
import json
import os
import re
import sys
import tempfile
import types
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..checks import check_at_least_one, check_finite, check_seed
from ..conversion.checkpoint import read_safetensors_header, safetensors_damage
from ..errors import GenesisError
from ..output_dir import (ADAPTERS, check_output_dir, is_write_error, listing,
                          write_error_reason, write_output_dir)
from .adapters import check_adapters_exist, load_adapters

# Projections that get adapters: attention (GLA and FoX) and the FFN. The per-head
# gate projections (gk/b/fgate, output width n_head) stay frozen.
LORA_KEYS = [
    "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "attn.g_proj",
    "attn.ogate_proj", "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj",
]
DATA_FORMATS = ({"messages"}, {"prompt", "completion"}, {"text"})
# Written next to the adapters: every loss report, unrounded (JSON lines).
TRAIN_LOG = "train_log.jsonl"


def data_format(record) -> Optional[str]:
    if isinstance(record, dict):
        for keys in DATA_FORMATS:
            if keys <= record.keys():
                return "/".join(sorted(keys))
    return None


def record_problem(record: dict, kind: str) -> Optional[str]:
    """What mlx-lm would fail on (a traceback) or train on as garbage (a null rendered
    as the text "None") in a record of format ``kind``."""
    if kind == "text":
        text = record["text"]
        return None if isinstance(text, str) and text else "'text' must be a non-empty string"
    if kind == "completion/prompt":
        if not all(isinstance(record[key], str) for key in ("prompt", "completion")):
            return "'prompt' and 'completion' must be strings"
        return None
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
               and isinstance(m.get("content"), str) for m in messages):
        return "each message must be an object with 'role' and 'content' strings"
    return None


def check_jsonl(path: Path) -> Tuple[int, Optional[str]]:
    """(examples, format): every line must be a JSON object in one of the formats
    mlx-lm reads, all of a file's in the same one (mlx-lm picks the format from the
    first); mlx-lm parses every line, blank ones too."""
    count, first = 0, None
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                raise GenesisError(f"{path}:{number}: blank line; remove it (every line "
                                   "must be one JSON example)")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GenesisError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            kind = data_format(record)
            if kind is None:
                raise GenesisError(
                    f"{path}:{number}: expected an object with 'messages', 'prompt' and "
                    "'completion', or 'text'")
            problem = record_problem(record, kind)
            if problem:
                raise GenesisError(f"{path}:{number}: {problem}")
            first = first or kind
            if kind != first:
                raise GenesisError(f"{path}:{number}: '{kind}' record in a file of '{first}' "
                                   "records; use one format per file")
            count += 1
    return count, first


def check_split(path: Path, used: bool, batch_size: int, mask_prompt: bool):
    """mlx-lm reads every file present (an empty one fails inside it) and batches
    those it uses: each must fill a batch."""
    try:
        count, kind = check_jsonl(path)
    except UnicodeDecodeError as e:
        raise GenesisError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if count == 0:
        raise GenesisError(f"{path} is empty: it holds no examples; add some, or delete "
                           "the file")
    if used and count < batch_size:
        raise GenesisError(f"{path} holds {count} example(s), fewer than --batch-size "
                           f"{batch_size}; add examples or lower --batch-size")
    if mask_prompt and kind == "text":
        raise GenesisError(f"--mask-prompt needs 'messages' or 'prompt'/'completion' "
                           f"records; {path} holds 'text' records")


def check_data(data_dir: Path, train: bool, test: bool, batch_size: int = 1,
               mask_prompt: bool = False):
    if not data_dir.is_dir():
        raise GenesisError(f"--data {data_dir}: not a directory (it must hold train.jsonl, "
                           "valid.jsonl, optionally test.jsonl)")
    # Training validates on valid.jsonl when it is there.
    used = {"train.jsonl": train, "valid.jsonl": train, "test.jsonl": test}
    for name, is_used in used.items():
        path = data_dir / name
        if path.exists():
            check_split(path, is_used, batch_size, mask_prompt)
        elif is_used and name != "valid.jsonl":
            raise GenesisError(f"--data {data_dir}: {name} is missing")


def check_options(train: bool, test: bool, batch_size: int, iters: int,
                  num_layers: Optional[int], rank: int, seed: int, learning_rate: float,
                  scale: float):
    """The numbers a run needs, checked before the model loads."""
    if not (train or test):
        raise GenesisError("nothing to do: pass --train to fine-tune adapters, --test to "
                           "report the loss on test.jsonl, or both")
    check_at_least_one("--batch-size", batch_size)
    check_at_least_one("--iters", iters)
    check_at_least_one("--rank", rank)
    if num_layers is not None:
        check_at_least_one("--num-layers", num_layers)
    check_seed(seed)
    check_finite("--learning-rate", learning_rate)
    check_finite("--scale", scale)


def check_adapter_dir(adapter_path: Path, resume: Optional[str], force: bool):
    """Where training writes; resuming continues in a directory that holds adapters."""
    if resume is not None and not Path(resume).is_file():
        raise GenesisError(f"--resume-adapter-file {resume}: no such file")
    check_output_dir(adapter_path, force or resume is not None, "--adapter-path", ADAPTERS)


def resume_tensors(resume: str, rank: int) -> dict:
    """The adapters --resume-adapter-file holds (name -> (shape, dtype)): a whole
    file of LoRA adapters of the run's rank (mlx-lm loads what fits, silently)."""
    flag = f"--resume-adapter-file {resume}"
    damage = safetensors_damage(Path(resume))
    if damage:
        raise GenesisError(f"{flag} is damaged or incomplete ({damage}); pass a whole "
                           "adapters file (a NNNNNNN_adapters.safetensors checkpoint, say)")
    _, tensors = read_safetensors_header(Path(resume))
    others = sorted(n for n in tensors if not n.endswith((".lora_a", ".lora_b")))
    if not tensors or others:
        what = f"other weights ({listing(others)})" if others else "nothing"
        raise GenesisError(f"{flag} holds {what}, not LoRA adapters; pass an "
                           "adapters.safetensors written by genesis-mlx lora")
    ranks = sorted({shape[1] for name, (shape, _) in tensors.items() if name.endswith(".lora_a")})
    if ranks != [rank]:
        raise GenesisError(f"{flag} holds adapters of rank {listing([str(r) for r in ranks])}, "
                           f"not --rank {rank}; pass --rank {ranks[0]} to resume them")
    return tensors


def linear_dims(layer) -> Tuple[int, int]:
    """(input, output) width of a Linear or QuantizedLinear (packed input)."""
    out_dims, in_dims = layer.weight.shape
    bits = getattr(layer, "bits", None)
    return (in_dims * 32 // bits if bits else in_dims), out_dims


def check_resume_fits(resume: str, tensors: dict, model, num_layers: int, rank: int):
    """Each adapter names a projection this run adapts, at its shape."""
    first = len(model.layers) - num_layers
    adapted = {}
    for name, layer in model.named_modules():
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if match and int(match.group(1)) >= first and match.group(2) in LORA_KEYS:
            adapted[name] = layer
    for name, (shape, _) in sorted(tensors.items()):
        module, leaf = name.rsplit(".", 1)
        if module not in adapted:
            raise GenesisError(
                f"--resume-adapter-file {resume} holds an adapter for {module}, which this "
                f"run does not adapt (--num-layers {num_layers}: blocks {first} to "
                f"{len(model.layers) - 1}); pass the --num-layers it was trained with")
        in_dims, out_dims = linear_dims(adapted[module])
        want = (in_dims, rank) if leaf == "lora_a" else (rank, out_dims)
        if tuple(shape) != want:
            raise GenesisError(
                f"--resume-adapter-file {resume}: {name} has shape {tuple(shape)}, this model "
                f"needs {want}; were the adapters trained on another model?")


def check_run(args: types.SimpleNamespace, model=None):
    """Everything checkable before training, given run_lora's ``args``; the layer
    count once ``model`` is loaded."""
    check_options(args.train, args.test, args.batch_size, args.iters, args.num_layers,
                  args.lora_parameters["rank"], args.seed, args.learning_rate,
                  args.lora_parameters["scale"])
    check_data(Path(args.data), args.train, args.test, args.batch_size, args.mask_prompt)
    rank, resume = args.lora_parameters["rank"], args.resume_adapter_file
    if args.train:
        check_adapter_dir(Path(args.adapter_path), resume, getattr(args, "force", False))
        tensors = resume_tensors(resume, rank) if resume is not None else None
    else:
        check_adapters_exist(Path(args.adapter_path))
    if model is not None and args.num_layers > len(model.layers):
        raise GenesisError(f"--num-layers {args.num_layers}: the model has "
                           f"{len(model.layers)} layers")
    if model is not None and args.train and resume is not None:
        check_resume_fits(resume, tensors, model, args.num_layers, rank)


def check_world(batch_size: int):
    """The process group (one process unless started by mlx.launch): mlx-lm's trainer
    gives each process batch_size / size rows of every batch and averages gradients."""
    import mlx.core as mx

    world = mx.distributed.init()
    if batch_size % world.size():
        raise GenesisError(f"--batch-size {batch_size}: must be a multiple of the "
                           f"{world.size()} processes training together")
    return world


def train_elsewhere(args, model, train_set, valid_set):
    """A process other than the first: trains its share, silently, with adapters and
    their config written to a scratch directory (the first process writes the user's)."""
    from mlx_lm.lora import train_model

    with tempfile.TemporaryDirectory(prefix="genesis-lora-rank-") as scratch:
        own = types.SimpleNamespace(**{**vars(args), "adapter_path": scratch})
        train_model(own, model, train_set, valid_set, None)


# Those mlx-lm's train_model builds.
OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor", "muon")


def training_args(**options) -> types.SimpleNamespace:
    """The namespace mlx-lm's ``train_model`` reads (its CONFIG_DEFAULTS, then ours)."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    args = dict(CONFIG_DEFAULTS)
    args.update(options)
    args["lora_parameters"] = dict(args["lora_parameters"], keys=LORA_KEYS)
    return types.SimpleNamespace(**args)


def progress_callback(log_path: Optional[Path] = None, out=None):
    """Prints every report of mlx-lm's trainer once, as plain text (to ``out``, default
    the standard output as it is now), with peak memory, and writes it unrounded to
    ``log_path`` (JSON lines) for plots and checks. Iterations are the optimizer steps
    done: a validation loss is computed before its iteration's step, so the one
    mlx-lm runs at iteration N (a multiple of --steps-per-eval) is reported at N - 1."""
    from mlx_lm.tuner.callbacks import TrainingCallback

    out = out or sys.stdout

    def log(record):
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    class Progress(TrainingCallback):
        def on_train_loss_report(self, info):
            print(f"[genesis-mlx] iter {info['iteration']}: train loss {info['train_loss']:.3f}, "
                  f"{info['tokens_per_second']:.1f} tok/s, peak memory "
                  f"{info['peak_memory']:.2f} GB", file=out, flush=True)
            log({"iteration": info["iteration"], "train_loss": info["train_loss"],
                 "learning_rate": info["learning_rate"]})

        def on_val_loss_report(self, info):
            print(f"[genesis-mlx] iter {info['iteration']}: val loss {info['val_loss']:.3f} "
                  f"({info['val_time']:.1f} s)", file=out, flush=True)
            log({"iteration": info["iteration"], "val_loss": info["val_loss"]})

    return Progress()


@contextlib.contextmanager
def without_mlx_lm_display():
    """mlx-lm's header panel, loss table and progress bar print through its shared
    rich console, in colour even into a file, numbering validation reports one
    iteration later than its callback does: sent to nowhere while it trains, so that
    progress_callback prints each report once. (A console writing to a file that is
    not a terminal also keeps rich from taking over sys.stdout for its bar.)"""
    from mlx_lm.cli_ui import make_console

    console = make_console()
    with open(os.devnull, "w") as sink:
        console.file = sink
        try:
            yield
        finally:
            console.file = None  # back to the standard output of the moment


def print_run(args):
    print(f"[genesis-mlx] training LoRA adapters (rank {args.lora_parameters['rank']}) on "
          f"the top {args.num_layers} layers: {args.iters} iterations of {args.batch_size} "
          f"examples, {args.optimizer} at learning rate {args.learning_rate:g}, into {args.adapter_path}",
          flush=True)


def keep_whole_saves(staging: Path) -> bool:
    """After a run stopped early: drops the files a save left cut short; whether
    whole adapters remain (then the run's saves are worth keeping)."""
    for path in staging.glob("*adapters.safetensors"):
        if safetensors_damage(path):
            path.unlink()
    return (staging / "adapters.safetensors").is_file()


def train_adapters(args: types.SimpleNamespace, model, train_set, valid_set, callback):
    """mlx-lm's training, into a staging directory that is then moved into place as
    convert writes a model (output_dir): the adapter directory never holds a file cut
    short (a full disk), nor adapters and a config of two runs. A run stopped early
    (Ctrl-C, a failure) keeps what it saved whole by then, if it saved adapters at
    all; else the directory is left as it was. With --force our earlier adapters go
    first; resuming keeps those the run does not replace."""
    from mlx_lm.lora import train_model

    target = Path(args.adapter_path).expanduser().resolve()
    stopped = []
    print_run(args)

    def fill(staging: Path):
        run = types.SimpleNamespace(**{**vars(args), "adapter_path": str(staging)})
        try:
            with without_mlx_lm_display():
                train_model(run, model, train_set, valid_set,
                            callback or progress_callback(staging / TRAIN_LOG))
        except BaseException as stop:
            if not keep_whole_saves(staging):
                raise
            stopped.append(stop)
        # mlx-lm records the directory it wrote to: the staging one.
        config_path = staging / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps(dict(config, adapter_path=str(target)), indent=4,
                                          sort_keys=True))

    resume = args.resume_adapter_file is not None
    write_output_dir(target, fill, ADAPTERS, force=getattr(args, "force", False) or resume,
                     flag="--adapter-path", keep_others=resume)
    if stopped and is_write_error(stopped[0]):
        raise GenesisError(f"cannot write the adapters to {target} "
                           f"({write_error_reason(stopped[0])}); it keeps those saved whole "
                           "before; check the disk space") from None
    if stopped:
        raise stopped[0]


def run_lora(model, tokenizer, args: types.SimpleNamespace, callback=None):
    """Trains (``args.train``) and/or tests (``args.test``) adapters on ``model``."""
    from mlx_lm.lora import evaluate_model
    from mlx_lm.tuner.datasets import load_dataset

    check_run(args, model)
    world = check_world(args.batch_size)
    np.random.seed(args.seed)  # mlx-lm's batch order: the same on every process
    train_set, valid_set, test_set = load_dataset(args, tokenizer)
    model.train()  # TTT and selective activation are inference-only, as in the reference
    if args.train and world.rank() == 0:
        train_adapters(args, model, train_set, valid_set, callback)
    elif args.train:
        train_elsewhere(args, model, train_set, valid_set)
    if args.test:
        if not args.train:
            load_adapters(model, args.adapter_path)
        model.eval()
        evaluate_model(args, model, test_set)
    model.eval()
    return model
