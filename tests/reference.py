"""Helpers that drive the PyTorch reference (genesis-llm 2.0.3) for the tests:
checkpoints it writes itself, and its logits."""

import contextlib
import io
import json
import os
from dataclasses import asdict  # noqa: F401 (re-exported for tests)
from pathlib import Path

import numpy as np

torch = __import__("torch")
genesis = __import__("genesis")

TINY = dict(
    vocab_size=512, n_embd=64, n_layer=4, n_head=4, n_kv_head=2, block_size=1024,
    gla_expand_k=0.75, gla_expand_v=1.5, use_mup=True, mup_base_width=32,
    mup_output_mult=1.5, ttt_rank=4, ttt_inner_lr=0.5, use_selective_activation=False,
)


def make_config(**overrides):
    cfg = genesis.GenesisConfig(**{**TINY, **overrides})
    return cfg


def build_reference(config, seed=0, noise=0.05, diagonal_w0=False):
    """A reference model with seeded noise on every parameter (the reference
    zero-initialises several, which would hide mistakes)."""
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        model = genesis.Genesis(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if diagonal_w0 and name.endswith("ttt.W0"):
                p.add_(torch.diag(torch.randn(p.shape[0], generator=gen) * noise))
                continue
            p.add_(torch.randn(p.shape, generator=gen) * noise)
            if name.endswith("layer_scale.scale"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.eval()
    return model


def save_reference_checkpoint(model, path, dtype=torch.float32):
    """As the reference publishes: state_dict without the tied lm_head, config JSON
    in the metadata."""
    from safetensors.torch import save_file

    state = {
        k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
        if not (k == "lm_head.weight" and model.config.tie_word_embeddings)
    }
    meta = {"genesis_config_json": json.dumps(asdict(model.config))}
    save_file(state, str(path), metadata=meta)
    return Path(path)


def reference_logits(model, ids, delta_rule=False):
    """All-position logits of the reference's no-cache eval forward."""
    old = os.environ.get("GENESIS_ENABLE_DELTA_RULE_ON_CPU")
    os.environ["GENESIS_ENABLE_DELTA_RULE_ON_CPU"] = "1" if delta_rule else "0"
    try:
        with torch.no_grad():
            idx = torch.tensor(np.asarray(ids), dtype=torch.long)
            logits, _, _ = model(idx, targets=idx)
        return logits.numpy()
    finally:
        if old is None:
            os.environ.pop("GENESIS_ENABLE_DELTA_RULE_ON_CPU")
        else:
            os.environ["GENESIS_ENABLE_DELTA_RULE_ON_CPU"] = old


def reference_logits_float64(model, ids):
    """reference_logits of a float64 copy of the model, its .float() casts made
    no-ops: a yardstick for float32 rounding."""
    import copy

    model64 = copy.deepcopy(model).double()
    float_cast, default = torch.Tensor.float, torch.get_default_dtype()
    torch.Tensor.float = lambda self, *args, **kwargs: self.double()
    torch.set_default_dtype(torch.float64)
    try:
        return reference_logits(model64, ids)
    finally:
        torch.Tensor.float = float_cast
        torch.set_default_dtype(default)


def load_as_reference_cli(path):
    """A checkpoint loaded as the reference's CLI loads it: a float32 model of the
    metadata's config, load_state_dict(strict=False)."""
    from safetensors.torch import load_file

    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    config = genesis.GenesisConfig(**json.loads(header["__metadata__"]["genesis_config_json"]))
    with contextlib.redirect_stdout(io.StringIO()):
        model = genesis.Genesis(config)
    state = load_file(str(path))
    state.setdefault("lm_head.weight", state["tok_emb.weight"])
    model.load_state_dict(state, strict=False)
    return model.eval()
