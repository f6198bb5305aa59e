"""Loading LoRA adapters onto a model, and fusing them into a plain model."""

import json
import shutil
from pathlib import Path

from mlx.utils import tree_unflatten

from ..conversion.convert import check_output_dir, write_model_dir
from ..errors import GenesisError


def load_adapters(model, adapter_path: str):
    """mlx-lm's adapter loading, with one-line errors for the usual mistakes."""
    from mlx_lm.tuner.utils import load_adapters as mlx_load_adapters

    path = Path(adapter_path)
    if not (path / "adapter_config.json").is_file() or not (path / "adapters.safetensors").is_file():
        raise GenesisError(f"--adapter-path {path}: expected adapter_config.json and "
                           "adapters.safetensors (written by genesis-mlx lora)")
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


def fuse(model, model_dir: Path, save_path: str, force: bool = False) -> Path:
    """Folds the adapters into the weights and writes a plain converted model (the
    source's config and tokenizer files, the fused weights)."""
    out = Path(save_path)
    check_output_dir(out, force, "--save-path")
    fused = [(name, m.fuse()) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if not fused:
        raise GenesisError("the model has no adapters to fuse")
    model.update_modules(tree_unflatten(fused))

    def copy_config_and_tokenizer(staging: Path):
        for item in Path(model_dir).iterdir():
            if item.is_file() and not item.name.startswith("model"):
                shutil.copy2(item, staging / item.name)

    return write_model_dir(out, model, copy_config_and_tokenizer)
