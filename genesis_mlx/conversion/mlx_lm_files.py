"""What makes a converted directory an mlx-lm model directory: ``config.json`` names a
model file (``model_file``), which mlx-lm's own tools import with
``--trust-remote-code``. The file holds no model code: it imports the installed
genesis-mlx package (one source of truth) and says in one line what to install
when that package is missing or too old. genesis-mlx's own loader never runs it.

The tokenizer files are written in the form every transformers version mlx-lm
accepts reads: the chat template inside ``tokenizer_config.json`` (transformers 5
would otherwise put it in a separate ``chat_template.jinja``, which 4.x ignores),
the tokenizer class and special tokens under their long-standing names; its
end-of-sequence token is the end of a chat turn, and ``generation_config.json`` says
so too (with the reference's sampling defaults) for consumers that read that file.
"""

import json
from pathlib import Path
from typing import Optional

# Model directories this version writes and reads; the model file asks for at least
# the format of the directory it sits in. 4: the model file prepares mlx-lm's tools
# (mlx_lm_cli.prepare_mlx_lm), <|im_end|> is the tokenizer's eos token, a model card
# and generation_config.json; 3: mlx-lm model file; 2: RoPE frequencies from the
# checkpoint (rope_inv_freq, rounded tables); 1: the first format.
FORMAT_VERSION = 4
MODEL_FILE = "genesis.py"
GENERATION_CONFIG = "generation_config.json"

MODEL_FILE_SOURCE = '''"""Genesis-152M for mlx-lm's tools (generate, chat, server, lora, ...): this directory
was written by genesis-mlx, whose installed package holds the model."""

import sys
import threading

REQUIRED_FORMAT = {format}


def _stop(message):
    # One line, no traceback (a thread's SystemExit is silent: say it first there).
    if threading.current_thread() is not threading.main_thread():
        print(message, file=sys.stderr)
    raise SystemExit(message)


try:
    import genesis_mlx
except ImportError:
    _stop("this model needs the genesis-mlx package: pip install genesis-mlx")
if getattr(genesis_mlx, "MODEL_FORMAT", 0) < REQUIRED_FORMAT:
    _stop(f"this model was written by a newer genesis-mlx than the installed "
          f"{{getattr(genesis_mlx, '__version__', '?')}}: pip install -U genesis-mlx")

from genesis_mlx.model.genesis import Model, ModelArgs  # noqa: E402,F401
'''

# Format 4 on: Genesis's cache classes, its model type for transformers (no warning
# that it is unknown) and its model card for directories mlx-lm's tools write.
PREPARE_MLX_LM = '''from genesis_mlx.mlx_lm_cli import prepare_mlx_lm  # noqa: E402

prepare_mlx_lm()
'''


def model_file_source(format_version: int = FORMAT_VERSION) -> str:
    source = MODEL_FILE_SOURCE.format(format=format_version)
    return source + PREPARE_MLX_LM if format_version >= 4 else source


def write_model_file(directory: Path, config: dict):
    """The model file for the directory's format, and its name in the config (before
    config.json is saved)."""
    source = model_file_source(config.get("genesis_mlx_format", FORMAT_VERSION))
    (directory / MODEL_FILE).write_text(source)
    config["model_file"] = MODEL_FILE


def model_file_problem(directory: Path, config: dict) -> Optional[str]:
    """Why mlx-lm must not be told to trust this directory's model file (None: it is
    genesis-mlx's own, unchanged). genesis-mlx's own loader never runs it."""
    name = config.get("model_file")
    if name is None:
        return (f"{directory} has no mlx-lm model file (converted by an older genesis-mlx); "
                "convert it again to open it in mlx-lm's tools")
    if name != MODEL_FILE:
        return (f"{directory}/config.json names {name!r} as its model file, not genesis-mlx's "
                f"{MODEL_FILE}; convert the checkpoint again")
    path = directory / MODEL_FILE
    expected = model_file_source(config.get("genesis_mlx_format", FORMAT_VERSION))
    if not path.is_file() or path.read_text() != expected:
        return (f"{path} is not the model file genesis-mlx writes (changed or missing); "
                "convert the checkpoint again")
    return None


def write_tokenizer(tokenizer, directory: Path):
    """The tokenizer files, readable by transformers 4.x and 5.x alike, and the
    generation config naming the tokens generation stops at."""
    tokenizer.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    special = config.pop("extra_special_tokens", None)
    if isinstance(special, list):
        config["additional_special_tokens"] = special
    config["chat_template"] = tokenizer.chat_template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    write_generation_config(tokenizer, directory)


def write_generation_config(tokenizer, directory: Path):
    """Where generation stops (mlx-lm's loader reads ``eos_token_id`` from here
    before config.json) and the reference CLI's sampling defaults."""
    from ..generation.generate import (DEFAULT_REPETITION_PENALTY, DEFAULT_TEMP,
                                       DEFAULT_TOP_K, DEFAULT_TOP_P)
    from .tokenizer import END_OF_TEXT, stop_token_ids

    end_of_text = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = {"bos_token_id": end_of_text, "eos_token_id": stop_token_ids(tokenizer),
              "pad_token_id": end_of_text, "do_sample": True, "temperature": DEFAULT_TEMP,
              "top_k": DEFAULT_TOP_K, "top_p": DEFAULT_TOP_P,
              "repetition_penalty": DEFAULT_REPETITION_PENALTY}
    (directory / GENERATION_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
