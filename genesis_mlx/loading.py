"""``load(src) -> (model, tokenizer)`` for every kind of source a user has: a
converted MLX directory, a raw reference ``.safetensors`` (converted once into a
cache directory), or a Hub repo id (downloaded, then the same)."""

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from .conversion.checkpoint import (
    DEFAULT_REPO, check_revision, download_repo, find_checkpoint_file, is_hub_id,
    read_safetensors_header, safetensors_damage,
)
from .conversion.config_check import check_config
from .conversion.convert import (
    DTYPES, build_model_tokenizer, convert, device_dtype, read_config, stop_token_ids,
)
from .conversion.mlx_lm_files import FORMAT_VERSION, MODEL_FILE
from .errors import GenesisError
from .model.genesis import Model, ModelArgs
from .output_dir import WRITING_MARKER, check_complete

CACHE_ROOT = Path(os.environ.get("GENESIS_MLX_CACHE", "~/.cache/genesis-mlx")).expanduser()


def is_converted(directory: Path) -> bool:
    config = directory / "config.json"
    return config.is_file() and read_config(directory).get("model_type") == "genesis"


def written_by_us(directory: Path) -> bool:
    """Converted by genesis-mlx, whatever its config says now (an edited model_type
    is then named as such, not read as a reference checkpoint's directory)."""
    if not (directory / "config.json").is_file():
        return False
    config = read_config(directory)
    return "genesis_mlx_format" in config or config.get("model_file") == MODEL_FILE


def converted_cache_dir(checkpoint: Path, revision: Optional[str] = None,
                        dtype: str = "float32") -> Path:
    """Keyed by the file (and the Hub revision it was downloaded at: two revisions
    never share a conversion, even where the Hub stores their files as one blob) and
    by the dtype converted to."""
    stat = checkpoint.stat()
    key = f"{checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if revision is not None:
        key += f":revision={revision}"
    if dtype != "float32":  # float32 conversions keep the keys they had
        key += f":dtype={dtype}"
    return CACHE_ROOT / "converted" / hashlib.sha256(key.encode()).hexdigest()[:16]


def directory_format(directory: Path) -> int:
    written = read_config(directory).get("genesis_mlx_format", 1)
    if isinstance(written, bool) or not isinstance(written, int):
        raise GenesisError(f"{directory / 'config.json'}: genesis_mlx_format is {written!r}, "
                           "not an integer; convert the checkpoint again")
    return written


def is_current(directory: Path) -> bool:
    """Converted, whole, by this version's format (older or interrupted cached
    conversions are redone)."""
    return (is_converted(directory) and not (directory / WRITING_MARKER).exists()
            and directory_format(directory) >= FORMAT_VERSION)


def convert_once(checkpoint: Path, tokenizer: Optional[str], revision: Optional[str] = None,
                 repo_id: Optional[str] = None, dtype: Optional[str] = None) -> Path:
    dtype = dtype or device_dtype()
    target = converted_cache_dir(checkpoint, revision, dtype)
    if not is_current(target):
        convert(str(checkpoint), str(target), dtype, tokenizer=tokenizer, force=True,
                revision=revision, repo_id=repo_id)
    return target


def tokenizer_source(tokenizer: Optional[str]) -> Optional[str]:
    """--tokenizer, else $GENESIS_MLX_TOKENIZER, else None (the Hub's)."""
    return tokenizer or os.environ.get("GENESIS_MLX_TOKENIZER")


def resolve_model_dir(src: str, tokenizer: Optional[str] = None,
                      revision: Optional[str] = None, dtype: Optional[str] = None) -> Path:
    """Any model source -> a converted MLX model directory. ``revision`` pins a Hub
    repo's download (a commit, branch or tag); ``dtype`` is what a first-use
    conversion converts to (default: ``device_dtype()``; a converted directory keeps
    its own)."""
    tokenizer = tokenizer_source(tokenizer)
    check_revision(src, revision)
    if dtype is not None and dtype not in DTYPES:
        raise GenesisError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    path = Path(src).expanduser()
    if path.is_dir():
        check_complete(path)
        if is_converted(path) or written_by_us(path):
            return path
        return convert_once(find_checkpoint_file(path), tokenizer, dtype=dtype)
    if path.is_file():
        return convert_once(path, tokenizer, dtype=dtype)
    if not is_hub_id(src):
        raise GenesisError(
            f"no such model: {src}; pass a converted model directory, a reference "
            f".safetensors, or a Hub repo id such as {DEFAULT_REPO}"
        )
    repo_dir = download_repo(src, revision=revision)
    if is_converted(repo_dir):
        return repo_dir
    return convert_once(find_checkpoint_file(repo_dir), tokenizer, revision, src, dtype)


def get_classes(config: dict):
    if config.get("model_type") != "genesis":
        raise GenesisError(f"config.json has model_type {config.get('model_type')!r}, not 'genesis'")
    return Model, ModelArgs


