"""mlx-lm's own tools on Genesis directories. ``genesis-mlx lm TOOL ARGS...`` runs
``mlx_lm TOOL ARGS...`` in the genesis-mlx command's process, so with its BLAS
preload on Linux (see genesis_mlx/cpu/blas), after ``prepare_mlx_lm``, which a converted
directory's model file also runs in every mlx-lm process that opens it:

- Genesis's cache classes are registered in mlx-lm's cache module, where
  ``load_prompt_cache`` looks up the class names a prompt-cache file records.
  ``generate --prompt-cache-file`` reads the file before it loads the model (and so
  the model file): only ``genesis-mlx lm`` registers them in time there (``mlx_lm
  generate`` alone stops with ``KeyError: 'GLACache'``).
- transformers is told the model type ``genesis`` (a config class without content):
  the tokenizer's loader reads config.json, and warns about a model type it does not
  know ("You are using a model of type `genesis` to instantiate a model of type ``").
- A directory mlx-lm's tools write from a Genesis model (convert, fuse, the
  quantizers) gets Genesis's model card (conversion/model_card.py), through mlx-lm's
  ``create_model_card``, which writes a generic one otherwise.
"""

import json
import sys
from pathlib import Path
from typing import List

from .errors import GenesisError

# mlx-lm's subcommands (``mlx_lm --help``; a test checks the list against it).
TOOLS = ("benchmark", "cache_prompt", "chat", "convert", "evaluate", "fuse", "generate",
         "lora", "manage", "perplexity", "awq", "dwq", "dynamic_quant", "gptq", "server",
         "upload", "share")


def register_transformers_config():
    from transformers import AutoConfig, PretrainedConfig

    class GenesisConfig(PretrainedConfig):
        model_type = "genesis"

    try:
        AutoConfig.register("genesis", GenesisConfig)
    except ValueError:  # transformers has a model type of that name: leave it be
        pass


def genesis_model_card(mlx_lm_card):
    """mlx-lm's ``create_model_card(path, hf_path)``, but for a Genesis model: its card
    from the config.json mlx-lm has just written there."""
    from .conversion.model_card import write_model_card

    def create_model_card(path, hf_path):
        config_path = Path(path) / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if config.get("model_type") != "genesis":
            return mlx_lm_card(path, hf_path)
        write_model_card(Path(path), config, Path(path).resolve().name)

    create_model_card.genesis_card = True
    return create_model_card


def prepare_mlx_lm():
    """Readies mlx-lm, in this process, for Genesis directories (see above)."""
    import mlx_lm.utils

    import genesis_mlx.model.cache  # noqa: F401  (registers GLACache, FoxCache, TTTCache, ...)

    register_transformers_config()
    if not getattr(mlx_lm.utils.create_model_card, "genesis_card", False):
        mlx_lm.utils.create_model_card = genesis_model_card(mlx_lm.utils.create_model_card)


def run_tool(tool: str, args: List[str]):
    """``mlx_lm TOOL ARGS...`` in this process; its exit status is the command's."""
    if tool not in TOOLS:
        raise GenesisError(f"{tool!r} is not one of mlx-lm's tools: {', '.join(TOOLS)}")
    from mlx_lm.cli import main

    prepare_mlx_lm()
    sys.argv = [f"genesis-mlx lm {tool}", tool, *args]  # mlx-lm takes TOOL off, names ours
    main()


if __name__ == "__main__":
    # Before ``genesis-mlx lm`` (no BLAS preload): python -m genesis_mlx.mlx_lm_cli TOOL ...
    prepare_mlx_lm()
    from mlx_lm.cli import main

    main()
