"""The token loop: mlx-lm's ``generate_step`` contract (yields ``(token, logprobs)``;
every token it yields has been fed to the cache by the time the caller asks for
the next one or closes the loop), with the first token out sooner.

mlx-lm reads the prompt but its last token, then runs that token as a decoding step,
and hands out token n only after dispatching the step that feeds it. On MLX's CPU
backend ``mx.async_eval`` returns only once most of a graph has run, so there the
first token waits for the prompt, plus two decoding steps. Here the last token is read
with the rest (only its position goes through the output layer), and the first token
is handed out before the step that feeds it; that step runs when the caller asks for
the next token, or on ``close()`` (generation closes the loop when it stops; a loop
closed only after its cache has moved on, by other reads, leaves it as it is), so the
cache still ends holding every token handed out. From the second token on, it is
mlx-lm's loop: the next step is dispatched before a token is handed out, which on a
GPU overlaps building a step's graph with running the last one."""

import itertools
from typing import Callable, Generator, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.generate import generation_stream

from ..model.cache import FoxCache

# Prompts are read in pieces of this many tokens: a FoX layer's attention scores for a
# piece are [heads, piece, context], so the piece bounds prefill memory (mlx-lm's
# default, 2048, holds twice as much); on the CPU, 1024 reads a long prompt as fast
# as 2048 and faster than 512 (BENCHMARKS.md).
PREFILL_STEP = 1024


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def prefill(model, ids, cache: list, step: int = PREFILL_STEP):
    """Reads token ids (a list or an array [T]) into the cache in pieces of ``step``
    tokens."""
    ids = mx.array(ids)
    for start in range(0, ids.shape[0], step):
        model.hidden_states(ids[start : start + step][None], cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()


def progress_marks(cache: list) -> list:
    """What reading one more token changes in each layer's cache: a FoX cache's row
    count; the arrays of the others, which every step replaces."""
    return [c.offset if isinstance(c, FoxCache) else c.state for c in cache]


def moved_since(cache: list, marks: list) -> bool:
    return any(c.offset != mark if isinstance(c, FoxCache)
               else any(a is not b for a, b in zip(c.state, mark))
               for c, mark in zip(cache, marks))


def generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable]] = None,
    prompt_cache: Optional[list] = None,
    prefill_step_size: int = PREFILL_STEP,
) -> Generator[Tuple[int, mx.array], None, None]:
    """Token ids [T] (T >= 1) -> (token, logprobs [vocab]) per generated token, at
    most ``max_tokens`` (-1: no limit). ``prompt_cache`` (``model.make_cache()``) is
    updated in place; ``sampler`` and ``logits_processors`` are mlx-lm's."""
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("generate_step needs a non-empty 1-D array of token ids")
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    sampler = sampler or greedy
    seen = None  # what the logits processors see: the prompt and the tokens so far

    def sample(logits, new_tokens):
        nonlocal seen
        if logits_processors:
            seen = new_tokens if seen is None else mx.concatenate([seen, new_tokens])
            for processor in logits_processors:
                logits = processor(seen, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    def decode(token):
        with mx.stream(generation_stream):
            return sample(model(token[None], cache=cache)[:, -1], token)

    def dispatch(token):
        next_y, next_logprobs = decode(token)
        mx.async_eval(next_y, next_logprobs)
        return next_y, next_logprobs

    if max_tokens == 0:  # as mlx-lm's: the prompt is read, nothing is generated
        with mx.stream(generation_stream):
            prefill(model, prompt, cache, prefill_step_size)
        return
    with mx.stream(generation_stream):
        last = prompt.size - 1
        read = last - last % prefill_step_size  # the final piece keeps the last token
        prefill(model, prompt[:read], cache, prefill_step_size)
        hidden = model.hidden_states(prompt[read:][None], cache)
        y, logprobs = sample(model.logits(hidden[:, -1]), prompt)
    mx.eval(y, logprobs)
    marks = progress_marks(cache)
    try:  # the first token, handed out before the step that feeds it
        yield y.item(), logprobs
    except GeneratorExit:
        # Closed now, or collected later: feed it unless the cache has moved on since.
        if not moved_since(cache, marks):
            decode(y)
            mx.eval([c.state for c in cache])
        raise
    del marks
    following = dispatch(y)
    for n in itertools.count(1):
        if n == max_tokens:
            return
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = following
        following = dispatch(y)  # mlx-lm's order: on its way before y is read
        yield y.item(), logprobs
