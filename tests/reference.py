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


def reference_logits_float64(model, ids, delta_rule=False):
    """reference_logits of a float64 copy of the model, its .float() casts made
    no-ops: a yardstick for float32 rounding. (A float64 model is copied as it is.)"""
    model64 = copy_as_float64(model)
    float_cast, default = torch.Tensor.float, torch.get_default_dtype()
    torch.Tensor.float = lambda self, *args, **kwargs: self.double()
    torch.set_default_dtype(torch.float64)
    try:
        return reference_logits(model64, ids, delta_rule)
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


def weights_of(model):
    """An MLX Genesis model's weights under the reference's keys and layouts, as
    float64 numpy arrays holding exactly the values it computes with: LoRA adapters
    folded in (W + scale (A B)^T, in float64), quantized layers dequantized."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    def values(layer):
        if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(layer.weight, layer.scales, layer.get("biases"),
                              layer.group_size, layer.bits)
        else:
            w = layer.weight
        return np.array(w.astype(mx.float32), np.float64)

    state, folded = {}, set()
    for name, layer in model.named_modules():
        if "lora_a" in layer and "lora_b" in layer and "linear" in layer:
            a, b = (np.array(layer[k].astype(mx.float32), np.float64) for k in ("lora_a", "lora_b"))
            state[f"{name}.weight"] = values(layer.linear) + layer.scale * (a @ b).T
            if "bias" in layer.linear:
                state[f"{name}.bias"] = np.array(layer.linear.bias.astype(mx.float32), np.float64)
            folded.add(name)
        elif isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            state[f"{name}.weight"] = values(layer)
            if "bias" in layer:
                state[f"{name}.bias"] = np.array(layer.bias.astype(mx.float32), np.float64)
            folded.add(name)
    for key, value in tree_flatten(model.parameters()):
        layer = key.rsplit(".", 1)[0]
        if layer in folded or layer.rsplit(".", 1)[0] in folded:
            continue
        value = np.array(value.astype(mx.float32), np.float64)
        if key.endswith(".conv.weight") and value.ndim == 3 and value.shape[2] == 1:
            value = value.swapaxes(1, 2)  # MLX [C, K, 1] -> torch [C, 1, K]
        state[key] = value
    return state


def reference_of(model):
    """A float32 reference model and a float64 one that compute what the MLX
    ``model`` computes: its config and runtime options (TTT on or off and its
    strength), its RoPE frequencies, and its weights (weights_of), the float32 model's
    rounded to float32 and the float64 model's exact."""
    args = model.args
    config = genesis.GenesisConfig(**{k: getattr(args, k) for k in type(args).reference_fields()})
    with contextlib.redirect_stdout(io.StringIO()):
        model32 = genesis.Genesis(config)
    model64 = copy_as_float64(model32)
    state = weights_of(model)
    state.setdefault("lm_head.weight", state["tok_emb.weight"])
    for reference, dtype in ((model32, torch.float32), (model64, torch.float64)):
        missing = reference.load_state_dict(
            {k: torch.tensor(v, dtype=dtype) for k, v in state.items()}, strict=False).missing_keys
        buffers = [k for k in missing if ".rope." in k or k.startswith("metacognition.evolution_")]
        assert missing == buffers, missing
        for module in reference.modules():
            if not isinstance(module, genesis.layers.norms.RotaryPositionalEmbedding):
                continue
            inv_freq = torch.tensor(args.rope_inv_freq or [], dtype=module.inv_freq.dtype)
            if args.rope_inv_freq and not torch.equal(module.inv_freq, inv_freq):
                module.inv_freq.copy_(inv_freq)
                module._build_cache(module.max_seq_len)
        reference.config.ttt_strength = args.ttt_strength if args.ttt_enabled else 0.0
        reference.eval()
    return model32, model64


def copy_as_float64(model):
    """A float64 copy of a reference model; a float64 one as it is."""
    import copy

    if all(p.dtype == torch.float64 for p in model.parameters()):
        return model
    return copy.deepcopy(model).double()


def redrawn_weights(model, draws):
    """Yields ``model`` ``draws`` times: as it is, then with every float32 weight moved
    one spacing up or down at random (seeded), each time anew; restored after."""
    originals = [p.detach().clone() for p in model.parameters()]
    try:
        for draw in range(draws):
            generator = torch.Generator().manual_seed(draw)
            with torch.no_grad():
                for p, original in zip(model.parameters(), originals):
                    if draw == 0:
                        p.copy_(original)
                        continue
                    up = torch.rand(original.shape, generator=generator) < 0.5
                    p.copy_(torch.nextafter(original, torch.where(up, torch.inf, -torch.inf)))
            yield model
    finally:
        with torch.no_grad():
            for p, original in zip(model.parameters(), originals):
                p.copy_(original)
