"""Loading LoRA adapters onto a model, and fusing them into a plain model."""

import fnmatch
import json
import math
import shutil
from pathlib import Path
from typing import Optional

from mlx.utils import tree_unflatten
from mlx_lm.utils import save_config

from ..conversion.checkpoint import safetensors_damage
from ..conversion.convert import (build_model_tokenizer, read_config, stop_token_ids,
                                  write_model_dir)
from ..conversion.mlx_lm_files import write_model_file, write_tokenizer
from ..conversion.model_card import base_model, write_model_card
from ..errors import GenesisError
from ..output_dir import MODEL, check_output_dir, is_leftover, our_files


def check_adapters_exist(path: Path):
    if not (path / "adapter_config.json").is_file() or not (path / "adapters.safetensors").is_file():
        raise GenesisError(f"--adapter-path {path}: expected adapter_config.json and "
                           "adapters.safetensors (written by genesis-mlx lora)")


def is_count(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def adapter_config_problem(config) -> str:
    """What mlx-lm's adapter loading would fail on (a traceback) in an
    adapter_config.json ('' if nothing)."""
    if not isinstance(config, dict):
        return "is not a JSON object"
    if not is_count(config.get("num_layers")):
        return "'num_layers' must be an integer >= 1"
    if config.get("fine_tune_type", "lora") not in ("lora", "dora", "full"):
        return "'fine_tune_type' must be 'lora', 'dora' or 'full'"
    if config.get("fine_tune_type", "lora") == "full":
        return ""
    lora = config.get("lora_parameters")
    if not isinstance(lora, dict):
        return "'lora_parameters' must be an object (rank, scale, dropout)"
    if not is_count(lora.get("rank")):
        return "'lora_parameters.rank' must be an integer >= 1"
    if not is_number(lora.get("scale")):
        return "'lora_parameters.scale' must be a finite number"
    if not (is_number(lora.get("dropout")) and 0 <= lora["dropout"] < 1):
        return "'lora_parameters.dropout' must be a number in [0, 1)"
    keys = lora.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        return "'lora_parameters.keys' must be a list of layer names"
    return ""


def check_adapters(path: Path) -> dict:
    """An adapter directory's files, whole and readable: its config, checked."""
    check_adapters_exist(path)
    config_path = path / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        problem = adapter_config_problem(config)
    except (OSError, ValueError) as e:
        problem = f"cannot be read ({e})"
    if problem:
        raise GenesisError(f"{config_path} {problem}; train the adapters again "
                           "(genesis-mlx lora)")
    damage = safetensors_damage(path / "adapters.safetensors")
    if damage:
        raise GenesisError(f"{path / 'adapters.safetensors'} is damaged or incomplete "
                           f"({damage}); train the adapters again (genesis-mlx lora)")
    return config


def load_adapters(model, adapter_path: str):
    """mlx-lm's adapter loading, with one-line errors for the usual mistakes."""
    from mlx_lm.tuner.utils import load_adapters as mlx_load_adapters

    path = Path(adapter_path)
    config = check_adapters(path)
    if config["num_layers"] > len(model.layers):
        raise GenesisError(f"the adapters in {path} were trained for a model with at least "
                           f"{config['num_layers']} layers; this one has {len(model.layers)}")
    try:
        return mlx_load_adapters(model, str(path))
    except ValueError as e:
        lines = str(e).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise GenesisError(f"the adapters in {path} do not fit this model ({detail}); "
                           "were they trained on another model shape?") from None


def check_fuse_target(model_dir: Path, save_path: str, force: bool) -> Path:
    """Where the fused model goes: never over the model it is fused from."""
    out = check_output_dir(save_path, force, "--save-path")
    if out == Path(model_dir).resolve():
        raise GenesisError(f"--save-path {save_path} is the --model directory; write the "
                           "fused model into a new directory")
    return out


def copy_model_files(model_dir: Path, staging: Path, with_tokenizer: bool):
    """The source's config (and tokenizer) files; not its weights, nor files that are
    not a model's."""
    for item in our_files(Path(model_dir), MODEL):
        weights = fnmatch.fnmatch(item.name, "model*.safetensors*")
        wanted = with_tokenizer or item.name == "config.json"
        if item.is_file() and not is_leftover(item) and not weights and wanted:
            shutil.copy2(item, staging / item.name)


def fuse(model, model_dir: Path, save_path: str, force: bool = False,
         tokenizer: Optional[str] = None) -> Path:
    """Folds the adapters into the weights and writes a plain converted model: the
    source's config and tokenizer files (the tokenizer ``tokenizer`` names instead,
    if given) and the fused weights."""
    out = check_fuse_target(model_dir, save_path, force)
    tok = (build_model_tokenizer(tokenizer, model.args.vocab_size, model.args.block_size)
           if tokenizer else None)
    fused = [(name, m.fuse()) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if not fused:
        raise GenesisError("the model has no adapters to fuse")
    model.update_modules(tree_unflatten(fused))

    def write_rest(staging: Path):
        copy_model_files(model_dir, staging, with_tokenizer=tok is None)
        config = read_config(staging)
        if base_model(config) is None:  # a local path, as older versions recorded it
            config.pop("genesis_source", None)
        write_model_file(staging, config)  # a fused model opens in mlx-lm's tools too
        if tok is not None:
            config["eos_token_id"] = stop_token_ids(tok)
            write_tokenizer(tok, staging)
        save_config(config, staging / "config.json")
        write_model_card(staging, config, out.name, fused=True)

    return write_model_dir(out, model, write_rest, force, "--save-path")
