"""``load(src) -> (model, tokenizer)`` for every kind of source a user has: a
converted MLX directory, a raw reference ``.safetensors`` (converted once into a
cache directory), or a Hub repo id (downloaded, then the same)."""

import hashlib
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from .conversion.checkpoint import DEFAULT_REPO, download_repo, find_checkpoint_file
from .conversion.convert import FORMAT_VERSION, convert, read_config
from .errors import GenesisError
from .model.genesis import Model, ModelArgs

CACHE_ROOT = Path(os.environ.get("GENESIS_MLX_CACHE", "~/.cache/genesis-mlx")).expanduser()


def is_converted(directory: Path) -> bool:
    config = directory / "config.json"
    return config.is_file() and read_config(directory).get("model_type") == "genesis"


def converted_cache_dir(checkpoint: Path) -> Path:
    stat = checkpoint.stat()
    key = f"{checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return CACHE_ROOT / "converted" / hashlib.sha256(key.encode()).hexdigest()[:16]


def is_current(directory: Path) -> bool:
    """Converted by this version's format (older cached conversions are redone)."""
    return is_converted(directory) and read_config(directory).get(
        "genesis_mlx_format", 1) >= FORMAT_VERSION


def convert_once(checkpoint: Path, tokenizer: Optional[str]) -> Path:
    target = converted_cache_dir(checkpoint)
    if not is_current(target):
        convert(str(checkpoint), str(target), tokenizer=tokenizer, force=True)
    return target


def resolve_model_dir(src: str, tokenizer: Optional[str] = None) -> Path:
    """Any model source -> a converted MLX model directory."""
    tokenizer = tokenizer or os.environ.get("GENESIS_MLX_TOKENIZER")
    path = Path(src).expanduser()
    if path.is_dir():
        if is_converted(path):
            return path
        return convert_once(find_checkpoint_file(path), tokenizer)
    if path.is_file():
        return convert_once(path, tokenizer)
    if path.suffix == ".safetensors" or src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise GenesisError(
            f"no such model: {src}; pass a converted model directory, a reference "
            f".safetensors, or a Hub repo id such as {DEFAULT_REPO}"
        )
    repo_dir = download_repo(src)
    if is_converted(repo_dir):
        return repo_dir
    return convert_once(find_checkpoint_file(repo_dir), tokenizer)


def get_classes(config: dict):
    if config.get("model_type") != "genesis":
        raise GenesisError(f"config.json has model_type {config.get('model_type')!r}, not 'genesis'")
    return Model, ModelArgs


def load_quietly(model_dir: Path, eos_token_ids) -> TokenizerWrapper:
    # transformers warns that config.json's model_type is unknown to it: harmless.
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return load_tokenizer(model_dir, eos_token_ids=eos_token_ids)
    finally:
        logging.set_verbosity(previous)


def load_model_only(model_dir: str) -> Model:
    model, _ = load_model(Path(model_dir), get_model_classes=get_classes)
    return model


def load(
    src: str = DEFAULT_REPO,
    adapter_path: Optional[str] = None,
    model_config: Optional[dict] = None,
    tokenizer: Optional[str] = None,
    lazy: bool = False,
) -> Tuple[Model, TokenizerWrapper]:
    """Loads a Genesis model and its tokenizer. ``model_config`` overrides runtime
    options of ModelArgs (e.g. ``{"ttt_enabled": False}``)."""
    model_dir = resolve_model_dir(src, tokenizer)
    if not is_current(model_dir):
        print(f"[genesis-mlx] {model_dir} was converted by an older genesis-mlx, whose RoPE "
              "frequencies can differ from the reference's in the last bit; convert the "
              "checkpoint again (genesis-mlx convert --force)", file=sys.stderr)
    model, config = load_model(model_dir, lazy=lazy, model_config=model_config,
                               get_model_classes=get_classes)
    if adapter_path is not None:
        from .tuning.adapters import load_adapters

        model = load_adapters(model, adapter_path)
    model.eval()
    wrapper = load_quietly(model_dir, config.get("eos_token_id"))
    return model, wrapper
