"""Decoding state: chunked prefill, TTT while decoding, greedy equality with the
reference's generate, left-padded batches, prompt-cache files."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import reference as R
from conftest import logits_rounding, logits_tolerance
from conftest import CONFIGS, mlx_model, tokens


def run_chunks(model, ids, sizes):
    cache, outs, start = model.make_cache(), [], 0
    for size in sizes:
        outs.append(model(mx.array(ids[:, start : start + size]), cache=cache))
        start += size
    assert start == ids.shape[1]
    return np.concatenate([np.array(o) for o in outs], axis=1), cache


def cache_arrays(cache):
    """Every state array (the FoX buffers' written rows)."""
    from mlx.utils import tree_flatten

    return [np.array(a) for c in cache for _, a in tree_flatten(c.state)
            if isinstance(a, mx.array) and a.size]


@pytest.mark.usefixtures("forms_arrangement")
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("ttt", [True, False])
def test_prefill_in_one_piece_chunks_or_tokens(reference_checkpoint, name, ttt):
    _, path = reference_checkpoint(**CONFIGS[name])
    model = mlx_model(path, ttt_enabled=ttt)
    ids = tokens(150)
    whole, c1 = run_chunks(model, ids, [150])
    chunked, c2 = run_chunks(model, ids, [1, 63, 64, 5, 17])
    # 70 rows after 57: more than the FoX buffers' free rows plus one growth step.
    uneven, c3 = run_chunks(model, ids, [57, 70, 23])
    stepped, c4 = run_chunks(model, ids, [1] * 150)
    rounding = logits_rounding(model, ids)
    for other in (chunked, uneven, stepped):
        assert np.abs(whole - other).max() <= rounding.tolerance
    arrays = [cache_arrays(c) for c in (c1, c2, c3, c4)]
    assert len(arrays[0]) > 0 and all(len(a) == len(arrays[0]) for a in arrays)
    for a, *others in zip(*arrays):
        for b in others:
            assert np.abs(a - b).max() <= rounding.tolerance_for(a)


@pytest.mark.usefixtures("forms_arrangement")
@pytest.mark.parametrize("name", ["gqa", "gqa3"])
def test_ttt_decoding_equals_full_forward_at_every_step(reference_checkpoint, name):
    ref, path = reference_checkpoint(**CONFIGS[name])
    model = mlx_model(path)
    ids = tokens(80)
    stepped, _ = run_chunks(model, ids, [20] + [1] * 60)
    tol = logits_tolerance(ref, ids)
    for t in range(19, 80, 7):
        full = np.array(model(mx.array(ids[:, : t + 1])))[:, -1]
        assert np.abs(stepped[:, t] - full).max() <= tol, t
    for t in (19, 79):  # and the oracle itself, for the TTT-on no-cache forward
        want = R.reference_logits(ref, ids[:, : t + 1])[:, -1]
        assert np.abs(stepped[:, t] - want).max() <= tol, t


@pytest.mark.usefixtures("forms_arrangement")
@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_tokens_equal_reference_generate(reference_checkpoint, name):
    """With TTT off, greedy decoding matches the reference's cached generate()."""
    from genesis_mlx.generation.generate import SamplingOptions
    from mlx_lm.generate import generate_step

    ref, path = reference_checkpoint(**CONFIGS[name])
    model = mlx_model(path, ttt_enabled=False)
    prompt = tokens(33)
    with torch.no_grad():
        out = ref.generate(torch.tensor(prompt), max_new_tokens=40, temperature=1.0, top_k=1)
    want = out[0, 33:].tolist()
    sampler = SamplingOptions(temp=0.0, repetition_penalty=1.0).sampler()
    got = [t for t, _ in generate_step(mx.array(prompt[0]), model, max_tokens=40,
                                       sampler=sampler, prompt_cache=model.make_cache())]
    assert got == want


@pytest.mark.usefixtures("forms_arrangement")
@pytest.mark.parametrize("ttt", [True, False])
def test_left_padded_batch_rows_equal_rows_alone(reference_checkpoint, ttt):
    _, path = reference_checkpoint(**CONFIGS["gqa3"])
    model = mlx_model(path, ttt_enabled=ttt)
    rows = [tokens(70, seed=1)[0], tokens(25, seed=2)[0], tokens(1, seed=3)[0]]
    width = max(len(r) for r in rows)
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, True
    cache = model.make_cache()
    batch_prefill = np.array(model(mx.array(ids), cache=cache, pad_mask=mx.array(mask)))
    steps = tokens(6, B=3, seed=4)
    batch_steps = [np.array(model(mx.array(steps[:, j : j + 1]), cache=cache))
                   for j in range(6)]
    for i, r in enumerate(rows):
        alone_cache = model.make_cache()
        alone = np.array(model(mx.array(r[None]), cache=alone_cache))
        tol = logits_tolerance(model, np.r_[r, steps[i]])
        assert np.abs(batch_prefill[i, width - len(r):] - alone[0]).max() <= tol
        for j in range(6):
            step = np.array(model(mx.array(steps[i : i + 1, j : j + 1]), cache=alone_cache))
            assert np.abs(batch_steps[j][i] - step[0]).max() <= tol, (i, j)


@pytest.mark.parametrize("name", CONFIGS)
def test_cpu_gla_block_layout_equals_the_block(reference_checkpoint, name):
    """The CPU's one-token GLA block (derived weights, grouped heads, RoPE as
    products, residuals in addmm) against the block's own __call__, from a state 300
    tokens in: output and every cache entry."""
    import copy

    from genesis_mlx.cpu.decode import derive, gla_block_token

    _, path = reference_checkpoint(**CONFIGS[name])
    model = mlx_model(path)
    block = next(b for b in model.blocks if not b.is_fox)
    cache = model.make_cache()
    model(mx.array(tokens(300)), cache=cache)
    x = model.tok_emb(mx.array(tokens(1, seed=5)))
    general, lean = cache[0], copy.deepcopy(cache[0])
    want = np.array(block(x, general))
    got = np.array(gla_block_token(block, x, lean, derive(block)))
    rounding = logits_rounding(model, np.r_[tokens(300)[0], tokens(1, seed=5)[0]])
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= rounding.tolerance_for(want)
    for field in general.ROWS:
        a, b = getattr(general, field), getattr(lean, field)
        if a is None:
            assert b is None, field
            continue
        a, b = np.array(a), np.array(b)
        assert a.shape == b.shape and np.abs(a - b).max() <= rounding.tolerance_for(a)


def test_fox_compiled_token_step_equals_eager_attention(reference_checkpoint, monkeypatch):
    """The CPU forms' decode step (the token written into the cache's buffers,
    attention over all their rows with those past it masked, compiled once per
    buffer size) against the eager form it stands for (the token stored, the grouped
    form over the rows written): a left-padded batch decoding across the cache's
    growth steps, logits and every cache array."""
    from genesis_mlx import kernels
    from genesis_mlx.cpu import fox
    from genesis_mlx.model.cache import FOX_CACHE_STEP

    monkeypatch.setenv("GENESIS_MLX_FORMS", "cpu")
    _, path = reference_checkpoint(**CONFIGS["gqa3"])
    model = mlx_model(path)
    for block in model.blocks:  # forget gates ~1: masked keys would weigh as much as any
        if block.is_fox:
            gate = block.attn.fgate_proj
            gate.update({"weight": mx.zeros_like(gate.weight), "bias": mx.full(gate.bias.shape, 8.0)})
    ids = np.stack([tokens(40, seed=1)[0], np.r_[np.zeros(15, np.int64), tokens(25, seed=2)[0]]])
    mask = np.ones(ids.shape, bool)
    mask[1, :15] = False
    steps = tokens(FOX_CACHE_STEP + 40, B=2, seed=4)
    used = []
    compiled_step = fox.attend_token

    def decode_all(use_compiled):
        def attend_token(q, k, v, log_f, cache, scale):
            used.append(use_compiled)
            if use_compiled:
                return compiled_step(q, k, v, log_f, cache, scale)
            cumsum = log_f + cache.last_cumsum()
            k_all, v_all, cumsum_all = cache.store(k, v, cumsum)
            return kernels.fox_attend(q, k_all, v_all, cumsum, cumsum_all, scale,
                                      cache.left_padding, cached=True)

        monkeypatch.setattr(fox, "attend_token", attend_token)
        cache = model.make_cache()
        model(mx.array(ids), cache=cache, pad_mask=mx.array(mask))
        logits = [np.array(model(mx.array(steps[:, j : j + 1]), cache=cache))
                  for j in range(steps.shape[1])]
        return np.concatenate(logits, axis=1), cache

    got, got_cache = decode_all(True)
    n_fox = sum(b.is_fox for b in model.blocks)
    assert len(used) == n_fox * steps.shape[1] and all(used)
    used.clear()
    want, want_cache = decode_all(False)
    assert len(used) == n_fox * steps.shape[1] and not any(used)
    rounding = logits_rounding(model, np.r_[ids[0], steps[0]])
    assert np.abs(got - want).max() <= rounding.tolerance
    got_arrays, want_arrays = cache_arrays(got_cache), cache_arrays(want_cache)
    assert len(got_arrays) == len(want_arrays) > 0
    for a, b in zip(got_arrays, want_arrays):
        assert a.shape == b.shape and np.abs(a - b).max() <= rounding.tolerance_for(b)


def decode_a_while(model, ids):
    """A prompt of 30 tokens, then 5 decoded one by one (every step compiled) -> the
    cache."""
    cache = model.make_cache()
    model(mx.array(ids[:, :30]), cache=cache)
    for t in range(30, 35):
        model(mx.array(ids[:, t : t + 1]), cache=cache)
    return cache


def assert_next_token_as_full_forward(model, ids):
    """A fresh cache through 35 tokens, then one decoding step: the full forward's."""
    cache = model.make_cache()
    model(mx.array(ids[:, :35]), cache=cache)
    got = np.array(model(mx.array(ids[:, 35:36]), cache=cache))
    want = np.array(model(mx.array(ids[:, :36]))[:, -1:])
    assert np.abs(got - want).max() <= logits_tolerance(model, ids[:, :36])


@pytest.mark.usefixtures("forms_arrangement")
def test_decoding_sees_weights_replaced_after_it_started(reference_checkpoint):
    """The compiled steps read the weights at every call, and W0's diagonality once
    per W0: after model.update, a decoding step must use the new weights, as the full
    forward does."""
    from mlx.utils import tree_map

    _, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path)
    ids = tokens(40)
    ttt = model.metacognition.ttt
    ttt.W0 = mx.diag(mx.diagonal(ttt.W0))
    decode_a_while(model, ids)
    block_updates = [{"attn": {"q_proj": {"weight": b.attn.q_proj.weight * 1.5},
                               "o_proj": {"weight": b.attn.o_proj.weight * 0.5}},
                      "ffn": {"up_proj": {"weight": b.ffn.up_proj.weight * 2.0}},
                      "attn_norm": tree_map(lambda a: a + 0.3, b.attn_norm.parameters())}
                     for b in model.blocks]
    # W0 diagonal while decoding started, then not: checked once per W0 (a product
    # with a diagonal W0 equals the diagonal's, so only this direction can fail).
    W0 = model.metacognition.ttt.W0
    off_diagonal = 0.05 * mx.random.normal(W0.shape, key=mx.random.key(0))
    model.update({"blocks": block_updates,
                  "metacognition": {"ttt": {"W0": mx.diag(mx.diagonal(W0)) + off_diagonal}}})
    assert not model.metacognition.ttt.w0_is_diagonal()
    assert_next_token_as_full_forward(model, ids)


