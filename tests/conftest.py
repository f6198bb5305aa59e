import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("MLX_ENABLE_TF32", "0")  # fp32 tolerances assume fp32 matmuls (GPU runs)

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/tokenizers/gpt-neox/tokenizer.json"


def logits_tolerance(reference):
    import numpy as np

    return 1e-4 * max(1.0, float(np.abs(reference).max()))


def small_tokenizer(path):
    """A tokenizer unlike GPT-NeoX: 'hello' is token 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "hello": 1, "world": 2},
                                     unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_path():
    if not SHARED_TOKENIZER.is_file():
        pytest.fail(f"the offline GPT-NeoX tokenizer is missing: {SHARED_TOKENIZER}")
    return str(SHARED_TOKENIZER)


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """Builds (and caches) reference models and the checkpoints they write."""
    import reference as R

    made = {}

    def make(seed=0, diagonal_w0=False, **overrides):
        key = (seed, diagonal_w0, tuple(sorted(overrides.items())))
        if key not in made:
            model = R.build_reference(R.make_config(**overrides), seed, diagonal_w0=diagonal_w0)
            path = tmp_path_factory.mktemp("ckpt") / "genesis.safetensors"
            made[key] = (model, R.save_reference_checkpoint(model, path))
        return made[key]

    return make
