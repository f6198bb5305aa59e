"""A model's config checked field by field before anything is built from it: a
converted directory's ``config.json`` or a reference checkpoint's
``genesis_config_json``. Types and ranges first, then the sizes that decide how big
the model is (vocabulary, width, layers) against the shapes its weights have, read
from the safetensors headers: so the memory a config implies is that of its weights.
A bad field is one line naming it, not a traceback from deep inside the model, nor a
model built far larger than its weights."""

import json
import math
import re
from dataclasses import fields
from typing import Callable, Dict, Optional, Tuple

from ..errors import GenesisError
from ..model.genesis import ModelArgs, unsupported_config_reason

# MLX sizes and indices are 32-bit.
MAX_SIZE = 2**31 - 1

# name -> (test, what the value must be). Fields not named here are checked for type
# only (and floats for being finite).
Rule = Tuple[Callable, str]
SIZE: Rule = (lambda v: 1 <= v <= MAX_SIZE, "a positive integer (below 2**31)")
COUNT: Rule = (lambda v: 0 <= v <= MAX_SIZE, "an integer >= 0 (below 2**31)")
RULES: Dict[str, Rule] = {
    **{name: SIZE for name in (
        "vocab_size", "n_embd", "n_layer", "block_size", "n_head", "n_kv_head",
        "gla_conv_size", "gla_chunk_size", "gla_gate_logit_normalizer", "ttt_rank",
        "ttt_chunk_size", "mup_base_width")},
    **{name: COUNT for name in (
        "selective_warmup_steps", "selective_sparsify_steps", "rope_table_length")},
    "norm_eps": (lambda v: v > 0, "a positive number"),
    "gla_expand_k": (lambda v: 0 < v <= 64, "a number in (0, 64]"),
    "gla_expand_v": (lambda v: 0 < v <= 64, "a number in (0, 64]"),
    "hybrid_full_attn_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "selective_k_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "model_type": (lambda v: v == "genesis", "'genesis' (this is not a Genesis model)"),
    "gla_qk_norm": (lambda v: v in ("l2", "rms", "softmax"), "'l2', 'rms' or 'softmax'"),
    "ttt_confidence_pooling": (lambda v: v in ("row", "batch"), "'row' or 'batch'"),
    "rope_inv_freq": (lambda v: v is None or all(f > 0 for f in v),
                      "null or a list of positive numbers"),
}

FIELD_TYPES = {f.name: f.type for f in fields(ModelArgs)}


def type_problem(value, kind) -> Optional[str]:
    """What is wrong with a JSON value for a ModelArgs field of type ``kind``."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        return None if is_number and isinstance(value, int) else "an integer"
    if kind is float:
        return None if is_number and math.isfinite(value) else "a finite number"
    if kind is str:
        return None if isinstance(value, str) else "a string"
    # rope_inv_freq: Optional[List[float]]
    if value is None or (isinstance(value, list) and all(
            type_problem(v, float) is None for v in value)):
        return None
    return "null or a list of finite numbers"


def check_fields(config: dict, where: str, required=()):
    """Every known field of ``config``: its type, then its range."""
    for name in required:
        if name not in config:
            raise GenesisError(f"{where} has no '{name}'")
    for name, value in config.items():
        if name not in FIELD_TYPES:
            continue  # mlx-lm's entries (quantization, eos_token_id, ...) and ours
        must = type_problem(value, FIELD_TYPES[name])
        if must is None and name in RULES and not RULES[name][0](value):
            must = RULES[name][1]
        if must is not None:
            raise GenesisError(f"{where}: {name} is {json_text(value)}; it must be {must}")


def json_text(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_shape(args: ModelArgs, where: str):
    if args.n_embd % args.n_head:
        raise GenesisError(f"{where}: n_embd={args.n_embd} is not divisible by "
                           f"n_head={args.n_head}")
    if args.n_head % args.n_kv_head:
        raise GenesisError(f"{where}: n_head={args.n_head} is not divisible by "
                           f"n_kv_head={args.n_kv_head}")
    reason = unsupported_config_reason(args)
    if reason:
        raise GenesisError(f"{where}: {reason} is not supported by genesis-mlx")


def weight_sizes(tensors: Dict[str, Tuple[list, str]]) -> Dict[str, Tuple[int, str]]:
    """The sizes the weights have, each with the tensor it is read from: vocabulary
    (the embedding's rows), width (the final norm's, or the embedding's columns where
    it is not quantized), layers (the highest block index + 1). None without tensors."""
    sizes = {}
    if not tensors:
        return sizes
    embedding = tensors.get("tok_emb.weight")
    if embedding is not None:
        sizes["vocab_size"] = (embedding[0][0], "tok_emb.weight")
    norm = next((n for n in ("ln_f.omega", "ln_f.weight") if n in tensors), None)
    if norm is not None:
        sizes["n_embd"] = (tensors[norm][0][0], norm)
    elif embedding is not None and embedding[1] in ("F32", "F16", "BF16", "F64"):
        sizes["n_embd"] = (embedding[0][1], "tok_emb.weight")
    blocks = [int(m.group(1)) for m in map(re.compile(r"blocks\.(\d+)\.").match, tensors) if m]
    sizes["n_layer"] = (max(blocks) + 1 if blocks else 0, "blocks.*")
    return sizes


def check_sizes(args: ModelArgs, tensors: Dict[str, Tuple[list, str]], where: str,
                described: str):
    for name, (size, tensor) in weight_sizes(tensors).items():
        value = getattr(args, name)
        if value == size:
            continue
        if name == "n_layer":
            raise GenesisError(f"{where}: the weights hold {size} layers, but {described} "
                               f"implies n_layer={value}")
        raise GenesisError(f"{where}: tensor '{tensor}' has shape "
                           f"{tuple(tensors[tensor][0])}, but {described} implies {name}={value}")


def check_config(config, tensors: Dict[str, Tuple[list, str]], where: str, fix: str,
                 described: str = "the config", required=()) -> ModelArgs:
    """``config`` (a parsed JSON value) checked field by field, then against the
    ``tensors`` (name -> (shape, dtype)) of the weights it describes; the ModelArgs
    it gives. ``where`` names it in messages (``described`` too, where it is not the
    file's own: an assumed config), ``fix`` ends them; ``required``: the fields it
    must have."""
    try:
        if not isinstance(config, dict):
            raise GenesisError(f"{where} is not a JSON object")
        check_fields(config, where, required)
        args = ModelArgs.from_dict(config)
        check_shape(args, where)
        check_sizes(args, tensors, where, described)
    except GenesisError as e:
        raise GenesisError(f"{e}; {fix}") from None
    return args