@pytest.mark.usefixtures("forms_arrangement")
def test_decoding_sees_layers_replaced_after_it_started(reference_checkpoint):
    """A projection replaced by another module (as LoRA and quantization do) after
    decoding started: the next step uses the new module, as the full forward does."""
    import mlx.nn as nn

    _, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path)
    ids = tokens(40)
    decode_a_while(model, ids)
    for block in model.blocks:
        for owner, name in ((block.attn, "q_proj"), (block.ffn, "down_proj")):
            old = owner[name]
            new = nn.Linear(old.weight.shape[1], old.weight.shape[0], bias=False)
            new.weight = old.weight * 1.5
            setattr(owner, name, new)
    assert_next_token_as_full_forward(model, ids)


@pytest.mark.usefixtures("forms_arrangement")
def test_decoding_sees_runtime_options_changed_after_it_started(reference_checkpoint):
    """The compiled TTT step reads the TTT strength: changed while decoding, the next
    step uses the new value, as the full forward does."""
    _, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path)
    ids = tokens(40)
    cache = decode_a_while(model, ids)
    model.args.ttt_strength = 0.9
    got = np.array(model(mx.array(ids[:, 35:36]), cache=cache))
    want = np.array(model(mx.array(ids[:, :36]))[:, -1:])
    assert np.abs(got - want).max() <= logits_tolerance(model, ids[:, :36])
    model.args.ttt_strength = 0.2
    assert np.abs(np.array(model(mx.array(ids[:, :36]))[:, -1:]) - want).max() > 1e-3, \
        "fixture too weak: the strength changes nothing"


