"""Decoding state of a Genesis model: one cache per layer and one for the TTT head,
each with named buffers and mlx-lm's batch protocol (``prepare``, ``advance``,
``finalize``, ``make_mask``, ``merge``, ``extend``, ``filter``, ``extract``), so
mlx-lm's ``BatchGenerator`` and server batch Genesis as they batch their own models.

Batches: mlx-lm right-pads the prompts of a batch and tells every cache each row's
length (``prepare``); the model masks what lies past it (``make_mask``), so padding
leaves no trace in any recurrent state, and ``finalize`` moves the FoX layers'
padded rows to the left, where ``left_padding`` masks them for good. Rows whose
caches hold different lengths are merged left-padded the same way.
"""

from typing import List, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.cache import _BaseCache

# FoX buffers grow in steps of this many tokens (mlx-lm's default, 256, leaves up to
# 255 empty slots per layer: at a short context that is most of the cache).
FOX_CACHE_STEP = 64


def first_real(mask: mx.array) -> mx.array:
    """Index of each row's first real token in a [B, T] token mask (0 if none)."""
    return mx.argmax(mask.astype(mx.int32), axis=1).astype(mx.int32)


def stack_rows(parts: Sequence[Optional[mx.array]], rows: Sequence[int]):
    """Row blocks concatenated on axis 0; a missing block (None: nothing cached yet)
    becomes zeros shaped as the others. None if every block is missing."""
    like = next((p for p in parts if p is not None), None)
    if like is None:
        return None
    return mx.concatenate([p if p is not None else mx.zeros((n, *like.shape[1:]), like.dtype)
                           for p, n in zip(parts, rows)])


class SequenceCache(_BaseCache):
    """What every Genesis cache shares: arrays with one row per sequence (``ROWS``)
    and the prompt lengths of a right-padded batch."""

    ROWS: tuple = ()

    def __init__(self):
        for name in self.ROWS:
            setattr(self, name, None)
        self.lengths = None  # real tokens still to come per row (a padded batch prompt)
        self.rows = None  # the batch size while no array is held yet

    # --- mlx-lm's batch protocol ---

    def prepare(self, *, lengths=None, right_padding=None, **kwargs):
        if lengths is not None:
            self.lengths = mx.array(lengths, mx.int32)

    def advance(self, n: int):
        if self.lengths is not None:
            self.lengths = self.lengths - n

    def finalize(self):
        self.lengths = None

    def make_mask(self, n: int) -> Optional[mx.array]:
        """[B, n] True for real tokens of the next n inputs (None: all real)."""
        if self.lengths is None:
            return None
        return mx.arange(n)[None] < self.lengths[:, None]

    @property
    def batch_size(self) -> int:
        held = [getattr(self, name) for name in self.ROWS]
        return next((a.shape[0] for a in held if a is not None), self.rows or 1)

    def filter(self, batch_indices):
        indices = mx.array(batch_indices, mx.int32)
        for name in self.ROWS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[indices])
        if self.lengths is not None:
            self.lengths = self.lengths[indices]
        self.rows = len(batch_indices)

    def extend(self, other: "SequenceCache"):
        merged = type(self).merge([self, other])
        self.__dict__.update(merged.__dict__)

    def extract(self, idx: int) -> "SequenceCache":
        single = type(self)()
        for name in self.ROWS:
            value = getattr(self, name)
            setattr(single, name, None if value is None else mx.contiguous(value[idx : idx + 1]))
        return single

    @classmethod
    def merge(cls, caches: List["SequenceCache"]) -> "SequenceCache":
        merged = cls()
        rows = [c.batch_size for c in caches]
        for name in cls.ROWS:
            setattr(merged, name, stack_rows([getattr(c, name) for c in caches], rows))
        if any(c.lengths is not None for c in caches):
            merged.lengths = stack_rows([c.lengths for c in caches], rows)
        merged.rows = sum(rows)
        return merged

    # --- state ---

    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in self.ROWS)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.ROWS
                   if getattr(self, name) is not None)

    @property
    def state(self):
        return [getattr(self, name) for name in self.ROWS]

    @state.setter
    def state(self, values):
        for name, value in zip(self.ROWS, values):
            setattr(self, name, value)
        self.lengths, self.rows = None, None


