"""The model card (``README.md``) of a converted directory: the Hub's front matter
(``library_name: mlx``, the base model, license, tags) and how to run the model with
genesis-mlx and with mlx-lm's tools. Written from the directory's config.json
alone, so every directory a Genesis model is written to gets the same card:
``genesis-mlx convert`` and ``fuse``, and mlx-lm's own ``convert``/``fuse`` (see
mlx_lm_cli.py)."""

from pathlib import Path
from typing import Optional

from .checkpoint import is_hub_id
from .tokenizer import DEFAULT_SYSTEM_PROMPT, END_OF_TURN, render_chat

CARD = "README.md"
# Genesis-152M's weights are Apache-2.0 (its model card); a checkpoint of one's own
# may carry another license, which the card says.
MODEL_LICENSE = "apache-2.0"
TAGS = ["mlx", "genesis-mlx", "genesis", "custom_code", "linear-attention"]
EXAMPLE_PROMPT = "Why is the sky blue?"


def base_model(config: dict) -> Optional[str]:
    """The Hub repo the weights were converted from, if they came from one."""
    source = config.get("genesis_source")
    return source if isinstance(source, str) and is_hub_id(source) else None


def front_matter(config: dict) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="mlx", pipeline_tag="text-generation",
                         license=MODEL_LICENSE, language=["en"], tags=TAGS,
                         base_model=base_model(config))
    return f"---\n{data.to_yaml()}\n---\n"


def provenance(config: dict, fused: bool) -> str:
    from .. import __version__

    base = base_model(config)
    if base is None:
        origin = "converted from a local Genesis checkpoint"
    else:
        revision = config.get("genesis_revision")
        at = f" (revision `{revision}`)" if revision else ""
        origin = f"converted from [{base}](https://huggingface.co/{base}){at}"
    quantization = config.get("quantization")
    if quantization:
        origin += (f", weights quantized to {quantization['bits']} bits (group size "
                   f"{quantization['group_size']})")
    if fused:
        origin += ", with LoRA adapters fused into its weights"
    return f"{origin}, by genesis-mlx {__version__}"


def model_card(config: dict, name: str, fused: bool = False) -> str:
    """The card of a directory named ``name`` holding a model of ``config``."""
    license_note = ("" if base_model(config) else
                    f" If your checkpoint carries another license than Genesis-152M's "
                    f"({MODEL_LICENSE}), change `license` above.")
    prompt = render_chat([{"role": "user", "content": EXAMPLE_PROMPT}])
    return front_matter(config) + f"""
# {name}

Genesis-152M (a hybrid of gated linear attention, FoX forgetting attention and a test-time-training head) in MLX format, {provenance(config, fused)}.{license_note}

The model's code is the [genesis-mlx](https://pypi.org/project/genesis-mlx/) package: this directory's `genesis.py` holds no model code but imports that package, and mlx-lm's tools run it when told `--trust-remote-code`. Below, `{name}` stands for this directory, or for its Hub repo id once uploaded.

## Use with genesis-mlx

```bash
pip install genesis-mlx
genesis-mlx generate --model {name} --prompt "{EXAMPLE_PROMPT}"
genesis-mlx chat --model {name}
genesis-mlx serve --model {name}   # an OpenAI-compatible server
```

```python
import genesis_mlx as g

model, tokenizer = g.load("{name}")
print(g.generate(model, tokenizer, "{EXAMPLE_PROMPT}", max_tokens=128))
```

## Use with mlx-lm

```bash
pip install genesis-mlx   # mlx-lm comes with it
mlx_lm.generate --model {name} --trust-remote-code --prompt "{EXAMPLE_PROMPT}"
mlx_lm.chat --model {name} --trust-remote-code
mlx_lm.server --model {name} --trust-remote-code
```

On Linux, `genesis-mlx lm TOOL ...` runs the same tools with a fast BLAS: `genesis-mlx lm generate --model {name} --trust-remote-code --prompt "..."`.

## Prompt format

ChatML, a system turn first (`{DEFAULT_SYSTEM_PROMPT}` by default), as the tokenizer's chat template renders it; a turn ends at `{END_OF_TURN}`, the tokenizer's end-of-sequence token:

```
{prompt}```
"""


def write_model_card(directory: Path, config: dict, name: str, fused: bool = False):
    (Path(directory) / CARD).write_text(model_card(config, name, fused))