def test_compiled_steps_go_with_the_model(reference_checkpoint):
    """The one-token path's compiled functions are freed with the model, without
    waiting for the garbage collector (MLX keeps their traces per thread: released at
    a thread's exit during interpreter shutdown instead, they abort the process, as
    mlx-lm's server did on Ctrl-C)."""
    import gc
    import weakref

    _, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path)
    cache = model.make_cache()
    model(mx.array(tokens(10)), cache=cache)
    mx.eval(model(mx.array(tokens(1)), cache=cache))  # every step compiled and traced
    steps = model.token_steps()
    compiled = [step for _, step in steps.blocks.values()] + [held[-1] for held in steps.ttt.values()]
    assert len(compiled) == len(model.blocks) + 1
    alive = [weakref.ref(step) for step in compiled] + [weakref.ref(steps)]
    del compiled, steps, model, cache
    gc.disable()
    try:
        assert all(ref() is None for ref in alive)
    finally:
        gc.enable()


def test_each_token_step_compiles_once(reference_checkpoint, monkeypatch):
    """Decoding compiles each block's step and the TTT head's on the first token only;
    a W0 replaced later (loading, fuse) compiles the TTT step once more (its
    diagonality is a constant of the trace), then holds it."""
    from genesis_mlx.model import decoding

    _, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path)
    cache = model.make_cache()
    model(mx.array(tokens(10)), cache=cache)
    mx.eval(model(mx.array(tokens(1)), cache=cache))
    compiled, original = [], decoding.compile_with_cache
    monkeypatch.setattr(decoding, "compile_with_cache",
                        lambda *a: compiled.append(a) or original(*a))
    for _ in range(3):
        mx.eval(model(mx.array(tokens(1)), cache=cache))
    assert compiled == []
    model.metacognition.ttt.W0 = model.metacognition.ttt.W0 * 1
    for _ in range(3):
        mx.eval(model(mx.array(tokens(1)), cache=cache))
    assert len(compiled) == 1


