"""Generation as the reference does it (its CLI's sampling defaults, its repetition
penalty over the whole sequence), through a token loop that gives mlx-lm's
generate_step's tokens and decoding state."""

import inspect

import mlx.core as mx
import numpy as np
import pytest
import torch

import reference as R
from conftest import CONFIGS, logits_rounding, mlx_model, tokens
from genesis_mlx.generation.generate import SamplingOptions
from genesis_mlx.generation.steps import generate_step


def test_sampling_defaults_are_the_reference_clis():
    import genesis.cli

    chat_defaults = inspect.signature(genesis.cli.GenesisChat.generate).parameters
    ours = SamplingOptions()
    assert ours.temp == chat_defaults["temperature"].default
    assert ours.top_k == chat_defaults["top_k"].default
    assert ours.top_p == chat_defaults["top_p"].default
    assert ours.repetition_penalty == chat_defaults["repetition_penalty"].default


def greedy_tokens(model, prompt, n, penalty):
    options = SamplingOptions(temp=0.0, repetition_penalty=penalty)
    steps = generate_step(mx.array(prompt[0]), model, max_tokens=n, sampler=options.sampler(),
                          logits_processors=options.logits_processors(10_000),
                          prompt_cache=model.make_cache())
    return [int(t) for t, _ in steps]


def test_repetition_penalty_covers_the_whole_sequence_as_the_references(reference_checkpoint):
    """The reference penalises every token seen since the start of the prompt (mlx-lm's
    default looks back 20 tokens): greedy tokens with a strong penalty over a 60-token
    prompt equal its generate's (TTT off, as its cached generate runs)."""
    ref, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path, ttt_enabled=False)
    prompt = tokens(60, seed=3)
    penalty = 3.0
    with torch.no_grad():
        out = ref.generate(torch.tensor(prompt), max_new_tokens=30, temperature=1.0, top_k=1,
                           repetition_penalty=penalty)
    want = out[0, 60:].tolist()
    got = greedy_tokens(model, prompt, 30, penalty)
    assert got == want
    assert got != greedy_tokens(model, prompt, 30, 1.0), "fixture too weak: no token changed"
    windowed = SamplingOptions(repetition_penalty=penalty)
    assert np.array_equal(
        np.array(windowed.logits_processors(10_000)[0](mx.array(prompt[0]), mx.zeros((1, 512)) + 1)),
        np.where(np.isin(np.arange(512), prompt[0]), 1 / penalty, 1.0)[None].astype(np.float32))


def run_loop(step_fn, model, prompt, n_tokens, stop_after=None):
    """Tokens and logprobs from a token loop (sampled at temperature 0.8 from a fixed
    seed, repetition penalty on), stopped by closing it after ``stop_after`` tokens,
    and the decoding state after."""
    from mlx_lm.sample_utils import make_repetition_penalty, make_sampler

    mx.random.seed(11)
    cache = model.make_cache()
    steps = step_fn(mx.array(prompt), model, max_tokens=n_tokens, prompt_cache=cache,
                    sampler=make_sampler(0.8, top_k=40),
                    logits_processors=[make_repetition_penalty(1.5, 10_000)],
                    prefill_step_size=32)
    out = []
    for token, logprobs in steps:
        out.append((token, np.array(logprobs)))
        if len(out) == stop_after:
            break
    steps.close()
    return out, cache


@pytest.mark.parametrize("length", [1, 5, 32, 33, 70])
@pytest.mark.parametrize("stop_after", [None, 1, 3])
def test_token_loop_gives_mlx_lms_tokens_and_state(reference_checkpoint, length, stop_after):
    """Against mlx-lm's generate_step on prompts that end a prefill piece, start one,
    or fill one: the same sampled tokens, the same log-probabilities, and, once the
    loop is done or closed, a cache that has seen every token handed out."""
    from mlx_lm.generate import generate_step as mlx_lm_generate_step

    from test_cache import cache_arrays

    _, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path)
    prompt = tokens(length, seed=length)[0]
    got, got_cache = run_loop(generate_step, model, prompt, 6, stop_after)
    want, want_cache = run_loop(mlx_lm_generate_step, model, prompt, 6, stop_after)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert len(got) == (stop_after or 6)
    rounding = logits_rounding(model, np.r_[prompt, [t for t, _ in want]])
    # log-probabilities: twice the logits' tolerance (conftest.logprobs_tolerance), the
    # repetition penalty scaling a logit, and its error, by up to 1.5
    for (_, a), (_, b) in zip(got, want):
        assert np.abs(a - b).max() <= 1.5 * 2 * rounding.tolerance
    assert got_cache[0].positions.item() == want_cache[0].positions.item() == length + len(got)
    got_arrays, want_arrays = cache_arrays(got_cache), cache_arrays(want_cache)
    assert len(got_arrays) == len(want_arrays) > 0
    for a, b in zip(got_arrays, want_arrays):
        assert a.shape == b.shape and np.abs(a - b).max() <= rounding.tolerance_for(b)


