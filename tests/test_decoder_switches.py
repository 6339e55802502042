"""The decoder's family switches without transformers: sliding-window rings, prefill_into,
the three MoE computations, cache sizes (tests/test_hf_families.py checks them against
transformers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from models import DecoderConfig, DecoderLM
from models.decoder import RING_SLACK, cache_bytes, init_cache

BASE = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, max_seq_len=128)


def _lm(seed=0, **changes):
    lm = DecoderLM.random(DecoderConfig(**{**BASE, **changes}), jax.random.key(seed))
    # O(1) weights, so that every key the window keeps or drops changes the logits
    return DecoderLM(jax.tree.map(lambda x: x * 20.0 if x.ndim > 1 else x, lm.params), lm.config)


def _tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 97, size=(b, t)), jnp.int32)


def test_ring_cache_sizes_and_bytes():
    c = DecoderConfig(**BASE, sliding_window=4, sliding_window_layers=(0,))
    cache = init_cache(c, 2, 100)
    assert cache.k[0].shape == (2, 2, 4 + RING_SLACK, 8) and cache.k[1].shape == (2, 2, 100, 8)
    assert cache_bytes(c, 2, 100) == 2 * 2 * 2 * 8 * 4 * (4 + RING_SLACK + 100)
    assert init_cache(c, 1, 10).k[0].shape[2] == 10  # shorter than the ring: the cache asked for


@pytest.mark.parametrize("layers", [None, (1,)])
def test_ring_prefill_longer_than_ring_then_decode_equals_full_forward(layers):
    """Prompt 27 > ring 4 + 15 = 19 slots: prefill writes only the last 19 real positions
    (ragged rows: padding never enters the ring), then 12 decode steps wrap the ring; every
    logit equals the cache-free forward of the whole sequence (window mask, no cache)."""
    lm = _lm(sliding_window=4, sliding_window_layers=layers)
    seq = _tokens(2, 40, seed=1)
    lengths = jnp.array([27, 20], jnp.int32)
    full = np.asarray(jax.jit(lm.forward)(seq))  # [2, 40, V]
    cache = lm.init_cache(2, 64)
    assert cache.k[1].shape[2] == 4 + RING_SLACK
    padded = jnp.where(jnp.arange(40) < lengths[:, None], seq, 96)
    logits, cache = jax.jit(lm.prefill)(padded[:, :27], lengths, cache)
    for b in range(2):
        np.testing.assert_allclose(np.asarray(logits[b]), full[b, lengths[b] - 1], atol=2e-4, rtol=0)
    decode = jax.jit(lm.decode)
    pos = lengths
    for _ in range(12):
        tok = jnp.take_along_axis(seq, pos[:, None], axis=1)[:, 0]
        logits, cache = decode(tok, pos, cache)
        for b in range(2):
            np.testing.assert_allclose(np.asarray(logits[b]), full[b, pos[b]], atol=2e-4, rtol=0)
        pos = pos + 1


def test_ring_extend_equals_decode_and_refuses_more_than_the_slack():
    lm = _lm(sliding_window=3)
    seq = _tokens(1, 30, seed=2)
    full = np.asarray(jax.jit(lm.forward)(seq))
    cache = lm.init_cache(1, 64)  # ring of 18
    _, cache = jax.jit(lm.prefill)(seq[:, :20], jnp.array([20]), cache)
    # verify 10 drafts in one call, 5 right and 5 wrong; then resume after the 5 right ones:
    # the stale slots of the rejected drafts must not be attended
    extend = jax.jit(lm.extend)
    logits, cache2 = extend(seq[:, 20:30].at[:, 5:].set(7), jnp.array([20]), cache)
    np.testing.assert_allclose(np.asarray(logits[0, :5]), full[0, 20:25], atol=2e-4, rtol=0)
    out, _ = jax.jit(lm.decode)(seq[:, 25], jnp.array([25]), cache2)
    np.testing.assert_allclose(np.asarray(out[0]), full[0, 25], atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="exceed layer 0's sliding-window ring"):
        lm.extend(_tokens(1, RING_SLACK + 2), jnp.array([20]), cache)


def test_all_ring_model_has_no_position_limit_and_generates_past_the_ring():
    """Every layer sliding (Mistral): the cache is 19 slots, yet 40 positions decode exactly."""
    lm = _lm(sliding_window=4)
    seq = _tokens(1, 40, seed=3)
    cache = lm.init_cache(1, 40)
    assert all(k.shape[2] == 4 + RING_SLACK for k in cache.k)
    _, cache = jax.jit(lm.prefill)(seq[:, :2], jnp.array([2]), cache)
    full = np.asarray(jax.jit(lm.forward)(seq))
    decode = jax.jit(lm.decode)
    for p in range(2, 40):
        logits, cache = decode(seq[:, p], jnp.array([p]), cache)
    np.testing.assert_allclose(np.asarray(logits[0]), full[0, 39], atol=2e-4, rtol=0)


@pytest.mark.parametrize("changes", [dict(), dict(sliding_window=3, sliding_window_layers=(0,)),
                                     dict(num_experts=4, experts_per_token=2, moe_d_ff=16)])
def test_prefill_into_equals_a_fresh_prefill_and_leaves_other_rows(changes):
    lm = _lm(**changes)
    cache = lm.init_cache(4, 40)
    _, cache = jax.jit(lm.prefill)(_tokens(4, 30, seed=4), jnp.full((4,), 30, jnp.int32), cache)  # occupied
    tokens, lengths, rows = _tokens(2, 25, seed=5), jnp.array([25, 9], jnp.int32), jnp.array([3, 1], jnp.int32)
    logits, new = jax.jit(lm.prefill_into)(tokens, lengths, rows, cache)
    ref_logits, ref = jax.jit(lm.prefill)(tokens, lengths, lm.init_cache(2, 40))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=0)
    for layer in range(2):
        for name in ("k", "v"):
            got, old, want = (np.asarray(getattr(c, name)[layer]) for c in (new, cache, ref))
            np.testing.assert_allclose(got[[3, 1]], want, atol=1e-5, rtol=0)  # the whole row
            np.testing.assert_array_equal(got[[0, 2]], old[[0, 2]])
    # a row index outside the cache writes nothing
    _, same = jax.jit(lm.prefill_into)(tokens, lengths, jnp.array([4, 7], jnp.int32), cache)
    np.testing.assert_array_equal(np.asarray(same.k[0]), np.asarray(cache.k[0]))


@pytest.mark.parametrize("changes", [dict(), dict(sliding_window=3, sliding_window_layers=(0,)), dict(sliding_window=4),
                                     dict(num_experts=4, experts_per_token=2, moe_d_ff=16)])
def test_decode_refill_is_a_decode_step_and_a_prefill_in_one_pass(changes):
    """The decode rows get `decode`'s logits and writes; the prompt gets `prefill`'s logits,
    and its row then decodes as a freshly prefilled one (the row's earlier entries, from
    a previous occupant, are never read); a row at position -1 writes nothing."""
    lm = _lm(**changes)
    cache = lm.init_cache(4, 160)  # > 128: decode attention walks blocks (attend_filled)
    _, cache = jax.jit(lm.prefill)(_tokens(4, 30, seed=4), jnp.array([30, 26, 20, 7], jnp.int32), cache)  # occupied
    tokens, positions = _tokens(4, 1, seed=7)[:, 0], jnp.array([30, 26, -1, 7], jnp.int32)
    prompt, length, row = _tokens(1, 16, seed=5), jnp.array([9], jnp.int32), jnp.array([1], jnp.int32)
    logits, first, new = jax.jit(lm.decode_refill)(tokens, positions, prompt, length, row, cache)
    ref_logits, ref = jax.jit(lm.decode)(tokens, positions.at[1].set(-1), cache)
    ref_first, fresh = jax.jit(lm.prefill)(prompt, length, lm.init_cache(1, 160))
    np.testing.assert_allclose(np.asarray(logits)[[0, 3]], np.asarray(ref_logits)[[0, 3]], atol=2e-5, rtol=0)
    assert np.isnan(np.asarray(logits)[[1, 2]]).all()  # the refilled row and the row at -1 decode nothing
    np.testing.assert_allclose(np.asarray(first), np.asarray(ref_first), atol=2e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(new.k[0])[2], np.asarray(cache.k[0])[2])  # position -1: untouched
    for layer in range(2):
        np.testing.assert_allclose(np.asarray(new.v[layer])[[0, 3]], np.asarray(ref.v[layer])[[0, 3]], atol=2e-5)
    decode, token = jax.jit(lm.decode), jnp.array([11], jnp.int32)
    for p in range(9, 20):  # row 1 goes on from its prompt as a fresh row does
        got, new = decode(jnp.full((4,), int(token[0]), jnp.int32), jnp.array([-1, p, -1, -1], jnp.int32), new)
        want, fresh = decode(token, jnp.array([p], jnp.int32), fresh)
        np.testing.assert_allclose(np.asarray(got)[1], np.asarray(want)[0], atol=2e-5, rtol=0)
        token = jnp.argmax(want, axis=-1).astype(jnp.int32)
    if "sliding_window_layers" not in changes and "sliding_window" in changes:
        return  # every layer a ring: any width fits
    with pytest.raises(ValueError, match=r"decode_refill: prompts of width 161 do not fit layer [01]'s cache of 160 positions"):
        lm.decode_refill(tokens, positions, _tokens(1, 161), length, row, cache)


def test_generate_many_with_ring_and_moe_equals_generate():
    lm = _lm(sliding_window=3, sliding_window_layers=(1,), num_experts=4, experts_per_token=2, moe_d_ff=16)
    tokens = _tokens(3, 12, seed=6)
    lengths = jnp.array([12, 5, 8], jnp.int32)
    keys = jax.random.split(jax.random.key(0), 3)
    ref = js.generate(lm, tokens, lengths, keys, max_new_tokens=10)
    out = js.generate_many(lm, tokens, lengths, keys, max_new_tokens=10, slots=2)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


@pytest.mark.parametrize("impl", ["gather", "ragged", "dense", "auto"])
def test_moe_implementations_agree(impl):
    """The three computations of the chosen experts give the same logits (dense: every expert
    weighted by a mostly-zero mask, the reference)."""
    base = _lm(num_experts=6, experts_per_token=2, moe_d_ff=16, moe_impl="dense")
    lm = DecoderLM(base.params, base.config.replace(moe_impl=impl))
    seq = _tokens(2, 9, seed=7)
    want = np.asarray(jax.jit(base.forward)(seq))
    np.testing.assert_allclose(np.asarray(jax.jit(lm.forward)(seq)), want, atol=2e-4, rtol=0)
    cache = lm.init_cache(2, 12)
    _, cache = jax.jit(lm.prefill)(seq[:, :8], jnp.array([8, 8]), cache)
    got, _ = jax.jit(lm.decode)(seq[:, 8], jnp.array([8, 8]), cache)
    np.testing.assert_allclose(np.asarray(got), want[:, 8], atol=2e-4, rtol=0)


def test_moe_routes_to_the_top_k_by_hand():
    """One token, 3 experts, k=2: out = sum of the two largest-probability experts' SwiGLU outputs,
    weights renormalised (norm_topk_prob) or not."""
    from models.decoder import moe_experts

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 4)), jnp.float32)
    gate, up = (jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.standard_normal((3, 5, 4)), jnp.float32)
    w, e = jnp.array([[0.5, 0.3]]), jnp.array([[2, 0]])
    silu = jax.nn.silu
    want = sum(wk * ((silu(x @ gate[ek]) * (x @ up[ek])) @ down[ek]) for wk, ek in ((0.5, 2), (0.3, 0)))
    for impl in ("gather", "ragged", "dense"):
        np.testing.assert_allclose(np.asarray(moe_experts(x, gate, up, down, w, e, impl, silu)), np.asarray(want),
                                   rtol=1e-5, atol=1e-5)


def test_active_parameter_count():
    c = DecoderConfig(**BASE, num_experts=8, experts_per_token=2, moe_d_ff=16, moe_layers=(1,))
    dense_layer = 3 * 32 * 48
    assert c.num_params() - c.num_active_params() == 6 * 3 * 32 * 16
    assert c.num_params() == DecoderConfig(**BASE).num_params() - dense_layer + 8 * 3 * 32 * 16 + 32 * 8
