"""generate: exact sequences from a fake model, cached greedy vs full forward, batch
invariance, stop handling, no recompiles, and input validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from helpers import PlusOneModel, count_prefill_traces, row_keys
from models import DecoderLM, preset

V = PlusOneModel.vocab_size  # its default vocabulary: 16


def test_fake_model_exact_sequence_and_stop():
    model = PlusOneModel(jnp.float32(100.0))
    prompts = jnp.array([[3, 4, 5, 0], [9, 0, 0, 0], [1, 2, 0, 0]])
    lengths = jnp.array([3, 1, 2])
    out = js.generate(model, prompts, lengths, row_keys(0, 3), max_new_tokens=6, stop_ids=[12], pad_id=15)
    expected = np.array([
        [6, 7, 8, 9, 10, 11],      # never reaches 12: length
        [10, 11, 12, 15, 15, 15],  # stops at 12 (included), then pad
        [3, 4, 5, 6, 7, 8],
    ])
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(out.lengths, [6, 3, 6])
    np.testing.assert_array_equal(out.finish_reason,
                                  [js.FinishReason.LENGTH, js.FinishReason.STOP, js.FinishReason.LENGTH])
    # With a margin of 100 the chosen token's log-prob is ~ -(V-1) e^-100 = 0; padding reports 0.
    np.testing.assert_allclose(out.logprobs_raw, 0.0, atol=1e-6)
    np.testing.assert_allclose(out.logprobs_processed, 0.0, atol=1e-6)


def test_fake_model_logprobs_are_exact():
    # Margin 2: p(chosen) = e^2 / (e^2 + V - 1).
    model = PlusOneModel(jnp.float32(2.0))
    sampler = js.chain(js.TopK(1))  # processed distribution is a point mass
    out = js.generate(model, jnp.array([[0]]), jnp.array([1]), row_keys(0, 1), max_new_tokens=4,
                      sampler=sampler)
    np.testing.assert_array_equal(out.tokens, [[1, 2, 3, 4]])
    np.testing.assert_allclose(out.logprobs_raw, np.full((1, 4), 2.0 - np.log(np.e ** 2 + V - 1)), rtol=1e-5)
    np.testing.assert_allclose(out.logprobs_processed, 0.0, atol=1e-6)


def test_emptied_row_finishes_with_no_valid_token():
    model = PlusOneModel(jnp.float32(5.0))
    # Allow only token 2: row 0 (predicts 1, 2, ...) can emit it; every id but 2 is banned.
    sampler = js.chain(js.AllowTokens(jnp.array([2])), js.BanTokens(jnp.array([[2], [-1]])))
    out = js.generate(model, jnp.array([[0], [5]]), jnp.array([1, 1]), row_keys(0, 2), max_new_tokens=3,
                      sampler=sampler, pad_id=15)
    # Row 0 has every token banned from the first step; row 1 may only emit 2.
    np.testing.assert_array_equal(out.tokens[0], [15, 15, 15])
    assert out.lengths[0] == 0 and out.finish_reason[0] == js.FinishReason.NO_VALID_TOKEN
    np.testing.assert_array_equal(out.tokens[1], [2, 2, 2])
    assert out.lengths[1] == 3 and out.finish_reason[1] == js.FinishReason.LENGTH


@pytest.fixture(scope="module")
def tiny_lm():
    return DecoderLM.random(preset("tiny"), jax.random.key(42))


def test_greedy_equals_stepwise_argmax_of_full_forward(tiny_lm):
    prompts = np.array([[256, 10, 20, 30, 40], [256, 7, 0, 0, 0]], np.int32)
    lengths = np.array([5, 2])
    n = 8
    out = js.generate(tiny_lm, prompts, lengths, row_keys(0, 2), max_new_tokens=n)
    forward = jax.jit(tiny_lm.forward.__func__)
    width = prompts.shape[1] + n  # one padded shape: a causal model's logits at t ignore t+1..
    for r in range(2):
        seq = list(prompts[r, : lengths[r]])
        for i in range(n):
            logits = forward(tiny_lm, jnp.array([seq + [0] * (width - len(seq))]))[0, len(seq) - 1]
            nxt = int(jnp.argmax(logits))
            assert int(out.tokens[r, i]) == nxt, (r, i)
            lp = jax.nn.log_softmax(logits)[nxt]
            np.testing.assert_allclose(out.logprobs_raw[r, i], lp, atol=1e-4)
            seq.append(nxt)


def test_batch_invariance_mixed_lengths(tiny_lm):
    """A row produces the same tokens alone or inside any batch, in any position."""
    rng = np.random.default_rng(0)
    p = 7
    prompts = rng.integers(0, 256, size=(4, p)).astype(np.int32)
    lengths = np.array([7, 2, 5, 1])
    prompts[np.arange(p)[None] >= lengths[:, None]] = 258  # pad
    keys = row_keys(3, 4)
    sampler = js.default_chain(temperature=jnp.array([1.0, 0.7, 1.3, 0.0]), top_p=0.95)
    out = js.generate(tiny_lm, prompts, lengths, keys, max_new_tokens=10, sampler=sampler)
    assert len({tuple(r) for r in np.asarray(out.tokens)}) > 1
    perm = np.array([2, 0, 3, 1])
    sampler_perm = js.default_chain(temperature=jnp.array([1.3, 1.0, 0.0, 0.7]), top_p=0.95)
    out_perm = js.generate(tiny_lm, prompts[perm], lengths[perm], keys[perm], max_new_tokens=10,
                           sampler=sampler_perm)
    np.testing.assert_array_equal(out_perm.tokens, np.asarray(out.tokens)[perm])
    np.testing.assert_allclose(out_perm.logprobs_raw, np.asarray(out.logprobs_raw)[perm], atol=1e-5)
    for r in range(4):  # alone, padded to a different width
        alone = js.generate(tiny_lm, prompts[r:r + 1, : lengths[r]], lengths[r:r + 1], keys[r:r + 1],
                            max_new_tokens=10,
                            sampler=js.default_chain(temperature=[1.0, 0.7, 1.3, 0.0][r], top_p=0.95))
        np.testing.assert_array_equal(alone.tokens[0], out.tokens[r])


def test_padding_content_never_matters(tiny_lm):
    prompts = np.array([[256, 5, 6, 0, 0]], np.int32)
    other = prompts.copy()
    other[0, 3:] = [100, 200]
    a = js.generate(tiny_lm, prompts, [3], row_keys(1, 1), max_new_tokens=6, sampler=js.default_chain())
    b = js.generate(tiny_lm, other, [3], row_keys(1, 1), max_new_tokens=6, sampler=js.default_chain())
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_no_recompile_when_values_change(tiny_lm):
    """Sampler values, prompt contents, keys, stop ids and pad id are traced."""
    lm, traces = count_prefill_traces(tiny_lm)  # traces: one entry per compile, not per call
    prompts = np.full((2, 4), 258, np.int32)
    prompts[:, 0] = 256
    for i, (t, p, k) in enumerate([(0.5, 0.9, 3), (1.5, 0.2, 7), (0.0, 1.0, 0)]):
        prompts[:, 1] = i
        js.generate(lm, prompts, [2, 3], row_keys(i, 2), max_new_tokens=5,
                    sampler=js.default_chain(temperature=t, top_p=p, top_k=k), stop_ids=[i], pad_id=i)
    assert len(traces) == 1
    js.generate(lm, prompts, [2, 3], row_keys(0, 2), max_new_tokens=6,
                sampler=js.default_chain(temperature=1.0, top_p=0.5, top_k=3), stop_ids=[1], pad_id=0)
    assert len(traces) == 2  # a new shape (max_new_tokens) does compile


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_lengths=[0, 2]), r"prompt_lengths\[0\]=0"),
    (dict(prompt_lengths=[2, 5]), r"prompt_lengths\[1\]=5 is outside \[1, P=4\]"),
    (dict(prompt_tokens=[[1, 2, 3, 4], [1, 16, 99, 0]]), r"prompt_tokens\[1, 1\]=16 is outside"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(cache_size=6), r"cache_size=6 is smaller than .* = 7"),
    (dict(stop_ids=[16]), "stop id 16 is outside"),
    (dict(keys=jax.random.key(0)), "one key per row"),
    (dict(stop_ids=[2.7]), r"stop_ids must be integers, got 2.7"),
    (dict(stop_ids=[True]), r"stop_ids must be integers, got True"),
    (dict(pad_id=1.5), r"pad_id must be integers, got 1.5"),
    (dict(pad_id=2**40), r"pad_id must fit in int32"),
    (dict(prompt_lengths=[4.0, 2.0]), "prompt_lengths must be integers"),
])
def test_invalid_inputs_raise(kwargs, match):
    model = PlusOneModel(jnp.float32(1.0))
    args = dict(prompt_tokens=[[1, 2, 3, 4], [1, 2, 0, 0]], prompt_lengths=[4, 2], keys=row_keys(0, 2),
                max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        js.generate(model, **{k: (jnp.asarray(v) if k.startswith("prompt") else v) for k, v in args.items()})