class GLACache(SequenceCache):
    """A GLA layer: the short convs' last K - 1 inputs [B, K - 1, C], the recurrent
    state S [B, H, Dk, Dv] (fp32), and each row's position, for RoPE [B]."""

    ROWS = ("conv_state", "kv_state", "positions")


class TTTCache(SequenceCache):
    """The TTT head: the running sum of its inner-loop gradient [B, C] (fp32), the
    tokens seen [B], and the running sum of their confidence [B] (fp32)."""

    ROWS = ("gradient_sum", "seen", "confidence_sum")


def roll_right(x: mx.array, shift: mx.array) -> mx.array:
    """Each row of x [B, H, S, ...] rotated right along S by its own ``shift`` [B]."""
    B, S = x.shape[0], x.shape[2]
    index = (mx.arange(S)[None] - shift[:, None]) % S
    index = index.reshape(B, 1, S, *([1] * (x.ndim - 3)))
    return mx.take_along_axis(x, index, axis=2)


def each(fn, *values):
    """``fn`` on arrays, or element-wise on mx.quantize triples (a quantized buffer)."""
    if isinstance(values[0], (list, tuple)):
        return tuple(fn(*parts) for parts in zip(*values))
    return fn(*values)


class FoxCache(SequenceCache):
    """A FoX layer: the short convs' last K - 1 inputs [B, K - 1, C]; K per KV head
    [B, Hkv, S, D]; V per query head [B, H, S, D], so that each head's product with V
    is a matrix-vector product on contiguous rows; the forget gates' running sum
    [B, H, S] (fp32). The sequence buffers are preallocated in steps (``offset``
    rows written); rows before ``left_padding`` [B] are padding, masked for good."""

    ROWS = ("conv_state", "left_padding")
    BUFFERS = ("keys", "values", "cumsum")

    def __init__(self):
        super().__init__()
        self.keys = self.values = self.cumsum = None
        self.offset = 0
        self.right_padding = None

    def buffers(self) -> list:
        return [self.keys, self.values, self.cumsum]

    def set_buffers(self, arrays):
        self.keys, self.values, self.cumsum = arrays

    def map_buffers(self, fn):
        """Replaces every buffer array a (quantized triples element-wise) by fn(a)."""
        self.set_buffers([each(fn, b) for b in self.buffers()])

    def capacity(self) -> int:
        return 0 if self.cumsum is None else self.cumsum.shape[2]

    def reserve(self, n: int):
        """Room for n more rows (grown in FOX_CACHE_STEP steps)."""
        if self.offset + n <= self.capacity():
            return
        # Grown from the rows written: the free rows past them may be too few to count.
        grow = -(-n // FOX_CACHE_STEP) * FOX_CACHE_STEP
        self.map_buffers(lambda a: mx.concatenate(
            [a[:, :, : self.offset], zero_rows(a, a.shape[0], grow)], axis=2))

    def store(self, keys, values, cumsum):
        """Appends T rows; returns every written row of K, V and the cumsum."""
        if self.cumsum is None:
            self.set_buffers([each(lambda a: zero_rows(a, a.shape[0], 0), new)
                              for new in (keys, values, cumsum)])
        T = cumsum.shape[2]
        self.reserve(T)
        start, self.offset = self.offset, self.offset + T

        def write(buffer, rows):
            buffer[:, :, start : self.offset] = rows
            return buffer

        self.set_buffers([each(write, b, new) for b, new in
                          zip(self.buffers(), (keys, values, cumsum))])
        return [each(lambda a: a[:, :, : self.offset], b) for b in self.buffers()]

    def commit_token(self, keys, values, cumsum):
        """Takes the buffers back from a one-token step that wrote its token at row
        ``offset`` (``cpu.fox.fox_decode_step``)."""
        self.set_buffers([keys, values, cumsum])
        self.offset += 1

    def last_cumsum(self) -> mx.array:
        """The running sum at the last written row [B, H, 1] (0 before any)."""
        if self.offset == 0:
            return mx.zeros((1, 1, 1))
        return self.cumsum[:, :, self.offset - 1 : self.offset]

    def pad_left(self, n_pad: mx.array):
        """Marks each row's first ``n_pad`` [B] keys (of an empty cache) as padding."""
        if self.offset:
            raise ValueError("left padding only at the start of a sequence (an empty cache)")
        self.left_padding = n_pad.astype(mx.int32)

    # --- mlx-lm's batch protocol ---

    def prepare(self, *, lengths=None, right_padding=None, **kwargs):
        super().prepare(lengths=lengths)
        if right_padding is not None and max(right_padding) > 0:
            self.right_padding = mx.array(right_padding, mx.int32)

    def finalize(self):
        """After a right-padded prompt: each row's padding (its last rows) moves to
        the left, where left_padding masks it."""
        super().finalize()
        if self.right_padding is None:
            return
        shift, self.right_padding = self.right_padding, None
        if self.cumsum is not None:
            self.map_buffers(lambda a: roll_right(a[:, :, : self.offset], shift))
        self.left_padding = shift if self.left_padding is None else self.left_padding + shift

    @property
    def batch_size(self) -> int:
        if self.cumsum is not None:
            return self.cumsum.shape[0]
        return super().batch_size

    def filter(self, batch_indices):
        indices = mx.array(batch_indices, mx.int32)
        if self.cumsum is not None:
            self.map_buffers(lambda a: a[indices])
        if self.right_padding is not None:
            self.right_padding = self.right_padding[indices]
        super().filter(batch_indices)
        self.drop_common_padding()

    def drop_common_padding(self):
        """Drops the leading rows that are padding in every sequence."""
        if self.left_padding is None or self.cumsum is None:
            return
        common = int(self.left_padding.min())
        if common == self.offset:  # nothing but padding left: an empty cache
            self.set_buffers([None] * 3)
            self.offset, self.left_padding = 0, None
        elif common > 0:
            self.map_buffers(lambda a: a[:, :, common : self.offset])
            self.offset -= common
            self.left_padding = self.left_padding - common

    def extract(self, idx: int) -> "FoxCache":
        single = super().extract(idx)
        single.left_padding = None
        if self.cumsum is not None:
            padding = 0 if self.left_padding is None else int(self.left_padding[idx])
            single.set_buffers([each(lambda a: mx.contiguous(a[idx : idx + 1, :, padding : self.offset]), b)
                                for b in self.buffers()])
            single.offset = self.offset - padding
        return single

    @classmethod
    def merge(cls, caches: List["FoxCache"]) -> "FoxCache":
        """Sequences of different lengths side by side, each left-padded to the
        longest."""
        merged = super().merge(caches)
        longest = max(c.offset for c in caches)
        if longest == 0:
            merged.left_padding = None
            return merged
        like = next(c for c in caches if c.offset).buffers()
        rows = [c.batch_size for c in caches]
        merged.left_padding = mx.concatenate([
            (c.left_padding if c.left_padding is not None else mx.zeros((n,), mx.int32))
            + (longest - c.offset) for c, n in zip(caches, rows)])
        columns = zip(*[c.left_padded_buffers(longest, like, n) for c, n in zip(caches, rows)])
        merged.set_buffers([each(lambda *parts: mx.concatenate(parts), *column)
                            for column in columns])
        merged.offset = longest
        return merged

    def left_padded_buffers(self, length: int, like: list, rows: int) -> list:
        """The written rows, left-padded with zeros to ``length`` (``like``: another
        cache's buffers, for the shapes when this one is empty)."""
        if self.cumsum is None:
            return [each(lambda a: zero_rows(a, rows, length), b) for b in like]
        missing = length - self.offset
        return [each(lambda a: mx.concatenate([zero_rows(a, a.shape[0], missing),
                                               a[:, :, : self.offset]], axis=2), b)
                for b in self.buffers()]

    # --- state ---

    def empty(self) -> bool:
        return self.offset == 0

    def size(self) -> int:
        return self.offset

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QuantizedFoxCache":
        """The same keys, values and running sums in a QuantizedFoxCache (mlx-lm's
        ``--kv-bits`` asks every cache that can). A group size that does not divide
        the head size is lowered to the largest of 128, 64 and 32 that does."""
        quantized = QuantizedFoxCache(group_size, bits)
        quantized.conv_state, quantized.left_padding = self.conv_state, self.left_padding
        quantized.lengths, quantized.rows = self.lengths, self.rows
        quantized.right_padding = self.right_padding
        if self.cumsum is None:
            return quantized
        keys, values, cumsum = self.exact_rows()
        if keys.shape[-1] % group_size:
            quantized.group_size = quantization_group(keys.shape[-1], group_size)
        quantized.store(keys, values, cumsum)
        return quantized

    def exact_rows(self) -> list:
        """Keys, values and running sums of the written rows, as float arrays."""
        return [each(lambda a: a[:, :, : self.offset], b) for b in self.buffers()]

    @property
    def nbytes(self) -> int:
        arrays = [self.conv_state, *self.buffers()]
        flat = [a for value in arrays if value is not None
                for a in (value if isinstance(value, (list, tuple)) else [value])]
        return sum(a.nbytes for a in flat)

    @property
    def state(self):
        written = [None if b is None else each(lambda a: a[:, :, : self.offset], b)
                   for b in self.buffers()]
        return [self.conv_state, self.left_padding, *written, self.offset]

    @state.setter
    def state(self, values):
        self.conv_state, self.left_padding, *buffers, self.offset = values
        # A prompt-cache file gives quantized triples back as lists.
        self.set_buffers([tuple(b) if isinstance(b, list) else b for b in buffers])
        self.lengths, self.rows, self.right_padding = None, None, None


def zero_rows(like: mx.array, batch: int, n: int) -> mx.array:
    """Zeros shaped as ``like`` [B, H, S, ...] with ``batch`` rows and n positions."""
    return mx.zeros((batch, like.shape[1], n, *like.shape[3:]), like.dtype)


def quantization_group(head_size: int, requested: int) -> int:
    """The largest of 128, 64 and 32, at most ``requested``, dividing the head size."""
    for size in (128, 64, 32):
        if size <= requested and head_size % size == 0:
            return size
    raise ValueError(f"kv_group_size {requested}: no group size of 32, 64 or 128 up to it "
                     f"divides the FoX head size ({head_size})")


class QuantizedFoxCache(FoxCache):
    """FoxCache with K and V stored as ``bits``-bit groups (mx.quantize triples), in
    the exact cache's layout (K per KV head, V per query head); the running sum stays
    exact."""

    def __init__(self, group_size: int = 64, bits: int = 8):
        super().__init__()
        self.group_size, self.bits = group_size, bits

    def store(self, keys, values, cumsum):
        quantized = [mx.quantize(a, group_size=self.group_size, bits=self.bits)
                     for a in (keys, values)]
        return super().store(*quantized, cumsum)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QuantizedFoxCache":
        """Itself where it holds these bits already (mlx-lm asks again every step)."""
        if self.cumsum is not None:
            head_size = self.keys[0].shape[-1] * 32 // self.bits
            if head_size % group_size:
                group_size = quantization_group(head_size, group_size)
        if (group_size, bits) == (self.group_size, self.bits):
            return self
        return super().to_quantized(group_size, bits)

    def exact_rows(self) -> list:
        keys, values, cumsum = super().exact_rows()
        return [mx.dequantize(*a, group_size=self.group_size, bits=self.bits)
                for a in (keys, values)] + [cumsum]

    def extract(self, idx: int) -> "QuantizedFoxCache":
        single = super().extract(idx)
        single.group_size, single.bits = self.group_size, self.bits
        return single

    @classmethod
    def merge(cls, caches):
        merged = super().merge(caches)
        merged.group_size, merged.bits = caches[0].group_size, caches[0].bits
        return merged

    @property
    def state(self):
        return [*super().state, self.group_size, self.bits]

    @state.setter
    def state(self, values):
        *rest, self.group_size, self.bits = values
        FoxCache.state.fset(self, rest)


# What make_cache's entries hold; saved chat sessions record it. 4: Genesis's own
# cache classes, quantized V per head (3: quantized V grouped by KV head; 2: mlx-lm's
# KVCache with V per head; 1: V grouped with K).
CACHE_LAYOUT = 4

GENESIS_CACHES = (GLACache, TTTCache, FoxCache, QuantizedFoxCache)

# mlx-lm's load_prompt_cache rebuilds each cache from its class name, looked up in
# its cache module: ours are registered there so that prompt-cache files (and chat
# sessions) of Genesis models load in mlx-lm's own tools too.
for _cache_class in GENESIS_CACHES:
    _taken = getattr(mlx_lm_cache, _cache_class.__name__, _cache_class)
    if _taken is not _cache_class and _taken.__module__ != _cache_class.__module__:
        raise ImportError(f"mlx_lm.models.cache already has a {_cache_class.__name__}")
    setattr(mlx_lm_cache, _cache_class.__name__, _cache_class)