def test_first_token_comes_from_the_prompts_read(reference_checkpoint, monkeypatch):
    """The first token is sampled from the prompt's own read, its last position alone
    through the output layer: no one-token decoding step runs before it."""
    from genesis_mlx.model.decoding import TokenSteps

    _, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path)
    calls, head_inputs = [], []
    decode_token = TokenSteps.__call__
    monkeypatch.setattr(TokenSteps, "__call__", lambda self, model, x, cache:
                        calls.append(1) or decode_token(self, model, x, cache))
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda x: head_inputs.append(x.shape) or logits(x))
    steps = generate_step(mx.array(tokens(40)[0]), model, max_tokens=4)
    next(steps)
    assert calls == [] and head_inputs == [(1, model.args.n_embd)]
    next(steps)  # feeds the first token, then dispatches the second's step (mlx-lm's order)
    assert len(calls) == 2
    steps.close()


@pytest.mark.parametrize("length", [1, 33])
@pytest.mark.parametrize("n_tokens, stop_after", [(0, None), (-1, 8)])
def test_token_loop_without_a_limit_or_with_none_to_give(reference_checkpoint, length,
                                                         n_tokens, stop_after):
    """max_tokens 0 reads the prompt and gives nothing; -1 goes on until closed: the
    tokens and the decoding state are mlx-lm's either way."""
    from mlx_lm.generate import generate_step as mlx_lm_generate_step

    from test_cache import cache_arrays

    _, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path)
    prompt = tokens(length, seed=length)[0]
    got, got_cache = run_loop(generate_step, model, prompt, n_tokens, stop_after)
    want, want_cache = run_loop(mlx_lm_generate_step, model, prompt, n_tokens, stop_after)
    assert [t for t, _ in got] == [t for t, _ in want] and len(got) == (stop_after or 0)
    assert got_cache[0].positions.item() == length + len(got)
    rounding = logits_rounding(model, np.r_[prompt, [t for t, _ in want]])
    for a, b in zip(cache_arrays(got_cache), cache_arrays(want_cache)):
        assert a.shape == b.shape and np.abs(a - b).max() <= rounding.tolerance_for(b)


def test_a_loop_closed_late_leaves_a_cache_that_moved_on(reference_checkpoint):
    """The first token is fed when the loop is closed, unless the cache has read
    something else since (a loop collected long after its caller went on)."""
    from genesis_mlx.generation.steps import prefill

    _, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path)
    cache = model.make_cache()
    steps = generate_step(mx.array(tokens(20)[0]), model, max_tokens=4, prompt_cache=cache)
    next(steps)
    prefill(model, [5, 6], cache)
    before = [np.array(a) for a in cache[0].state]
    steps.close()
    assert cache[0].positions.item() == 22
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(before, cache[0].state))


@pytest.mark.parametrize("finish", ["length", "stop"])
def test_stream_generate_feeds_its_last_token_before_handing_it_out(
        reference_checkpoint, tokenizer_path, finish):
    """The final response comes with its token already in the cache (mlx-lm's loop
    feeds every token it hands out): a caller may go on with the cache without
    exhausting or closing the stream."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    from genesis_mlx.generation.generate import stream_generate

    _, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path)
    prompt = tokens(20)[0].tolist()
    greedy = SamplingOptions(temp=0.0)
    tokenizer = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_file=tokenizer_path),
                                 eos_token_ids=[])
    first = next(stream_generate(model, tokenizer, prompt, 1, greedy,
                                 prompt_cache=model.make_cache())).token
    if finish == "stop":  # the first token ends the answer
        tokenizer = TokenizerWrapper(tokenizer._tokenizer, eos_token_ids=[first])
    cache = model.make_cache()
    stream = stream_generate(model, tokenizer, prompt, 1 if finish == "length" else 5, greedy,
                             prompt_cache=cache)
    last = next(stream)
    assert (last.finish_reason, last.token) == (finish, first)
    assert cache[0].positions.item() == len(prompt) + 1
    stream.close()


def test_limits_past_32_bits_and_the_vocabulary_generate(reference_checkpoint, tokenizer_path):
    """max_tokens past 2**31 (the repetition penalty's window is sliced with 32-bit
    indices) and top_k past the vocabulary (mlx-lm refuses it; it keeps every token, as
    0 does): tokens come, the same as without them."""
    from itertools import islice

    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    from genesis_mlx.generation.generate import stream_generate

    _, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path)
    tokenizer = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_file=tokenizer_path),
                                 eos_token_ids=[])
    prompt = tokens(20)[0].tolist()

    def first_tokens(max_tokens, top_k):
        sampling = SamplingOptions(temp=1.0, top_k=top_k, repetition_penalty=1.3, seed=5)
        stream = stream_generate(model, tokenizer, prompt, max_tokens, sampling)
        taken = [r.token for r in islice(stream, 6)]
        stream.close()
        return taken

    assert first_tokens(10**12, 10**9) == first_tokens(6, 0)
    assert first_tokens(6, 10**9) != first_tokens(6, 2)  # top_k does filter below the vocabulary
