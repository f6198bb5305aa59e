"""Loading LoRA adapters onto a model, and fusing them into a plain model."""

import fnmatch
import json
import shutil
from pathlib import Path
from typing import Optional

from mlx.utils import tree_unflatten
from mlx_lm.utils import save_config

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


def load_adapters(model, adapter_path: str):
    """mlx-lm's adapter loading, with one-line errors for the usual mistakes."""
    from mlx_lm.tuner.utils import load_adapters as mlx_load_adapters

    path = Path(adapter_path)
    check_adapters_exist(path)
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("num_layers", 0) > len(model.layers):
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

    return write_model_dir(out, model, write_rest)
