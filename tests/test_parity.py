"""The MLX model reproduces the reference's eval-mode logits (fp32)."""

import mlx.core as mx
import numpy as np
import pytest

import reference as R
from conftest import CONFIGS, U32, logits_tolerance, measured, mlx_model, tokens

# Each test runs under both arrangements of the model's math (conftest).
pytestmark = pytest.mark.usefixtures("forms_arrangement")

LENGTHS = [1, 37, 100, 600]


def assert_parity(ref_logits, ours, tol):
    err = np.abs(ref_logits - np.array(ours)).max()
    assert err <= tol, f"max |delta| {err}, tolerance {tol}"
    return err


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("ttt", [True, False])
@pytest.mark.parametrize("T", LENGTHS)
def test_logits_match_reference(reference_checkpoint, name, ttt, T):
    ref, path = reference_checkpoint(**CONFIGS[name], use_ttt=ttt)
    ids = tokens(T)
    assert_parity(R.reference_logits(ref, ids), mlx_model(path)(mx.array(ids)),
                  logits_tolerance(ref, ids))


@pytest.mark.parametrize("T", [65, 130, 200])
def test_delta_rule_option_matches_reference(reference_checkpoint, T):
    ref, path = reference_checkpoint(**CONFIGS["gqa3"])
    ids = tokens(T)
    with_delta = R.reference_logits(ref, ids, delta_rule=True)
    without = R.reference_logits(ref, ids, delta_rule=False)
    assert np.abs(with_delta - without).max() > 1e-3, "fixture too weak to see the delta rule"
    assert_parity(with_delta, mlx_model(path, gla_delta_rule_at_inference=True)(mx.array(ids)),
                  logits_tolerance(ref, ids, delta_rule=True))
    assert_parity(without, mlx_model(path)(mx.array(ids)), logits_tolerance(ref, ids))


def test_ttt_switch_matches_reference_without_ttt(reference_checkpoint):
    """ttt_enabled=False equals a reference model whose TTT never runs."""
    ref, path = reference_checkpoint(**CONFIGS["gqa"])
    ids = tokens(50)
    on = R.reference_logits(ref, ids)
    ref.config.ttt_strength = 0.0  # the reference's own off switch
    off, tol = R.reference_logits(ref, ids), logits_tolerance(ref, ids)
    del ref.config.ttt_strength
    assert np.abs(on - off).max() > 1e-3, "fixture too weak to see TTT"
    assert_parity(off, mlx_model(path, ttt_enabled=False)(mx.array(ids)), tol)


def test_diagonal_w0_branch(reference_checkpoint):
    ref, path = reference_checkpoint(seed=3, diagonal_w0=True)
    ids = tokens(70)
    assert_parity(R.reference_logits(ref, ids), mlx_model(path)(mx.array(ids)),
                  logits_tolerance(ref, ids))


@pytest.mark.parametrize("T", [1, 9, 70])
def test_selective_activation(reference_checkpoint, T):
    ref, path = reference_checkpoint(use_selective_activation=True, selective_k_ratio=0.4)
    ids = tokens(T)
    sparse = R.reference_logits(ref, ids)
    assert_parity(sparse, mlx_model(path)(mx.array(ids)), logits_tolerance(ref, ids))
    dense = mlx_model(path, use_selective_activation=False)(mx.array(ids))
    assert np.abs(sparse - np.array(dense)).max() > 1e-3, "top-k had no effect"


def test_selective_activation_masks_match(reference_checkpoint):
    """The top-k masks themselves agree, layer by layer."""
    import torch

    ref, path = reference_checkpoint(use_selective_activation=True, selective_k_ratio=0.4)
    ours = mlx_model(path)
    x = np.random.RandomState(0).randn(1, 20, 64).astype(np.float32)
    for ref_block, block in zip(ref.blocks, ours.blocks):
        with torch.no_grad():
            h = torch.nn.functional.silu(ref_block.ffn.gate_proj(torch.tensor(x)))
            h = h * ref_block.ffn.up_proj(torch.tensor(x))
            want = R.genesis.layers.ffn.topk_mask(h, 0.4).numpy() > 0.5
        hidden = mx.array(h.numpy())
        got = np.array(block.ffn.topk_mask(hidden))
        assert (got == want).all()
        assert got.sum(-1).max() == int(160 * 0.4)


