"""The yardsticks the other tests measure float32 rounding with (conftest's
Tolerances): the reference built from an MLX model computes what that model computes,
and a measured rounding is the float32 computation's distance from float64."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import reference as R
from conftest import (CONFIGS, U32, logits_rounding, max_difference, mlx_model, ops_rounding,
                      tokens)


@pytest.mark.parametrize("name", CONFIGS)
def test_reference_of_an_mlx_model_is_the_reference(reference_checkpoint, name):
    """The same float32 weights in the same reference code: the same logits, bit for
    bit, TTT on and off."""
    ref, path = reference_checkpoint(**CONFIGS[name])
    ids = tokens(30)
    rebuilt, _ = R.reference_of(mlx_model(path))
    assert np.array_equal(R.reference_logits(rebuilt, ids), R.reference_logits(ref, ids))
    rebuilt, _ = R.reference_of(mlx_model(path, ttt_enabled=False))
    ref.config.ttt_strength = 0.0
    try:
        assert np.array_equal(R.reference_logits(rebuilt, ids), R.reference_logits(ref, ids))
    finally:
        del ref.config.ttt_strength


def test_reference_of_folds_adapters_and_dequantizes(reference_checkpoint):
    """An adapted model's reference computes W + scale (A B)^T; a quantized model's,
    its dequantized weights: the MLX model is within float32 rounding of it, and the
    base weights are not."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx.utils import tree_flatten

    from genesis_mlx.tuning.lora import LORA_KEYS

    _, path = reference_checkpoint(**CONFIGS["gqa"])
    ids = tokens(40)
    base = np.array(mlx_model(path)(mx.array(ids)))
    adapted = mlx_model(path)
    linear_to_lora_layers(adapted, 4, {"rank": 4, "scale": 10.0, "dropout": 0.0,
                                       "keys": LORA_KEYS})
    # B starts at zero (the adapter a no-op): give it values
    adapted.load_weights([(k, 0.05 * mx.random.normal(v.shape, key=mx.random.key(i)))
                          for i, (k, v) in enumerate(tree_flatten(adapted.parameters()))
                          if k.endswith("lora_b")], strict=False)
    adapted.eval()
    quantized = mlx_model(path)
    nn.quantize(quantized, group_size=32, bits=4)
    for model in (adapted, quantized):
        got = np.array(model(mx.array(ids)))
        _, exact_model = R.reference_of(model)
        exact = R.reference_logits_float64(exact_model, ids)
        tol = logits_rounding(model, ids).tolerance
        assert max_difference(got, exact) <= tol
        assert max_difference(base, exact) > tol, "fixture too weak: the change is invisible"


def test_measured_rounding_of_a_dot_product_is_within_its_bound():
    """A float32 matrix product against float64: nonzero, and within the classical
    bound n u sum |a b| of any summation order."""
    rng = np.random.default_rng(0)
    a, b = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in ((8, 300), (300, 5)))
    rounding = ops_rounding(lambda x, y: x @ y, a, b)
    bound = 300 * U32 * (np.abs(np.array(a, np.float64)) @ np.abs(np.array(b, np.float64)))
    assert 0 < rounding.error <= bound.max()
