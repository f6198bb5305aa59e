"""Reference checkpoint -> MLX model directory (config.json, model.safetensors,
tokenizer files), optionally cast or quantized."""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import save_config

from ..errors import GenesisError
from ..model.genesis import Model
from ..output_dir import MODEL, check_output_dir, write_output_dir
from .checkpoint import DEFAULT_REPO, load_reference_checkpoint, resolve_source
from .mlx_lm_files import FORMAT_VERSION, write_model_file, write_tokenizer
from .tokenizer import build_tokenizer, chat_token_ids

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
GROUP_SIZES = (128, 64, 32)


def quantize(model: nn.Module, bits: int, group_size: int) -> dict:
    """Quantizes the model in place; returns the config's "quantization" entry.

    Layers whose input width does not divide ``group_size`` (864 and 1440 on the
    real model, against 64) get the largest smaller group size that divides it,
    recorded per layer so that the loader rebuilds the same shapes."""
    overrides = {}
    skip = getattr(model, "quant_predicate", None)

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or (skip and not skip(path, module)):
            return False
        width = module.weight.shape[-1]
        if width % group_size == 0:
            return True
        fallback = next((g for g in GROUP_SIZES if g < group_size and width % g == 0), None)
        if fallback is None:
            return False
        overrides[path] = {"group_size": fallback, "bits": bits, "mode": "affine"}
        return dict(overrides[path])

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return {"group_size": group_size, "bits": bits, "mode": "affine", **overrides}


def write_model_dir(out: Path, model: nn.Module, write_rest: Callable[[Path], None]) -> Path:
    """Writes model.safetensors plus what ``write_rest`` adds, staged, then moved into
    place: an interrupted run leaves no half-written model."""
    def fill(staging: Path):
        mx.save_safetensors(str(staging / "model.safetensors"),
                            dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
        write_rest(staging)

    return write_output_dir(out, fill, MODEL)


def build_model_tokenizer(source: Optional[str], vocab_size: int):
    """The Genesis tokenizer, checked to fit a checkpoint's embedding."""
    tok = build_tokenizer(source)
    if len(tok) > vocab_size:
        raise GenesisError(
            f"the tokenizer has {len(tok)} tokens but the checkpoint embeds only "
            f"{vocab_size}; pass the GPT-NeoX tokenizer the model was trained with"
        )
    return tok


def stop_token_ids(tok) -> list:
    """Generation stops at <|im_end|> (end of a chat turn) or <|endoftext|>."""
    return [chat_token_ids(tok)[1], tok.eos_token_id]


def convert(
    hf_path: str = DEFAULT_REPO,
    mlx_path: str = "genesis-mlx-model",
    dtype: str = "float32",
    quantize_model: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    tokenizer: Optional[str] = None,
    force: bool = False,
    with_tokenizer: bool = True,
    revision: Optional[str] = None,
) -> Path:
    """``with_tokenizer=False`` writes the model alone (benchmarks of random models);
    ``revision`` pins a Hub repo's download (a commit, branch or tag)."""
    out = check_output_dir(mlx_path, force, "--mlx-path")
    if dtype not in DTYPES:
        raise GenesisError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if quantize_model and (q_bits not in (2, 3, 4, 5, 6, 8) or q_group_size not in GROUP_SIZES):
        raise GenesisError("quantization: --q-bits must be 2-6 or 8 and --q-group-size 32, 64 or 128")

    source = resolve_source(hf_path, revision)
    args, weights = load_reference_checkpoint(source)
    tok = build_model_tokenizer(tokenizer, args.vocab_size) if with_tokenizer else None

    target = DTYPES[dtype]
    weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in weights.items()}
    model = Model(args)
    model.load_weights(list(weights.items()))
    config = asdict(args)
    if tok is not None:
        config["eos_token_id"] = stop_token_ids(tok)
    config["genesis_source"] = str(hf_path)
    if revision is not None:
        config["genesis_revision"] = revision
    config["genesis_mlx_format"] = FORMAT_VERSION
    if quantize_model:
        config["quantization"] = quantize(model, q_bits, q_group_size)

    def write_rest(staging: Path):
        write_model_file(staging, config)
        save_config(config, staging / "config.json")
        if tok is not None:
            write_tokenizer(tok, staging)

    return write_model_dir(out, model, write_rest)

def read_config(model_dir: Path) -> dict:
    with open(model_dir / "config.json") as f:
        return json.load(f)