def test_batch_rows_and_reference_batch_pooling(reference_checkpoint):
    """Rows are independent here ("row" pooling); "batch" pooling is the reference's
    batch-mixing TTT confidence."""
    ref, path = reference_checkpoint(**CONFIGS["gqa"])
    ids = tokens(30, B=2)
    per_row = np.concatenate([R.reference_logits(ref, ids[i : i + 1]) for i in range(2)])
    tol = logits_tolerance(ref, ids)
    assert_parity(per_row, mlx_model(path)(mx.array(ids)), tol)
    mixed = R.reference_logits(ref, ids)
    assert_parity(mixed, mlx_model(path, ttt_confidence_pooling="batch")(mx.array(ids)), tol)


def reference_rope(head_qk_dim):
    return R.genesis.layers.norms.RotaryPositionalEmbedding(dim=head_qk_dim, max_seq_len=4096)


def gla_layer(head_qk_dim, inv_freq):
    """A GLA layer whose heads rotate as the reference's RoPE of ``head_qk_dim``."""
    from genesis_mlx.model.genesis import GatedLinearAttention, ModelArgs

    args = ModelArgs(n_embd=head_qk_dim * 4, n_head=4, n_kv_head=4, gla_expand_k=1.0,
                     rope_inv_freq=inv_freq.tolist())
    return GatedLinearAttention(args)


@pytest.mark.parametrize("head_qk_dim", [48, 24])
def test_rope_angles_are_the_references(head_qk_dim):
    """RoPE reproduces the reference's cos/sin tables at every position of them. For
    these head sizes (48: the real model's) numpy's float32 power can give frequencies
    a bit off torch's (on some CPUs), whose angles drift by ~6e-5 rad by position
    2000; so the port takes the checkpoint's buffer. Here the buffer is moved off the
    formula's values on every CPU, each still the float32 reciprocal of a float32 (as
    the reference's 1 / base ** (i / d) are)."""
    import torch

    from genesis_mlx.model.rope import inverse_frequencies

    rope = reference_rope(head_qk_dim)
    periods = np.float32(1) / rope.inv_freq.numpy()
    for _ in range(4):
        periods = np.nextafter(periods, np.float32(np.inf))
    rope.inv_freq.copy_(torch.tensor(np.float32(1) / periods))
    rope._build_cache(4096)
    inv_freq = rope.inv_freq.numpy()
    formula = inverse_frequencies(rope.rotary_dim, None)
    assert (formula != inv_freq).all(), "fixture too weak: formula == buffer"
    layer = gla_layer(head_qk_dim, inv_freq)
    x = np.random.RandomState(0).randn(1, 2, 4096, head_qk_dim).astype(np.float32)
    with torch.no_grad():
        want, _ = rope(torch.tensor(x), torch.tensor(x))
    got = np.array(layer.rope(mx.array(x), mx.array([0])))
    # cos and sin of the same float32 angles (position times frequency, one rounding
    # in both), each faithful (within 2u of values up to 1), then two products and a
    # sum: within 5u of |x| + |its rotation partner| each, 10u apart.
    half = rope.rotary_dim // 2
    partner = np.zeros_like(x)
    partner[..., :half], partner[..., half:2 * half] = x[..., half:2 * half], x[..., :half]
    assert (np.abs(got - want.numpy()) <= 10 * U32 * (np.abs(x) + np.abs(partner))).all()
    # The one-token step's angles (cos/sin of position * frequency), as the reference.
    positions = np.arange(4096, dtype=np.int32).reshape(-1, 1)
    cos, sin = (np.array(a) for a in layer.rope.cos_sin(mx.array(positions)))
    want_cos, want_sin = (t[0, 0, :, :half].numpy() for t in (rope.cos_cached, rope.sin_cached))
    assert np.abs(cos[:, :half] - want_cos).max() <= 2 * 2 * U32  # each faithful
    assert np.abs(sin[:, :half] - want_sin).max() <= 2 * 2 * U32


def test_rope_frequencies_come_from_the_checkpoint(tmp_path):
    """The reference builds its RoPE angles from the rope.inv_freq buffers it loads
    with the weights, not from its formula; so must the port."""
    ref = R.build_reference(R.make_config(**CONFIGS["gqa"]), seed=5)
    for module in ref.modules():
        if isinstance(module, R.genesis.layers.norms.RotaryPositionalEmbedding):
            module.inv_freq.mul_(1.02)
            module._build_cache(4096)
    path = R.save_reference_checkpoint(ref, tmp_path / "genesis.safetensors")
    ids = tokens(300)
    want, tol = R.reference_logits(ref, ids), logits_tolerance(ref, ids)
    formula = mlx_model(path, rope_inv_freq=None)(mx.array(ids))
    assert np.abs(want - np.array(formula)).max() > 1e-3, "fixture too weak"
    assert_parity(want, mlx_model(path)(mx.array(ids)), tol)
    # and through a converted directory (config.json carries them)
    from genesis_mlx.conversion.convert import convert
    from genesis_mlx.loading import load_model_only

    converted = load_model_only(convert(str(path), str(tmp_path / "mlx"), with_tokenizer=False))
    assert_parity(want, converted(mx.array(ids)), tol)


