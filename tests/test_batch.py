"""Batches through mlx-lm's own batch API (BatchGenerator, the calls its server makes):
each row's logits equal the same prompt run alone, with TTT on, rows joining and
leaving a running batch, prompts of very different lengths."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator, generate_step

from conftest import CONFIGS, logprobs_tolerance, mlx_model, tokens

# Each test runs under both arrangements of the model's math (conftest).
pytestmark = pytest.mark.usefixtures("forms_arrangement")


def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def alone(model, prompt, max_tokens):
    """(token, logprobs) of each step of the prompt generated on its own."""
    steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=greedy,
                          prompt_cache=model.make_cache())
    return [(int(token), np.array(logprobs)) for token, logprobs in steps]


def run_batch(model, prompts, max_tokens, late=(), **options):
    """Runs a BatchGenerator; ``late`` prompts are inserted while the others decode.
    -> {uid: [(token, logprobs)]}, uids in order of the prompts then the late ones."""
    generator = BatchGenerator(model, sampler=greedy, **options)
    uids = generator.insert([p.tolist() for p in prompts], list(max_tokens))
    got, steps = {}, 0
    while True:
        prompt_responses, responses = generator.next()
        for r in responses:
            got.setdefault(r.uid, []).append((r.token, np.array(r.logprobs)))
        steps += 1
        if steps == 4 and late:
            uids += generator.insert([p.tolist() for p, _ in late], [n for _, n in late])
        if not prompt_responses and not responses and steps > 4:
            return [got.get(uid, []) for uid in uids]


def assert_rows_equal_alone(model, prompts, max_tokens, rows):
    for prompt, n, row in zip(prompts, max_tokens, rows):
        want = alone(model, prompt, n)
        assert len(row) == len(want) == n
        tol = logprobs_tolerance(model, np.r_[prompt, [t for t, _ in want]])
        for step, ((token, logprobs), (want_token, want_logprobs)) in enumerate(zip(row, want)):
            assert np.abs(logprobs - want_logprobs).max() <= tol, (len(prompt), step)
            assert token == want_token, (len(prompt), step)


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    _, path = reference_checkpoint(**CONFIGS["gqa3"])
    return mlx_model(path)  # TTT on


def test_rows_joining_and_leaving_equal_rows_alone(model):
    """Prompts of 1 to 150 tokens (longer than the prefill step: read in several
    right-padded pieces), a batch smaller than the requests (rows wait, then join a
    running batch), different lengths to generate (rows leave it)."""
    prompts = [tokens(70, seed=1)[0], tokens(25, seed=2)[0], tokens(1, seed=3)[0]]
    late = [(tokens(150, seed=4)[0], 9), (tokens(5, seed=5)[0], 14)]
    max_tokens = [12, 20, 6]
    rows = run_batch(model, prompts, max_tokens, late, completion_batch_size=3,
                     prefill_batch_size=2, prefill_step_size=32)
    assert_rows_equal_alone(model, prompts + [p for p, _ in late],
                            max_tokens + [n for _, n in late], rows)


def test_prompt_caches_carry_over(model):
    """As the server reuses a finished request's cache for a longer prompt that starts
    with it: caches extracted from a batch, merged into a new batch with different
    lengths, continue as the rows alone."""
    first = [tokens(40, seed=6)[0], tokens(9, seed=7)[0]]
    generator = BatchGenerator(model, sampler=greedy, prefill_step_size=16)
    uids = generator.insert([p.tolist() for p in first], [5, 5])
    finished = {}
    while len(finished) < 2:
        for r in generator.next()[1]:
            if r.finish_reason is not None:
                finished[r.uid] = (r.prompt_cache, r.all_tokens)
    more = [tokens(7, seed=8)[0], tokens(30, seed=9)[0]]
    caches = [copy.deepcopy(finished[uid][0]) for uid in uids]
    history = [list(finished[uid][1]) for uid in uids]
    generator = BatchGenerator(model, sampler=greedy, prefill_step_size=16)
    uids = generator.insert([p.tolist() for p in more], [6, 6], caches=caches,
                            all_tokens=[list(h) for h in history])  # it appends to them
    rows = {uid: [] for uid in uids}
    while any(len(r) < 6 for r in rows.values()):
        for r in generator.next()[1]:
            rows[r.uid].append((r.token, np.array(r.logprobs)))
    full = [h + p.tolist() for h, p in zip(history, more)]
    assert_rows_equal_alone(model, full, [6, 6], [rows[uid] for uid in uids])