# transformers' warning, once per tokenizer, about a text longer than its
# model_max_length (the model's context): "will result in indexing errors".
TOO_LONG_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def load_quietly(model_dir: Path, eos_token_ids) -> TokenizerWrapper:
    # transformers warns that config.json's model_type is unknown to it: harmless.
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        tokenizer = load_tokenizer(model_dir, eos_token_ids=eos_token_ids)
    finally:
        logging.set_verbosity(previous)
    # Not so here: generate keeps a long prompt's last block_size tokens, saying so.
    tokenizer.deprecation_warnings[TOO_LONG_WARNING] = True
    return tokenizer


def has_tokenizer(model_dir: Path) -> bool:
    return (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file()


def load_model_tokenizer(model_dir: Path, config: dict, tokenizer: Optional[str]):
    """The tokenizer ``tokenizer`` names, if given, else the directory's own, else
    $GENESIS_MLX_TOKENIZER's (for a directory converted without one, as ``bench``
    writes them). One named is built in memory: the directory is left as it is."""
    if tokenizer is None and has_tokenizer(model_dir):
        return load_quietly(model_dir, config.get("eos_token_id"))
    source = tokenizer_source(tokenizer)
    if source is None:
        raise GenesisError(
            f"{model_dir} has no tokenizer (tokenizer.json); pass --tokenizer PATH to a "
            "GPT-NeoX tokenizer.json (or set GENESIS_MLX_TOKENIZER), or convert the "
            "checkpoint again with one"
        )
    tok = build_model_tokenizer(source, config["vocab_size"], config["block_size"])
    with tempfile.TemporaryDirectory() as staging:
        tok.save_pretrained(staging)
        return load_quietly(Path(staging), stop_token_ids(tok))


def load_genesis_model(model_dir: Path, lazy: bool = False,
                       model_config: Optional[dict] = None) -> Tuple[Model, dict]:
    """mlx-lm's load_model with this package's model classes: the directory's model
    file (for mlx-lm's tools) is never run here."""
    overrides = dict(model_config or {}, model_file=None)
    return load_model(Path(model_dir), lazy=lazy, model_config=overrides,
                      get_model_classes=get_classes)


def check_weight_files(model_dir: Path):
    """A weight file cut short (a full disk, a copy stopped half-way) gets its name
    and the fix, not the loader's traceback."""
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise GenesisError(f"{model_dir} holds no weights (model.safetensors); convert "
                           "the checkpoint again")
    for path in files:
        damage = safetensors_damage(path)
        if damage:
            raise GenesisError(f"{path} is damaged or incomplete ({damage}); convert again "
                               "(genesis-mlx convert --force)")
    return files


# Every field of the reference's config shapes the model: a converted config.json
# (written whole) missing one would be read with the default in its place.
REQUIRED_FIELDS = tuple(ModelArgs.reference_fields()) + ("model_type",)


def check_model_dir(model_dir: Path) -> dict:
    """A converted directory's config.json, checked field by field and against its
    weights' shapes before anything is built from it; returns it."""
    tensors = {}
    for path in check_weight_files(model_dir):
        tensors.update(read_safetensors_header(path)[1])
    config = read_config(model_dir)
    check_config(config, tensors, str(model_dir / "config.json"),
                 "convert the checkpoint again (genesis-mlx convert --force)",
                 required=REQUIRED_FIELDS)
    return config


def load_checked_model(model_dir: Path, lazy: bool = False,
                       model_config: Optional[dict] = None) -> Tuple[Model, dict]:
    """load_genesis_model on a checked directory; weights that still do not fit the
    config (a tensor of another shape, one missing) are one line."""
    check_model_dir(model_dir)
    try:
        return load_genesis_model(model_dir, lazy, model_config)
    except (ValueError, GenesisError) as e:  # the model's own checks say GenesisError
        detail = " ".join(str(e).split())
        if len(detail) > 200:
            detail = detail[:200] + "..."
        raise GenesisError(f"{model_dir}/config.json does not fit its weights ({detail}); "
                           "convert the checkpoint again (genesis-mlx convert --force)") from None


def load_model_only(model_dir: str) -> Model:
    return load_genesis_model(Path(model_dir))[0]


def load(
    src: str = DEFAULT_REPO,
    adapter_path: Optional[str] = None,
    model_config: Optional[dict] = None,
    tokenizer: Optional[str] = None,
    lazy: bool = False,
    revision: Optional[str] = None,
    dtype: Optional[str] = None,
) -> Tuple[Model, TokenizerWrapper]:
    """Loads a Genesis model and its tokenizer. ``model_config`` overrides runtime
    options of ModelArgs (e.g. ``{"ttt_enabled": False}``); ``revision`` pins a Hub
    repo's download; ``dtype``: what a Hub repo or a raw checkpoint is converted to
    on first use (default: bfloat16 on a GPU, float32 on the CPU)."""
    model_dir = resolve_model_dir(src, tokenizer, revision, dtype)
    if directory_format(model_dir) < 2:
        print(f"[genesis-mlx] {model_dir} was converted by an older genesis-mlx, whose RoPE "
              "frequencies can differ from the reference's in the last bit; convert the "
              "checkpoint again (genesis-mlx convert --force)", file=sys.stderr)
    model, config = load_checked_model(model_dir, lazy, model_config)
    if adapter_path is not None:
        from .tuning.adapters import load_adapters

        model = load_adapters(model, adapter_path)
    model.eval()
    return model, load_model_tokenizer(model_dir, config, tokenizer)