def test_long_context_matches_reference(reference_checkpoint):
    """2100 tokens. The no-cache forward is within the tolerance, and no farther from
    a float64 run of the reference than the reference's own float32 logits are (RoPE
    angles from frequencies a bit off made it 2.4x as far here, while still within
    the tolerance). Decoding after a prefill read in pieces: each step equals the
    reference's forward over the tokens so far (TTT pools over all of them)."""
    # GLA heads of 24 dims: 12 rotate, with frequencies numpy and torch round apart.
    ref, path = reference_checkpoint(n_embd=128, n_head=4, n_kv_head=2)
    ids = tokens(2100)
    model = mlx_model(path)
    ours = np.array(model(mx.array(ids)))
    want, exact = R.reference_logits(ref, ids), R.reference_logits_float64(ref, ids)
    tol = measured(want, exact).tolerance  # the steps below: the same forward's scale
    assert_parity(want, ours, tol)
    ours_off, theirs_off = (np.abs(a - exact).max() for a in (ours, want))
    assert ours_off <= 1.5 * theirs_off, f"{ours_off:.2e} vs the reference's {theirs_off:.2e}"
    cache = model.make_cache()
    for start in range(0, 2097, 512):
        model(mx.array(ids[:, start:min(start + 512, 2097)]), cache=cache)
    for t in range(2097, 2100):
        step = model(mx.array(ids[:, t:t + 1]), cache=cache)
        assert_parity(R.reference_logits(ref, ids[:, :t + 1])[:, -1:], step, tol)


def test_rope_tables_of_a_bfloat16_checkpoint(tmp_path):
    """Saved in bfloat16, a checkpoint holds RoPE tables rounded from the angles of
    the float32 frequencies, and the reference (loading it into float32 as its CLI
    does) reads them: the port, converted to float32, keeps and reads them too, in the
    no-cache forward and while decoding. A whole sequence longer than the tables
    makes the reference compute them anew (from the rounded frequencies); the port
    does the same."""
    import torch

    from genesis_mlx.conversion.convert import convert
    from genesis_mlx.loading import load_model_only

    written = R.build_reference(R.make_config(n_embd=128, n_head=4, n_kv_head=2), seed=7)
    path = R.save_reference_checkpoint(written, tmp_path / "bf16.safetensors", torch.bfloat16)
    model = load_model_only(convert(str(path), str(tmp_path / "mlx"), with_tokenizer=False))
    ids = tokens(4100)
    ref = R.load_as_reference_cli(path)
    want = R.reference_logits(ref, ids[:, :300])
    recomputed = R.load_as_reference_cli(path)
    for module in recomputed.modules():
        if isinstance(module, R.genesis.layers.norms.RotaryPositionalEmbedding):
            module._build_cache(4096)
    assert np.abs(want - R.reference_logits(recomputed, ids[:, :300])).max() > 1e-3, \
        "fixture too weak: the tables change nothing"
    tol = logits_tolerance(ref, ids[:, :300])
    assert_parity(want, model(mx.array(ids[:, :300])), tol)
    cache = model.make_cache()
    model(mx.array(ids[:, :298]), cache=cache)
    for t in (298, 299):
        step = model(mx.array(ids[:, t:t + 1]), cache=cache)
        assert_parity(R.reference_logits(ref, ids[:, :t + 1])[:, -1:], step, tol)
    # A left-padded row (negative positions on its padding) equals the row alone.
    batch, mask = np.zeros((2, 300), np.int64), np.ones((2, 300), bool)
    batch[0], batch[1, 180:], mask[1, :180] = ids[0, :300], ids[0, :120], False
    padded = model(mx.array(batch), cache=model.make_cache(), pad_mask=mx.array(mask))
    alone = model(mx.array(ids[:, :120]), cache=model.make_cache())
    assert_parity(np.array(alone), padded[1:, 180:], tol)
    long_want = R.reference_logits(ref, ids)
    long_tol = measured(long_want, R.reference_logits_float64(ref, ids)).tolerance
    assert_parity(long_want, model(mx.array(ids)), long_tol)
