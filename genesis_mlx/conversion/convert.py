"""Reference checkpoint -> MLX model directory (config.json, model.safetensors,
tokenizer files), optionally cast or quantized."""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import save_config, save_model

from ..errors import GenesisError
from ..model.genesis import Model
from ..model.quantization import GROUP_SIZES, quant_predicate
from ..output_dir import MODEL, check_output_dir, write_output_dir
from .checkpoint import DEFAULT_REPO, is_hub_id, load_reference_checkpoint, resolve_source
from .mlx_lm_files import FORMAT_VERSION, write_model_file, write_tokenizer
from .model_card import write_model_card
from .tokenizer import build_tokenizer, stop_token_ids

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def quantize(model: nn.Module, config: dict, bits: int, group_size: int) -> dict:
    """Quantizes the model in place through mlx-lm's ``quantize_model``; returns the
    config with its "quantization" entry.

    Each layer gets the largest group size up to ``group_size`` that divides its
    input width (see model/quantization.py). mlx-lm skips the widths its own group
    size does not divide before asking the predicate, so it is given the smallest."""
    from mlx_lm.utils import quantize_model

    _, config = quantize_model(model, config, group_size=min(GROUP_SIZES), bits=bits,
                               mode="affine",
                               quant_predicate=quant_predicate(group_size, bits))
    # Every quantized layer is listed with its own size; the default says what was asked.
    config["quantization"].update(group_size=group_size, bits=bits, mode="affine")
    config["quantization_config"] = config["quantization"]
    return config


def write_model_dir(out: Path, model: nn.Module, write_rest: Callable[[Path], None],
                    force: bool, flag: str) -> Path:
    """Writes model.safetensors plus what ``write_rest`` adds, staged, then moved into
    place: an interrupted run leaves no half-written model. ``out`` was checked with
    check_output_dir(out, force, flag)."""
    def fill(staging: Path):
        save_model(staging, model)
        write_rest(staging)

    return write_output_dir(out, fill, MODEL, force, flag)


def build_model_tokenizer(source: Optional[str], vocab_size: int, context: int):
    """The Genesis tokenizer, checked to fit a checkpoint's embedding; ``context``:
    the model's block_size."""
    tok = build_tokenizer(source, context)
    if len(tok) > vocab_size:
        raise GenesisError(
            f"the tokenizer has {len(tok)} tokens but the checkpoint embeds only "
            f"{vocab_size}; pass the GPT-NeoX tokenizer the model was trained with"
        )
    return tok


def device_dtype() -> str:
    """A conversion's default dtype: decoding reads every weight once a token, and on a
    GPU bfloat16 halves those bytes; on the CPU, float32 (the reference's numbers)."""
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def convert(
    hf_path: str = DEFAULT_REPO,
    mlx_path: str = "genesis-mlx-model",
    dtype: Optional[str] = None,
    quantize_model: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    tokenizer: Optional[str] = None,
    force: bool = False,
    with_tokenizer: bool = True,
    revision: Optional[str] = None,
    repo_id: Optional[str] = None,
) -> Path:
    """``dtype``: default ``device_dtype()``; ``with_tokenizer=False`` writes the model
    alone (benchmarks of random models); ``revision`` pins a Hub repo's download (a
    commit, branch or tag); ``repo_id``: the Hub repo a local ``hf_path`` was
    downloaded from (at ``revision``).

    The directory records its source only as a Hub repo id (and revision), never as
    a local path: it may be published."""
    out = check_output_dir(mlx_path, force, "--mlx-path")
    dtype = dtype or device_dtype()
    if dtype not in DTYPES:
        raise GenesisError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if quantize_model and (q_bits not in (2, 3, 4, 5, 6, 8) or q_group_size not in GROUP_SIZES):
        raise GenesisError("quantization: --q-bits must be 2-6 or 8 and --q-group-size 32, 64 or 128")

    source = resolve_source(hf_path, None if repo_id else revision)
    args, weights = load_reference_checkpoint(source)
    tok = (build_model_tokenizer(tokenizer, args.vocab_size, args.block_size)
           if with_tokenizer else None)

    target = DTYPES[dtype]
    weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in weights.items()}
    model = Model(args)
    model.load_weights(list(weights.items()))
    config = asdict(args)
    if tok is not None:
        config["eos_token_id"] = stop_token_ids(tok)
    repo_id = repo_id or (hf_path if is_hub_id(hf_path) else None)
    if repo_id is not None:
        config["genesis_source"] = repo_id
    if revision is not None:
        config["genesis_revision"] = revision
    config["genesis_mlx_format"] = FORMAT_VERSION
    if quantize_model:
        config = quantize(model, config, q_bits, q_group_size)

    def write_rest(staging: Path):
        write_model_file(staging, config)
        save_config(config, staging / "config.json")
        write_model_card(staging, config, out.name)
        if tok is not None:
            write_tokenizer(tok, staging)

    return write_model_dir(out, model, write_rest, force, "--mlx-path")

def read_config(model_dir: Path) -> dict:
    """A model directory's config.json as a dict, or a one-line error."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise GenesisError(f"cannot read {path} ({e.strerror or e})") from None
    except ValueError as e:  # UnicodeDecodeError too
        raise GenesisError(f"{path} is not valid JSON ({e}); convert the checkpoint "
                           "again") from None
    if not isinstance(config, dict):
        raise GenesisError(f"{path} is not a JSON object; convert the checkpoint again")
    return config
