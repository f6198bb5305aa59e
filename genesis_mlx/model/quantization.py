"""Which layers of a Genesis model are quantized, and with which group size.

mlx-lm's ``quantize_model`` asks ``Model.quant_predicate(path, module)`` about each
layer, but only about layers whose input width its group size divides, and without
saying which group size and bits it was asked for: so what the model itself can
answer there is yes or no. ``genesis-mlx convert -q`` goes through the same
``quantize_model`` with a predicate that knows the request: it gives every layer
the largest group size, not above the requested one, that divides its input width
(the real model's FFN and GLA output projections read widths 64 does not divide),
recorded per layer in the config so that every loader rebuilds the same shapes.
"""

from typing import Optional

GROUP_SIZES = (128, 64, 32)
# Tiny per-head gate projections (output width n_head) and the TTT head keep full
# precision: quantizing them saves next to nothing and moves the logits most.
FULL_PRECISION_LAYERS = ("gk_proj", "b_proj", "fgate_proj")
FULL_PRECISION_PREFIX = "metacognition"


def group_size_for(width: int, requested: int) -> Optional[int]:
    """The largest of GROUP_SIZES, at most ``requested``, dividing ``width``."""
    return next((g for g in GROUP_SIZES if g <= requested and width % g == 0), None)


def keeps_full_precision(path: str, module) -> bool:
    return (not hasattr(module, "to_quantized") or path.endswith(FULL_PRECISION_LAYERS)
            or path.startswith(FULL_PRECISION_PREFIX))


def quant_predicate(group_size: Optional[int] = None, bits: Optional[int] = None,
                    mode: str = "affine"):
    """A predicate for mlx-lm's ``quantize_model``. Without a request (mlx-lm's own
    call): True or False. With one: False, or the layer's parameters as a dict."""

    def predicate(path, module):
        if keeps_full_precision(path, module):
            return False
        if group_size is None:
            return True
        fitting = group_size_for(module.weight.shape[-1], group_size)
        if fitting is None:
            return False
        return {"group_size": fitting, "bits": bits, "mode": mode}

    return predicate
