"""The one-token fast path: what ``Model.__call__`` runs for a single new token against
a cache that has seen tokens. Same math as the modules' own ``__call__`` (tests tie
the two together), laid out for speed:

- Each block's step is compiled (``mx.compile``): a GLA layer whole, a FoX layer
  before and after its attention (whose shapes change as the cache grows), the TTT
  head. Compiling removes the dispatch of many small ops.
- On MLX's CPU backend every graph node still costs the Python thread that builds and
  dispatches the graph time it shares with the BLAS threads, so the CPU steps are
  written for few nodes: rows stay 2-D between layers; the steps read "decode views"
  made once per block (each plain Linear's W^T as a view of W, the short convs'
  weights stacked, the norms' gains, RoPE's gather index) instead of deriving them
  every token; q, k and v go through their short convs as one weighted sum and GLA's
  q and k through one fused L2 norm and RoPE; query heads are viewed as [groups, KV
  heads] so K and V broadcast instead of being copied; each residual add rides on
  its projection (``addmm``).
- The views and compiled steps are rebuilt when a weight or layer they derive from is
  replaced (loading, LoRA, fuse) or a runtime option they read changes.

GPUs keep the GLA layer's own ``__call__`` inside its compiled step (its recurrent
kernel); the FoX token runs as ``kernels.fox_decode_step`` on the CPU only.
"""

import weakref
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..fastmath import exp, plain_ops
from .cache import FoxCache, QuantizedFoxCache
from .ops import L2_EPS, last_window_conv, norm_gain, split_activated


def transposed_weight(layer: nn.Module) -> Optional[mx.array]:
    """W^T of a plain bias-free nn.Linear as an evaluated view of W (no copy): a
    compiled step that takes it as an input multiplies by it directly, where
    ``layer(x)`` adds a transpose node every call. None for other layers (LoRA,
    quantized, with a bias): those are called as they are."""
    if type(layer) is not nn.Linear or "bias" in layer:
        return None
    view = layer.weight.T
    mx.eval(view)
    return view


def transposed_weights(module: nn.Module) -> dict:
    """``transposed_weight`` of each of the module's projections that has one."""
    views = {}
    for name, child in module.children().items():
        weight_t = transposed_weight(child) if name.endswith("_proj") else None
        if weight_t is not None:
            views[name] = weight_t
    return views


def linear(x, layer: nn.Module, weight_t: Optional[mx.array] = None):
    """layer(x), by its ``transposed_weight`` where there is one."""
    return layer(x) if weight_t is None else x @ weight_t


def add_linear(residual, x, layer: nn.Module, weight_t: Optional[mx.array] = None):
    """residual + layer(x), as one graph node where the layer has a
    ``transposed_weight``."""
    return residual + layer(x) if weight_t is None else mx.addmm(residual, x, weight_t)


def short_convs_token(raw, tail, weight, segments):
    """Several short convs for one token (raw [B, C]: their inputs side by side) as
    one weighted sum over the window with their weights stacked [K, C]. ``segments``:
    (width, activation) of consecutive outputs. -> outputs [B, 1, width] each, the
    new tail"""
    window = mx.concatenate([tail, raw[:, None]], axis=1)
    return split_activated(last_window_conv(window, weight), segments), window[:, 1:]


def stacked_conv_weights(convs) -> mx.array:
    """Short convs' weights [C_i, K, 1] -> [K, sum C_i]."""
    return mx.concatenate([c.weight_kc for c in convs], axis=1)


def compile_with_cache(apply: Callable, inputs, fields: Sequence[str]):
    """Compiles ``apply(x, cache)``, which reads and replaces the cache's ``fields``,
    as a pure function of x and those arrays. The arrays of ``inputs`` (a module's
    state, views) are inputs of the compiled function, read at every call (not
    constants), so later weight updates are seen."""

    def pure(x, *arrays):
        state = SimpleNamespace(**dict(zip(fields, arrays)))
        y = apply(x, state)
        return (y, *(getattr(state, name) for name in fields))

    pure = mx.compile(pure, inputs=inputs)

    def step(x, cache):
        y, *arrays = pure(x, *(getattr(cache, name) for name in fields))
        for name, array in zip(fields, arrays):
            setattr(cache, name, array)
        return y

    return step


# --- one token through each kind of layer (rows [B, C]) ---

