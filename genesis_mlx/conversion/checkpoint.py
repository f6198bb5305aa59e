"""Reading reference checkpoints: one ``.safetensors`` whose metadata key
``genesis_config_json`` holds the reference's GenesisConfig as JSON."""

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten
from safetensors import SafetensorError, safe_open

from ..errors import GenesisError
from ..model.genesis import Model, ModelArgs
from .config_check import check_config
from .mlx_lm_files import MODEL_FILE

CONFIG_KEY = "genesis_config_json"
DEFAULT_REPO = "guiferrarib/genesis-152m-instruct"


def read_safetensors_header(path: Path) -> Tuple[dict, Dict[str, Tuple[list, str]]]:
    """A safetensors file's metadata and its tensors' (shape, dtype), read without the
    tensors; a clear error if it is not a whole safetensors file."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {name: (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype())
                       for name in f.keys()}
            return f.metadata() or {}, tensors
    except SafetensorError as e:
        raise GenesisError(
            f"{path} is not a whole safetensors file ({e}); Genesis checkpoints load from "
            ".safetensors only (pickled .bin/.pt files are never loaded)"
        ) from None


def safetensors_damage(path: Path) -> Optional[str]:
    """What is wrong with a safetensors file that cannot be read whole, or None."""
    try:
        with safe_open(str(path), framework="numpy"):
            return None
    except SafetensorError as e:
        return str(e)


# GenesisConfig.genesis_147m() (its fields that differ from the defaults): the config
# the reference's CLI assumes for a .safetensors without genesis_config_json.
GENESIS_147M = dict(
    vocab_size=50304, n_embd=576, n_layer=30, n_head=9, n_kv_head=3, head_dim=64,
    block_size=2048, gla_expand_k=0.75, gla_expand_v=1.5, ttt_rank=4,
    use_selective_activation=False, use_mup=True, mup_base_width=256,
)
ASSUMED_CONFIG = (f"the genesis_147m config (which the reference assumes for files "
                  f"without '{CONFIG_KEY}' metadata)")


def config_from_metadata(path: Path, metadata: dict) -> Dict:
    if CONFIG_KEY not in metadata:
        return dict(GENESIS_147M)
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise GenesisError(f"{path}: '{CONFIG_KEY}' is not valid JSON ({e})") from None
    known = set(ModelArgs.reference_fields())
    unknown = sorted(set(config) - known)
    if unknown:
        raise GenesisError(
            f"{path}: unknown config key(s) {', '.join(unknown)} in '{CONFIG_KEY}'; "
            "genesis-llm 2.0.3's GenesisConfig has no such field (was it written by "
            "another version?)"
        )
    return config


def validate_config(config: Dict, tensors: Optional[Dict[str, Tuple[list, str]]] = None,
                    where: str = "config", described: str = "the config") -> ModelArgs:
    """A reference config (the reference's defaults stand in for missing fields),
    checked field by field and against the checkpoint's ``tensors``."""
    return check_config(config, tensors or {}, where, "the checkpoint and its config "
                        "disagree, or it is damaged", described)


def check_weights(model: Model, weights: Dict[str, mx.array], source: Path, config: str):
    """The weights fit the model, name for name and shape for shape, said in one line.
    A tensor of the wrong shape is named first: it says most about a file of another
    model (mlx's strict load, which checks the rest, reports missing names first)."""
    expected = dict(tree_flatten(model.parameters()))
    for name, value in weights.items():
        if name in expected and value.shape != expected[name].shape:
            raise GenesisError(f"{source}: tensor '{name}' has shape {tuple(value.shape)}, but "
                               f"{config} implies {tuple(expected[name].shape)}")
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        detail = " ".join(str(e).split())
        if len(detail) > 300:
            detail = detail[:300] + "..."
        raise GenesisError(f"{source} does not fit a Genesis model with {config}: {detail}; "
                           "the checkpoint and its config disagree, or it is incomplete") from None


def load_reference_checkpoint(path: Path) -> Tuple[ModelArgs, Dict[str, mx.array]]:
    """A reference .safetensors -> (ModelArgs, sanitized MLX weights)."""
    path = Path(path)
    if not path.is_file():
        raise GenesisError(f"no such file: {path}")
    metadata, tensors = read_safetensors_header(path)
    config = config_from_metadata(path, metadata)
    if "tok_emb.weight" not in tensors:
        raise GenesisError(f"{path}: no 'tok_emb.weight' tensor; not a Genesis checkpoint")
    # The vocabulary size comes from the weights (the chat tokens were added after
    # the config was written).
    config["vocab_size"] = int(tensors["tok_emb.weight"][0][0])
    described = f"its {CONFIG_KEY}" if CONFIG_KEY in metadata else ASSUMED_CONFIG
    args = validate_config(config, tensors, str(path), described)
    try:
        weights = mx.load(str(path))
    except Exception as e:  # mlx raises plain RuntimeError/ValueError here
        raise GenesisError(f"{path}: cannot read tensors ({e})") from None
    # Shapes first, on a model without the RoPE buffers: a checkpoint of another shape
    # is named as such, not as RoPE frequencies that do not fit its heads.
    plain = Model(args)
    check_weights(plain, plain.sanitize(weights), path, described)
    args.rope_inv_freq = checkpoint_rope_frequencies(args, weights, path)
    args.rope_table_length = rounded_rope_table_length(args, tensors)
    model = Model(args)
    weights = model.sanitize(weights)
    check_weights(model, weights, path, described)
    return args, weights


def checkpoint_rope_frequencies(args: ModelArgs, weights: Dict[str, mx.array],
                                source: Path) -> Optional[List[float]]:
    """The GLA layers' ``rope.inv_freq`` buffers, which the reference loads with the
    weights and builds its RoPE angles from (None if the file has none)."""
    found = [weights[key].astype(mx.float32) for key in (
        f"blocks.{i}.attn.rope.inv_freq" for i in range(args.n_layer)
        if not args.is_fox_layer(i)) if key in weights]
    if not found:
        return None
    if any(not mx.array_equal(f, found[0]).item() for f in found):
        raise GenesisError(
            f"{source}: the GLA layers' rope.inv_freq buffers differ from layer to layer; "
            "genesis-mlx supports one set of RoPE frequencies for all layers")
    return found[0].tolist()


def rounded_rope_table_length(args: ModelArgs, tensors: Dict[str, Tuple[list, str]]) -> int:
    """The length of the GLA layers' RoPE cos/sin tables if the file stores them below
    float32 (the reference then reads those rounded values), else 0."""
    for i in range(args.n_layer):
        entry = tensors.get(f"blocks.{i}.attn.rope.cos_cached")
        if entry is not None:
            shape, dtype = entry
            return 0 if dtype in ("F32", "F64") else int(shape[2])
    return 0


def find_checkpoint_file(directory: Path) -> Path:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise GenesisError(f"{directory} holds no .safetensors file")
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise GenesisError(f"{directory} holds several .safetensors files ({names}); pass one")
    return files[0]


def is_hub_id(src: str) -> bool:
    """Not a local path, and shaped as a Hub repo id (owner/name)."""
    path = Path(src).expanduser()
    return (not path.exists() and not src.endswith(".safetensors")
            and not src.startswith((".", "/", "~")) and src.count("/") == 1)


def check_revision(src: str, revision: Optional[str]):
    """--revision names a commit, branch or tag of a Hub repo: a local source has none."""
    if revision is not None and not is_hub_id(src):
        raise GenesisError(f"--revision {revision}: {src} is not a Hub repo id (a revision "
                           "pins a Hub download); leave --revision out for local files")


def is_converted_by_us(directory: Path) -> bool:
    """A directory genesis-mlx converted (its config.json says so)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("genesis_mlx_format" in config
                                         or config.get("model_type") == "genesis")


def resolve_source(src: str, revision: Optional[str] = None) -> Path:
    """A local .safetensors, a directory holding one, or a Hub repo id (at
    ``revision``: a commit, branch or tag; None: the default branch) -> local file.
    A model genesis-mlx converted is not one: its weights are MLX's, without the
    reference's config."""
    check_revision(src, revision)
    path = Path(src).expanduser()
    directory = path if path.is_dir() else path.parent
    if path.exists() and is_converted_by_us(directory):
        raise GenesisError(f"{src} is a model genesis-mlx converted, not a reference "
                           "checkpoint; pass it as --model to the other commands as it is "
                           "(convert reads the reference .safetensors)")
    if path.is_dir():
        return find_checkpoint_file(path)
    if path.exists():
        return path
    if not is_hub_id(src):
        raise GenesisError(
            f"no such file or directory: {src}; pass a local .safetensors, a directory "
            f"holding one, or a Hub repo id such as {DEFAULT_REPO}"
        )
    return find_checkpoint_file(download_repo(src, revision=revision))


LOCAL_CHECKPOINT_HINT = "pass a local .safetensors file or directory"


# A converted repo's model file comes along: mlx-lm's tools need it, and genesis-mlx
# serves a directory only if the file is byte for byte its own (never runs it).
MODEL_REPO_FILES = ("*.safetensors", "*.json", "*.md", MODEL_FILE)


def download_repo(repo_id: str, allow_patterns=MODEL_REPO_FILES,
                  offline_hint: str = LOCAL_CHECKPOINT_HINT,
                  revision: Optional[str] = None) -> Path:
    """Downloads (with progress bar, cache and resume) a Hub repo's files at
    ``revision`` (None: the default branch). ``offline_hint`` says what to pass
    instead, in the errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = "" if revision is None else f" at revision '{revision}'"
    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=list(allow_patterns)))
    except RevisionNotFoundError:
        raise GenesisError(f"Hub repo '{repo_id}' has no revision '{revision}'; pass a "
                           "commit hash, branch or tag of it to --revision") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise GenesisError(
            f"Hub repo '{repo_id}' was not found (or needs a login); check the id, "
            f"or {offline_hint}"
        ) from None
    except LocalEntryNotFoundError:
        raise GenesisError(
            f"cannot reach the Hugging Face Hub to download '{repo_id}'{at} and it is "
            f"not in the local cache; connect, or {offline_hint}"
        ) from None
    except OSError as e:
        raise GenesisError(
            f"cannot download '{repo_id}'{at} from the Hugging Face Hub ({type(e).__name__}); "
            f"connect, or {offline_hint}"
        ) from None
