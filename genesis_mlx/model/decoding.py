"""The one-token path: what ``Model.__call__`` runs for a single new token against a
cache that has seen tokens. It computes nothing of its own: each block's own
``__call__`` (a FoX block's own methods, around its attention, whose shapes grow with
the cache), and the TTT head's, compiled (``mx.compile``) with the cache's arrays as
inputs and outputs, which removes the dispatch of many small ops. On the CPU the
blocks take the layout of ``cpu.decode`` (that backend pays for every node of the
graph).

The compiled steps read the weights at every call (not as constants), so weights
replaced later (loading, LoRA, fuse) are seen. What a trace does bake in (the forms
arrangement, the kernels setting, the TTT strength, W0's diagonality) keys the steps.

The steps are derived state: ``Model`` keeps them out of copies and pickles and
rebuilds them on demand. They close over blocks, never over the model, so they are
freed with it in the thread that frees it: MLX keeps compiled traces per thread, and
traces released at a thread's exit during interpreter shutdown abort the process.
"""

from types import SimpleNamespace
from typing import Callable, Sequence

import mlx.core as mx

from .. import forms
from ..kernels import gpu_backend
from .cache import GLACache, TTTCache


def compile_with_cache(apply: Callable, inputs, fields: Sequence[str]) -> Callable:
    """``apply(x, cache)``, which reads and replaces the cache's ``fields``, as a
    compiled pure function of x and those arrays; ``inputs`` (a module's state) are
    read at every call. Fields that are None (a layer without short convs) stay
    None and out of the compiled function."""
    compiled = {}

    def pure_for(present):
        def pure(x, *arrays):
            state = SimpleNamespace(**{**dict.fromkeys(fields), **dict(zip(present, arrays))})
            y = apply(x, state)
            return (y, *(getattr(state, name) for name in present))

        return mx.compile(pure, inputs=inputs)

    def step(x, cache):
        present = tuple(name for name in fields if getattr(cache, name) is not None)
        if present not in compiled:
            compiled[present] = pure_for(present)
        y, *arrays = compiled[present](x, *(getattr(cache, name) for name in present))
        for name, array in zip(present, arrays):
            setattr(cache, name, array)
        return y

    return step


def gla_block_step(block) -> Callable:
    """``GenesisBlock.__call__`` of a GLA block."""
    return compile_with_cache(lambda x, cache: block(x, cache), block.state, GLACache.ROWS)


def fox_block_step(block, attention_norm=None, feed_forward=None, inputs=None) -> Callable:
    """``GenesisBlock.__call__`` of a FoX block, compiled on either side of the
    layer's ``attend`` (whose shapes grow with the cache; on the CPU it is a compiled
    step of its own). ``attention_norm``, ``feed_forward``: the block's own unless
    given, reading the arrays of ``inputs`` (the block's state unless given)."""
    attn = block.attn
    attention_norm = attention_norm or block.attn_norm
    feed_forward = feed_forward or block.feed_forward
    inputs = block.state if inputs is None else inputs

    def attention_input(x, cache):
        h = attention_norm(x)
        return (h, *attn.project(h, cache))

    def attention_output(x, h, out):
        return feed_forward(x + attn.output(out, h))

    before = compile_with_cache(attention_input, inputs, ("conv_state",))
    after = mx.compile(attention_output, inputs=inputs)

    def step(x, cache):
        h, q, k, v, log_f = before(x, cache)
        return after(x, h, attn.attend(q, k, v, log_f, cache))

    return step


def block_step(block) -> Callable:
    """A block's one-token step; on the CPU, the layout of ``cpu.decode`` (that
    backend pays for every node of the graph)."""
    if forms.cpu_forms():
        from ..cpu import decode

        return decode.fox_block_step(block) if block.is_fox else decode.gla_block_step(block)
    return fox_block_step(block) if block.is_fox else gla_block_step(block)


class TokenSteps:
    """A model's compiled one-token steps, by block and by what their traces baked in
    (the forms arrangement and the kernels, the TTT head's constants)."""

    def __init__(self):
        self.blocks = {}
        self.ttt = {}

    def block_step(self, block, setting: tuple) -> Callable:
        key = (id(block), *setting)
        held = self.blocks.get(key)
        if held is None or held[0] is not block:
            held = self.blocks[key] = (block, block_step(block))
        return held[1]

    def ttt_step(self, meta, strength: float, setting: tuple) -> Callable:
        """The TTT head with W0's diagonality (checked once per W0: a pass over W0 and
        a product with it) and the strength as constants."""
        key = (id(meta), *setting)
        held = self.ttt.get(key)
        if held is not None and held[0] is meta.ttt.W0 and held[1] == strength:
            return held[2]
        diagonal = bool(meta.ttt.w0_is_diagonal())
        step = compile_with_cache(lambda x, cache: meta(x, cache, None, diagonal),
                                  meta.state, TTTCache.ROWS)

        def first_call(x, cache):
            # Tracing hands the module its arrays back as new objects: W0 is known
            # by the object it is after the trace, else every token would retrace.
            y = step(x, cache)
            self.ttt[key] = (meta.ttt.W0, strength, step)
            return y

        return first_call

    def __call__(self, model, x, cache):
        """x [B, 1, C] (embedded) -> after the blocks and the TTT head."""
        setting = (forms.arrangement(), gpu_backend())
        with forms.traced():
            for block, layer_cache in zip(model.blocks, cache):
                x = self.block_step(block, setting)(x, layer_cache)
            if model.ttt_active:
                meta, ttt_cache = model.metacognition, cache[-1]
                if ttt_cache.empty():
                    return meta(x, ttt_cache)
                x = self.ttt_step(meta, model.args.ttt_strength, setting)(x, ttt_cache)
        return x


def applies(model, x, cache, mask) -> bool:
    """One token, no padding, inference, and a cache that has seen tokens (a compiled
    step needs array inputs)."""
    if cache is None or mask is not None or x.shape[1] != 1 or model.training:
        return False
    if gpu_backend() == "emulate":  # the kernel bodies run as C++ on host arrays
        return False
    return not any(c.empty() for c in cache[: len(model.blocks)])