def gla_token(attn, h, cache, views):
    """GatedLinearAttention.__call__ for one token, up to o_proj (the caller adds it
    to the residual in one node). q, k and v go through the short convs as one
    product with ``views["conv"]``, q and k through one norm and one RoPE product,
    as [B, groups + 1, Hkv, 1, Dk]: the query heads as [groups, KV heads] (head h
    reads KV head h % n_kv_head), then the keys. -> [B, value_dim]"""
    B, H, Hkv = h.shape[0], attn.n_head, attn.n_kv_head
    G, Dk, Dv = H // Hkv, attn.head_qk_dim, attn.head_v_dim
    raw = mx.concatenate([linear(h, attn[name], views.get(name))
                          for name in ("q_proj", "k_proj", "v_proj")], axis=-1)
    width = (H + Hkv) * Dk
    if attn.use_short_conv:
        segments = [(width, attn.conv_q.activation), (Hkv * Dv, attn.conv_v.activation)]
        (qk, v), tail = short_convs_token(raw, cache.conv_state, views["conv"], segments)
    else:
        (qk, v), tail = (raw[:, None, :width], raw[:, None, width:]), cache.conv_state
    qk = qk.astype(mx.float32).reshape(B, G + 1, Hkv, 1, Dk)
    cos, sin = attn.rope.cos_sin(cache.positions.reshape(B, 1, 1, 1, 1))
    source, sign = views["rope_source"], views["rope_sign"]
    if attn.use_l2_norm:  # rotate_half(x / |x|) = rotate_half(x) / |x|: fewer nodes
        norm = mx.sqrt((qk * qk).sum(axis=-1, keepdims=True)) + L2_EPS
        rotated = mx.take_along_axis(qk, source, axis=-1)
        qk = (qk / norm) * cos + (rotated / norm) * (sin * sign)
    else:
        qk = mx.concatenate([attn.q_norm(qk[:, :G]), attn.k_norm(qk[:, G:])], axis=1)
        qk = qk * cos + mx.take_along_axis(qk, source, axis=-1) * (sin * sign)
    v = v.astype(mx.float32).reshape(B, 1, Hkv, 1, Dv)
    log_g = attn.log_decay(linear(h, attn.gk_proj, views.get("gk_proj")))
    decay = exp(log_g).reshape(B, G, Hkv, 1, 1)
    state = cache.kv_state.reshape(B, G, Hkv, Dk, Dv)
    out, state = kernels.gla_step(qk[:, :G], qk[:, G:], v, decay, attn.scale, state)
    cache.conv_state, cache.kv_state = tail, state.reshape(B, H, Dk, Dv)
    cache.positions = cache.positions + 1
    out = out.astype(h.dtype).reshape(B, H, Dv)
    gate = linear(h, attn.g_proj, views.get("g_proj")).reshape(B, H, Dv)
    return attn.output_norm(out, gate).reshape(B, attn.value_dim)


def fox_project_token(attn, h, tail, views):
    """ForgettingAttention.project for one token: q [B, H, 1, D], k [B, Hkv, 1, D],
    v [B, H, 1, D], log forget gate [B, H, 1], the new tail."""
    B, H, Hkv, D = h.shape[0], attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = (linear(h, attn[name], views.get(name)) for name in ("q_proj", "k_proj", "v_proj"))
    q = q.reshape(B, H, 1, D)
    if attn.pro:
        segments = [(Hkv * D, attn.k_conv.activation), (H * D, attn.v_conv.activation)]
        (k, v), tail = short_convs_token(mx.concatenate([k, v], axis=-1), tail,
                                         views["conv"], segments)
        # GroupRMSNorm on the heads as they are shaped here, its gain as [H, 1, D].
        q = mx.fast.rms_norm(q, None, attn.q_norm.eps) * views["q_norm"]
        k = mx.fast.rms_norm(k.reshape(B, Hkv, 1, D), None, attn.k_norm.eps) * views["k_norm"]
    else:
        k = k.reshape(B, Hkv, 1, D)
    log_f = nn.log_sigmoid(attn.fgate_proj(h).astype(mx.float32))
    return q, k, v.reshape(B, H, 1, D), log_f[..., None], tail


def fox_output_token(attn, out, h, views):
    """ForgettingAttention.output for one token up to o_proj: out [B, H, 1, D],
    h [B, C] -> [B, H * D]."""
    B, H, _, D = out.shape
    out = out.astype(h.dtype).reshape(B, H, D)
    if attn.pro:
        gate = linear(h, attn.ogate_proj, views.get("ogate_proj")).reshape(B, H, D)
        out = attn.output_norm(out, gate)
    return out.reshape(B, H * D)


