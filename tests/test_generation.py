"""Generation as the reference does it: its CLI's sampling defaults, its repetition
penalty over the whole sequence."""

import inspect

import mlx.core as mx
import numpy as np
import torch

import reference as R
from conftest import CONFIGS, mlx_model, tokens
from genesis_mlx.generation.generate import SamplingOptions


def test_sampling_defaults_are_the_reference_clis():
    import genesis.cli

    chat_defaults = inspect.signature(genesis.cli.GenesisChat.generate).parameters
    ours = SamplingOptions()
    assert ours.temp == chat_defaults["temperature"].default
    assert ours.top_k == chat_defaults["top_k"].default
    assert ours.top_p == chat_defaults["top_p"].default
    assert ours.repetition_penalty == chat_defaults["repetition_penalty"].default


def greedy_tokens(model, prompt, n, penalty):
    from mlx_lm.generate import generate_step

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