def test_prompt_cache_file_round_trip(reference_checkpoint, tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    _, path = reference_checkpoint(**CONFIGS["gqa"])
    model = mlx_model(path)
    ids = tokens(60)
    cache = model.make_cache()
    model(mx.array(ids[:, :50]), cache=cache)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    resumed = load_prompt_cache(str(tmp_path / "c.safetensors"))
    a = np.array(model(mx.array(ids[:, 50:]), cache=cache))
    b = np.array(model(mx.array(ids[:, 50:]), cache=resumed))
    assert np.abs(a - b).max() == 0.0


def test_fox_cache_keeps_k_per_kv_head_and_v_per_head(reference_checkpoint):
    """K is stored once per KV head (not repeated for its query heads), V per query
    head, contiguous, as each head's matrix-vector product with it reads it."""
    _, path = reference_checkpoint(**CONFIGS["gqa3"])  # 6 query heads, 2 KV heads
    model = mlx_model(path)
    cache = model.make_cache()
    model(mx.array(tokens(40)), cache=cache)
    fox = cache[4]
    _, _, keys, values, cumsum, offset = fox.state
    assert offset == 40 and fox.keys.shape[2] == fox.cumsum.shape[2] >= 40
    assert keys.shape == (1, 2, 40, 16) and values.shape == (1, 6, 40, 16)
    assert cumsum.shape == (1, 6, 40)


KV32 = dict(n_embd=64, n_head=2, n_kv_head=1)  # head size 32: quantizable in groups of 32


def fox_kv_bytes(cache):
    """Bytes of the FoX layers' K and V (written rows)."""
    from mlx.utils import tree_flatten

    from genesis_mlx.model.cache import FoxCache

    return sum(a.nbytes for c in cache if isinstance(c, FoxCache)
               for _, a in tree_flatten(c.state[2:4]))


@pytest.mark.usefixtures("forms_arrangement")
def test_quantized_fox_cache_decodes_close_to_exact(reference_checkpoint, tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    _, path = reference_checkpoint(**KV32)
    model = mlx_model(path)
    ids = tokens(90)
    exact, exact_cache = run_chunks(model, ids, [70, 1, 19])
    cache = model.make_cache(kv_bits=8)  # groups of 32: the head size is 32
    outs = [model(mx.array(ids[:, :70]), cache=cache), model(mx.array(ids[:, 70:71]), cache=cache)]
    save_prompt_cache(str(tmp_path / "q.safetensors"), cache)
    resumed = load_prompt_cache(str(tmp_path / "q.safetensors"))
    outs.append(model(mx.array(ids[:, 71:]), cache=cache))
    quantized = np.concatenate([np.array(o) for o in outs], axis=1)
    err = np.abs(quantized - exact).max()
    print(f"8-bit FoX cache: max|delta| {err:.2e}, max|logit| {np.abs(exact).max():.2f}")
    # The accuracy README's "How it runs" promises: 8-bit rounding of K and V (a
    # step of 1/255 of each group's range), not float32's, sets its size.
    assert 0 < err <= 5e-3 * max(1.0, np.abs(exact).max())
    # 1 byte per element plus an fp32 scale and bias per 32, against 4 bytes
    assert fox_kv_bytes(cache) / fox_kv_bytes(exact_cache) == (1 + 8 / 32) / 4
    again = np.array(model(mx.array(ids[:, 71:]), cache=resumed))
    assert np.abs(again - quantized[:, 71:]).max() == 0.0
    with pytest.raises(ValueError, match="kv_bits 3"):
        model.make_cache(kv_bits=3)
    with pytest.raises(ValueError, match="kv_group_size 64"):
        model.make_cache(kv_bits=8, kv_group_size=64)  # does not divide the head size 32