def fox_attend_token(attn, q, k, v, log_f, cache: FoxCache, compiled_step):
    """ForgettingAttention.attend for one token: on the CPU with an exact cache, one
    compiled graph over the cache's buffers (``compiled_step``: the compiled
    ``kernels.fox_decode_step``)."""
    if isinstance(cache, QuantizedFoxCache) or kernels.gpu_backend() is not None:
        return attn.attend(q, k, v, log_f, cache)
    cache.reserve(1)
    key_start = cache.left_padding
    if key_start is None:  # an array made here, not a graph node
        key_start = mx.array([0] * q.shape[0], mx.int32)
    out, keys, values, cumsum = compiled_step(
        q, k, v, log_f, cache.keys, cache.values, cache.cumsum,
        mx.array([cache.offset], mx.int32), key_start, attn.scale)
    cache.commit_token(keys, values, cumsum)
    return out


class BlockDecoder:
    """A block's compiled one-token step and the decode views it reads.
    ``fox_step``: the compiled FoX token step, shared by the model's FoX blocks."""

    def __init__(self, block, fox_step=None):
        self.block = block
        self.fox_step = fox_step
        self.step = None
        self.parts, self.sources = [], []

    def __call__(self, x, cache):
        """x [B, C] -> [B, C]."""
        if not self.current():
            self.views = self.make_views()
            self.step = self.compile_fox() if self.block.is_fox else self.compile_gla()
            out = self.step(x, cache)
            # After the first (tracing) call: it hands the parameters back in new
            # wrappers, so their identities are taken now.
            self.parts = self.view_sources()
            self.sources = [owner.get(key) for owner, key in self.parts]
            return out
        return self.step(x, cache)

    def view_sources(self) -> list:
        """(owner, key) of every module and array in the block: the views derive
        from some of them, and replacing any (loading, LoRA, fuse) rebuilds them."""
        return [(module, key) for _, module in self.block.named_modules()
                for key, value in module.items() if isinstance(value, (mx.array, nn.Module))]

    def current(self) -> bool:
        """Whether every module and array the views derive from is still in place
        (an identity check per part)."""
        if self.step is None:
            return False
        return all(owner.get(key) is old for (owner, key), old in zip(self.parts, self.sources))

    def make_views(self) -> dict:
        """Arrays the compiled step reads in place of deriving them from the
        parameters every token (a graph node each)."""
        block = self.block
        attn, ffn = block.attn, block.ffn
        views = {"attn": transposed_weights(attn), "ffn": transposed_weights(ffn),
                 "attn_norm": norm_gain(block.attn_norm), "ffn_norm": norm_gain(block.ffn_norm)}
        convs = [attn[n] for n in ("conv_q", "conv_k", "conv_v", "k_conv", "v_conv") if n in attn]
        if convs:
            views["attn"]["conv"] = stacked_conv_weights(convs)
        if block.is_fox and attn.pro:  # GroupRMSNorm gains per head, as the q/k heads
            for name in ("q_norm", "k_norm"):
                views["attn"][name] = attn[name].weight.reshape(-1, 1, attn.head_dim)
        if not block.is_fox:  # rotate-half's gather, shaped as gla_token's q/k
            source, sign = attn.rope.rotate_half_gather()
            shape = (1, attn.n_head // attn.n_kv_head + 1, attn.n_kv_head, 1, attn.head_qk_dim)
            views["attn"]["rope_source"] = mx.broadcast_to(source, shape)
            views["attn"]["rope_sign"] = sign
        mx.eval(views)
        return views

    # The compiled functions close over the block, the views and the FoX step, never
    # over this object: no reference cycle, so they are freed (and their traces with
    # them, see TokenDecoder) as soon as the model is, in the thread that frees it.

    def compile_gla(self):
        block, views = self.block, self.views

        def step(x, cache):
            # __call__, with the recurrent kernel; the kernel's first-use check may run
            # while this is traced (kernels/guard.py: its probe is built from host data).
            if kernels.gpu_backend() is not None:
                return block(x[:, None], cache)[:, 0]
            h = mx.fast.rms_norm(x, views["attn_norm"], block.attn_norm.eps)
            attn = views["attn"]
            x = add_linear(x, gla_token(block.attn, h, cache, attn), block.attn.o_proj,
                           attn.get("o_proj"))
            return ffn_token(block, x, views)

        return compile_with_cache(step, [block.state, views],
                                  ("conv_state", "kv_state", "positions"))

    def compile_fox(self):
        block, views, fox_step = self.block, self.views, self.fox_step

        def before(x, tail):
            h = mx.fast.rms_norm(x, views["attn_norm"], block.attn_norm.eps)
            return (h, *fox_project_token(block.attn, h, tail, views["attn"]))

        def after(x, h, attention):
            attn = views["attn"]
            x = add_linear(x, fox_output_token(block.attn, attention, h, attn),
                           block.attn.o_proj, attn.get("o_proj"))
            return ffn_token(block, x, views)

        before = mx.compile(before, inputs=[block.state, views])
        after = mx.compile(after, inputs=[block.state, views])

        def step(x, cache):
            h, q, k, v, log_f, cache.conv_state = before(x, cache.conv_state)
            return after(x, h, fox_attend_token(block.attn, q, k, v, log_f, cache, fox_step))

        return step


def ffn_token(block, x, views):
    """x + FFN(x) for one token, x [B, C]."""
    h = mx.fast.rms_norm(x, views["ffn_norm"], block.ffn_norm.eps)
    ffn = views["ffn"]
    hidden = block.ffn.activation(linear(h, block.ffn.gate_proj, ffn.get("gate_proj")),
                                  linear(h, block.ffn.up_proj, ffn.get("up_proj")))
    return add_linear(x, hidden, block.ffn.down_proj, ffn.get("down_proj"))


class TokenDecoder:
    """The one-token fast path of a Model (see the module's docstring). It owns every
    compiled function it uses: MLX keeps compiled traces per thread, holding Python
    objects, so they must go with the model (mlx-lm's server releases its model in
    the thread that decoded), not live on to the thread's exit at interpreter
    shutdown, where releasing them aborts the process."""

    def __init__(self, model):
        self.model_ref = weakref.ref(model)  # the model owns this decoder
        self.blocks = {}
        self.ttt_step, self.ttt_key = None, None
        self.fox_step = mx.compile(kernels.fox_decode_step)

    @property
    def model(self):
        return self.model_ref()

    def applies(self, x, cache, mask) -> bool:
        """One token, no padding, inference, and a cache that has seen tokens (a
        compiled step needs array inputs)."""
        if cache is None or mask is not None or x.shape[1] != 1 or self.model.training:
            return False
        if kernels.gpu_backend() == "emulate":  # C++ on host arrays: not traceable
            return False
        return not any(c.empty() for c in cache[: len(self.model.blocks)])

    def block_decoder(self, block) -> BlockDecoder:
        decoder = self.blocks.get(id(block))
        if decoder is None or decoder.block is not block:
            decoder = self.blocks[id(block)] = BlockDecoder(block, self.fox_step)
        return decoder

    def __call__(self, x, cache):
        """x [B, 1, C] (embedded) -> after the blocks and the TTT head."""
        with plain_ops():  # the steps are traced with the ops they fuse
            return self.blocks_and_head(x, cache)

    def blocks_and_head(self, x, cache):
        model = self.model
        B, _, C = x.shape
        rows = x.reshape(B, C)
        for block, layer_cache in zip(model.blocks, cache):
            rows = self.block_decoder(block)(rows, layer_cache)
        x = rows.reshape(B, 1, C)
        if model.ttt_active:
            ttt_cache = cache[-1]
            x = (model.metacognition(x, ttt_cache) if ttt_cache.empty()
                 else self.ttt(x, ttt_cache))
        return x

    def ttt(self, x, cache):
        """The TTT head for one token, compiled with what it reads as constants: W0's
        diagonality (checked once per W0: a pass over W0 and a product with it) and
        the TTT strength; recompiled when either changes."""
        meta = self.model.metacognition
        key = (meta.ttt.W0, self.model.args.ttt_strength)
        if self.ttt_key is None or self.ttt_key[0] is not key[0] or self.ttt_key[1] != key[1]:
            diagonal = bool(meta.ttt.w0_is_diagonal())
            self.ttt_step = compile_with_cache(
                lambda x, state: meta(x, state, None, diagonal), meta.state,
                ("gradient_sum", "seen", "confidence_sum"))
            out = self.ttt_step(x, cache)
            # After the first (tracing) call, as BlockDecoder.
            self.ttt_key = (meta.ttt.W0, self.model.args.ttt_strength)
            return out
        return self.ttt_step(x, cache)
