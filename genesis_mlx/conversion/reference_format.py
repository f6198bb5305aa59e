"""Writing checkpoints in the reference's own format without torch: the same keys,
layouts and buffers as ``Genesis.state_dict()`` (minus the tied ``lm_head``), the
config JSON under ``genesis_config_json``. Used by ``genesis-mlx demo`` and the
benchmarks to build random-weight models offline."""

import json
import math
from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

from ..model.genesis import Model, ModelArgs
from .checkpoint import CONFIG_KEY, GENESIS_147M

ROPE_TABLE_LEN = 4096  # the reference's RotaryPositionalEmbedding(max_seq_len=4096)


def rope_buffers(head_qk_dim: int):
    rotary = (int(head_qk_dim * 0.5) // 2) * 2
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, rotary, 2, dtype=np.float32) / rotary))
    freqs = np.arange(ROPE_TABLE_LEN, dtype=np.float32)[:, None] * inv_freq[None]
    emb = np.concatenate([freqs, freqs], axis=-1)[None, None]
    return inv_freq, np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def random_init(name: str, shape, rng: np.random.Generator, args: ModelArgs) -> np.ndarray:
    """Roughly the reference's initialisation, so that random models behave."""
    if name.endswith("omega"):
        return np.zeros(shape, np.float32)
    if name.endswith(("norm.weight", "norm_swish_gate.weight", "g_norm.weight")):
        return np.ones(shape, np.float32)
    if name.endswith("A_log"):
        return np.log(rng.uniform(0.5, 8.0, shape)).astype(np.float32)
    if name.endswith("dt_bias"):
        dt = np.exp(rng.uniform(math.log(1e-3), math.log(0.1), shape))
        return (dt + np.log(-np.expm1(-dt))).astype(np.float32)
    if name.endswith("fgate_proj.bias"):
        return np.full(shape, 2.0, np.float32)
    if name.endswith("ttt.W0"):
        return (np.eye(shape[0]) * 0.1).astype(np.float32)
    if name.endswith("log_lr"):
        return np.full(shape, math.log(args.ttt_inner_lr), np.float32)
    if name.endswith("layer_scale.scale"):
        return np.full(shape, 1e-4, np.float32)
    if name.endswith(".bias") or name.endswith("norm.bias"):
        return np.zeros(shape, np.float32)
    return (rng.standard_normal(shape) * args.init_std).astype(np.float32)


def reference_state_dict(config: dict, seed: int = 0) -> dict:
    """Random weights under the reference's keys and layouts (numpy arrays)."""
    args = ModelArgs.from_dict(config)
    model = Model(args)
    rng = np.random.default_rng(seed)
    state = {}
    for name, param in tree_flatten(model.parameters()):
        value = random_init(name, param.shape, rng, args)
        if name.endswith(".conv.weight"):
            value = value.swapaxes(1, 2)  # MLX [C, K, 1] -> torch [C, 1, K]
        state[name] = value
    for i, block in enumerate(model.blocks):
        if not block.is_fox:
            inv_freq, cos, sin = rope_buffers(block.attn.head_qk_dim)
            state[f"blocks.{i}.attn.rope.inv_freq"] = inv_freq
            state[f"blocks.{i}.attn.rope.cos_cached"] = cos
            state[f"blocks.{i}.attn.rope.sin_cached"] = sin
    if args.use_ttt:
        state["metacognition.evolution_history"] = np.zeros((100,), np.float32)
        state["metacognition.evolution_idx"] = np.array(0, dtype=np.int64)
    return state


def write_reference_checkpoint(path: Path, config: dict, seed: int = 0) -> Path:
    """A random-weight checkpoint as the reference writes one."""
    from safetensors.numpy import save_file

    full = {k: config.get(k, v) for k, v in ModelArgs().__dict__.items()
            if k in ModelArgs.reference_fields()}
    full.update({k: v for k, v in config.items() if k in ModelArgs.reference_fields()})
    state = reference_state_dict(full, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={CONFIG_KEY: json.dumps(full)})
    return path


# The shape of the published model: genesis_147m with the chat vocabulary.
GENESIS_152M = dict(GENESIS_147M, vocab_size=50279)

# A small model of the same structure, for the offline demo and tests.
DEMO = dict(GENESIS_152M, n_embd=96, n_layer=8, n_head=3, n_kv_head=1, ttt_rank=4)
