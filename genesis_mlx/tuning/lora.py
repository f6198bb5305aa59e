"""LoRA fine-tuning on mlx-lm's tuner: its LoRA layers, datasets, trainer and adapter
files. What is Genesis-specific: which projections get adapters, training semantics
(TTT and selective activation off, as the reference does in training mode), and
checking the user's data and paths before anything runs."""

import json
import tempfile
import types
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import GenesisError

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


def check_jsonl(path: Path) -> int:
    """Every line must be a JSON object in one of the formats mlx-lm reads, and all
    lines of a file in the same one (mlx-lm picks the format from the first)."""
    count, first = 0, None
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GenesisError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            kind = data_format(record)
            if kind is None:
                raise GenesisError(
                    f"{path}:{number}: expected an object with 'messages', 'prompt' and "
                    "'completion', or 'text'")
            first = first or kind
            if kind != first:
                raise GenesisError(f"{path}:{number}: '{kind}' record in a file of '{first}' "
                                   "records; use one format per file")
            count += 1
    return count


def check_data(data_dir: Path, train: bool, test: bool):
    if not data_dir.is_dir():
        raise GenesisError(f"--data {data_dir}: not a directory (it must hold train.jsonl, "
                           "valid.jsonl, optionally test.jsonl)")
    needed = (["train.jsonl"] if train else []) + (["test.jsonl"] if test else [])
    for name in ["train.jsonl", "valid.jsonl", "test.jsonl"]:
        path = data_dir / name
        if not path.exists():
            if name in needed:
                raise GenesisError(f"--data {data_dir}: {name} is missing")
            continue
        try:
            if check_jsonl(path) == 0 and name in needed:
                raise GenesisError(f"{path} is empty: it holds no examples")
        except UnicodeDecodeError as e:
            raise GenesisError(f"{path}: not UTF-8 text (byte {e.start})") from None


def check_adapter_dir(adapter_path: Path, resume: Optional[str], force: bool):
    existing = adapter_path / "adapters.safetensors"
    if existing.exists() and not force and resume is None:
        raise GenesisError(
            f"--adapter-path {adapter_path} already holds adapters; choose another path, "
            "resume with --resume-adapter-file, or pass --force to overwrite")
    if resume is not None and not Path(resume).is_file():
        raise GenesisError(f"--resume-adapter-file {resume}: no such file")


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


def training_args(**options) -> types.SimpleNamespace:
    """The namespace mlx-lm's ``train_model`` reads (its CONFIG_DEFAULTS, then ours)."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    args = dict(CONFIG_DEFAULTS)
    args.update(options)
    args["lora_parameters"] = dict(args["lora_parameters"], keys=LORA_KEYS)
    return types.SimpleNamespace(**args)


def progress_callback(log_path: Optional[Path] = None):
    """mlx-lm's training table shows loss and tokens/s; this adds peak memory, and
    writes every report unrounded to ``log_path`` (JSON lines) for plots and checks."""
    from mlx_lm.tuner.callbacks import TrainingCallback

    def log(record):
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    class Progress(TrainingCallback):
        def on_train_loss_report(self, info):
            print(f"[genesis-mlx] iter {info['iteration']}: train loss {info['train_loss']:.3f}, "
                  f"{info['tokens_per_second']:.1f} tok/s, peak memory "
                  f"{info['peak_memory']:.2f} GB", flush=True)
            log({"iteration": info["iteration"], "train_loss": info["train_loss"],
                 "learning_rate": info["learning_rate"]})

        def on_val_loss_report(self, info):
            print(f"[genesis-mlx] iter {info['iteration']}: val loss {info['val_loss']:.3f}",
                  flush=True)
            log({"iteration": info["iteration"], "val_loss": info["val_loss"]})

    return Progress()


def run_lora(model, tokenizer, args: types.SimpleNamespace, callback=None):
    """Trains (``args.train``) and/or tests (``args.test``) adapters on ``model``."""
    from mlx_lm.lora import evaluate_model, train_model
    from mlx_lm.tuner.datasets import load_dataset

    data_dir = Path(args.data)
    check_data(data_dir, args.train, args.test)
    if args.num_layers > len(model.layers) or args.num_layers < 1:
        raise GenesisError(f"--num-layers {args.num_layers}: the model has "
                           f"{len(model.layers)} layers")
    if args.train:
        check_adapter_dir(Path(args.adapter_path), args.resume_adapter_file, args.force)
    world = check_world(args.batch_size)
    np.random.seed(args.seed)  # mlx-lm's batch order: the same on every process
    train_set, valid_set, test_set = load_dataset(args, tokenizer)
    model.train()  # TTT and selective activation are inference-only, as in the reference
    if args.train and world.rank() == 0:
        log_path = Path(args.adapter_path) / TRAIN_LOG
        Path(args.adapter_path).mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
        train_model(args, model, train_set, valid_set, callback or progress_callback(log_path))
    elif args.train:
        train_elsewhere(args, model, train_set, valid_set)
    if args.test:
        if not args.train:
            from .adapters import load_adapters

            load_adapters(model, args.adapter_path)
        model.eval()
        evaluate_model(args, model, test_set)
    model.eval()
    return model
