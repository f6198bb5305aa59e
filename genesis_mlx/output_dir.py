"""The directories commands write: a converted or fused model, LoRA adapters.

A directory is ours when its config says genesis-mlx wrote it. ``--force`` replaces
our files in it (the names a model or adapters are made of) and keeps every other
file. A directory of other files (a project, ``.``, the home directory) is refused,
``--force`` or not: a model written into it would mix with, or replace, files we
did not write."""

import errno
import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Tuple

from .errors import GenesisError

STAGING_PREFIX = ".genesis-write-"
# How MLX says it could not write a file (a RuntimeError, without the OS's reason).
MLX_WRITE_ERRORS = ("[write]", "[save_safetensors] Failed to open", "[save] Failed to open")
# Present while new files are moved into an existing directory: a run stopped then
# leaves a directory that says so (and is still ours) instead of a mix of two models.
WRITING_MARKER = ".genesis-mlx-writing"


@dataclass(frozen=True)
class Layout:
    what: str  # what the directory holds, in messages
    owner: str  # whose files those are, in messages
    config: str  # the file that says whose the directory is
    says_ours: Callable[[dict], bool]
    files: Tuple[str, ...]  # name patterns of every file we write
    content: str  # the files whose presence means there is something to replace


MODEL = Layout(
    "a model", "a genesis-mlx model", "config.json",
    lambda config: config.get("model_type") == "genesis",
    # model*.safetensors: what the loader reads as the weights, whoever put it there
    ("config.json", "genesis.py", "model*.safetensors", "model.safetensors.index.json",
     "tokenizer.json",
     "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
     "chat_template.jinja", "chat_template.json", "generation_config.json", "README.md"),
    "model*.safetensors",
)
ADAPTERS = Layout(
    "adapters", "genesis-mlx LoRA adapters", "adapter_config.json",
    lambda config: "lora_parameters" in config,
    ("adapter_config.json", "adapters.safetensors", "[0-9]*_adapters.safetensors",
     "train_log.jsonl"),
    "*adapters.safetensors",
)


def is_ours(directory: Path, layout: Layout) -> bool:
    if (directory / WRITING_MARKER).exists():
        return True
    try:
        config = json.loads((directory / layout.config).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and layout.says_ours(config)


def is_leftover(path: Path) -> bool:
    """What an interrupted write of ours leaves: names no one else uses."""
    return path.name.startswith(STAGING_PREFIX) or path.name == WRITING_MARKER


def our_files(directory: Path, layout: Layout) -> List[Path]:
    """The entries of ``directory`` that we wrote (none of a directory not ours,
    apart from leftovers)."""
    ours = is_ours(directory, layout)
    return sorted(p for p in directory.iterdir() if is_leftover(p) or (
        ours and any(fnmatch.fnmatch(p.name, pattern) for pattern in layout.files)))


def listing(names: List[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_output_dir(path, force: bool, flag: str, layout: Layout = MODEL) -> Path:
    """Where ``path`` writes (symlinks followed), or a one-line error if writing
    there could touch files that are not ours, or needs --force."""
    target = Path(path).expanduser().resolve()
    if target == Path(target.anchor):
        raise GenesisError(f"{flag} {path} is the root directory; write {layout.what} into "
                           "a directory of its own")
    if target == Path.home().resolve():
        raise GenesisError(f"{flag} {path} is your home directory; write {layout.what} into "
                           "a directory of its own")
    if not target.exists():
        blocked = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise GenesisError(f"{flag} {path}: {blocked} is a file, not a directory")
        return target
    if not target.is_dir():
        raise GenesisError(f"{flag} {path} exists and is not a directory")
    ours = our_files(target, layout)
    others = sorted(p.name for p in target.iterdir() if p not in ours)
    if others and not is_ours(target, layout):
        raise GenesisError(f"{flag} {path} holds files that are not part of {layout.owner} "
                           f"({listing(others)}); write {layout.what} into a new or empty "
                           "directory")
    if not force and any(fnmatch.fnmatch(p.name, layout.content) for p in ours):
        raise GenesisError(f"{flag} {path} already holds {layout.what}; choose another path, "
                           "or pass --force to replace what genesis-mlx wrote there (other "
                           "files are kept)")
    return target


def remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def move_into_place(source: Path, target: Path):
    os.replace(source, target)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_new_dir(target: Path, fill: Callable[[Path], None]):
    """Staged next to ``target``, then renamed into place whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
    try:
        fill(staging)
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's directory is private
        try:
            staging.rename(target)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise GenesisError(f"{target} was written by another run meanwhile; nothing was "
                               "written over it (choose another path)") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_files(target: Path, fill: Callable[[Path], None], layout: Layout,
                  keep_others: bool = False):
    """Staged inside ``target``; then our old files go (with ``keep_others``, only
    those the new ones replace) and the new ones move in, the config (which makes
    the directory a model) last, under WRITING_MARKER."""
    old = our_files(target, layout)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
    try:
        fill(staging)
        marker = target / WRITING_MARKER
        marker.touch()
        for path in old:
            replaced = (staging / path.name).exists() or is_leftover(path)
            if path != marker and (replaced or not keep_others):
                remove(path)
        for new in sorted(staging.iterdir(), key=lambda p: p.name == layout.config):
            move_into_place(new, target / new.name)
        marker.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_write_error(error: BaseException) -> bool:
    return isinstance(error, OSError) or (
        isinstance(error, RuntimeError) and str(error).startswith(MLX_WRITE_ERRORS))


def write_error_reason(error: BaseException) -> str:
    if isinstance(error, OSError):
        return str(error.strerror or error)
    return "a file could not be written whole"


def write_output_dir(path, fill: Callable[[Path], None], layout: Layout = MODEL,
                     force: bool = False, flag: str = "the output directory",
                     keep_others: bool = False) -> Path:
    """Writes what ``fill`` puts into a staging directory to ``path`` (checked with
    check_output_dir first, with the same ``force`` and ``flag``): an interrupted or
    failed run leaves no half-written model. ``keep_others``: our files there that
    the new ones do not replace stay (resumed training)."""
    target = Path(path).expanduser().resolve()
    try:
        if target.exists():
            # Again: another run may have written a model there since it was checked.
            check_output_dir(target, force, flag, layout)
            replace_files(target, fill, layout, keep_others)
        else:
            write_new_dir(target, fill)
    except (OSError, RuntimeError) as e:
        if not is_write_error(e):
            raise
        raise GenesisError(f"cannot write {target} ({write_error_reason(e)}); check the disk "
                           "space and permissions") from None
    return target


def check_complete(directory: Path, again: str = "genesis-mlx convert --force"):
    if (directory / WRITING_MARKER).exists():
        raise GenesisError(f"{directory} was left half-written by an interrupted run; "
                           f"write it again ({again})")
