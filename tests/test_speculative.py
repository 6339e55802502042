"""speculative_generate: DecoderLM.extend vs decode / forward, greedy output equal to greedy
generate (draft model and prompt lookup, ragged batch, penalties, stops), the sampled
distribution equal to the sampler chain's exact distribution (chi-square), stats, no
recompiles, and input validation."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from helpers import LOOKUP_LENGTHS as LENGTHS
from helpers import LOOKUP_PROMPTS as PROMPTS
from helpers import (ExtendTableModel, TableModel, chi_square, cli_texts, count_prefill_traces, exact_distribution,
                     load_script, re_search, row_keys)
from models import DecoderLM, preset


@pytest.fixture(scope="module")
def draft(target):
    """The target (conftest.py's `target` fixture) with 10% multiplicative noise on every
    weight: a partly agreeing draft."""
    leaves, treedef = jax.tree.flatten(target.params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    noisy = [x * (1 + 0.1 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
    return DecoderLM(jax.tree.unflatten(treedef, noisy), target.config)


# ----------------------------------------------------------------------------- extend


def test_extend_equals_decode_steps_and_forward(target):
    """extend(T tokens) = T successive decode calls = the full forward pass, per row, with
    ragged start positions; and it leaves the same cache."""
    seqs = np.asarray(jax.random.randint(jax.random.key(3), (3, 12), 0, 256), np.int32)
    lengths = jnp.array([3, 5, 8])
    cache = target.init_cache(3, 16)
    _, cache = jax.jit(type(target).prefill)(target, jnp.asarray(seqs), lengths, cache)
    t = 4
    rows = jnp.arange(3)[:, None]
    new = jnp.asarray(seqs)[rows, lengths[:, None] + jnp.arange(t)]  # the next T tokens of each row
    ext_logits, ext_cache = jax.jit(type(target).extend)(target, new, lengths, cache)
    decode = jax.jit(type(target).decode)
    step_cache, steps = cache, []
    for i in range(t):
        logits, step_cache = decode(target, new[:, i], lengths + i, step_cache)
        steps.append(logits)
    np.testing.assert_allclose(ext_logits, jnp.stack(steps, 1), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ext_cache), jax.tree.leaves(step_cache)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    full = jax.jit(type(target).forward)(target, jnp.asarray(seqs))  # [B, 12, V]
    for r in range(3):
        s = int(lengths[r])
        np.testing.assert_allclose(ext_logits[r], full[r, s:s + t], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- greedy = generate


@pytest.fixture(scope="module")
def stop_id(target):
    """A token that greedy row 0 emits at index 25 (so it stops there or before)."""
    sampler = js.chain(js.RepetitionPenalty(1.3), js.Temperature(0.0))
    ref = js.generate(target, PROMPTS, LENGTHS, row_keys(1, 3), max_new_tokens=26, sampler=sampler)
    return int(np.asarray(ref.tokens)[0, 25])


@pytest.mark.parametrize("which, k", [("lookup", 3), pytest.param("model", 3, marks=pytest.mark.slow), ("self", 2)])
def test_greedy_equals_generate(target, draft, stop_id, which, k):
    """Token for token (and lengths, finish reasons, log-probs, top-4 and prompt log-probs)
    on a ragged batch with n = 2 samples per prompt (n identical greedy copies), a stateful
    penalty in the chain and a stop id that some rows hit mid-round."""
    d = {"lookup": js.PromptLookup(3), "model": draft, "self": target}[which]
    sampler = js.chain(js.RepetitionPenalty(1.3), js.Temperature(0.0))
    n, stop = 40, stop_id
    kw = dict(max_new_tokens=n, sampler=sampler, stop_ids=[stop], pad_id=258, n=2, top_logprobs=4,
              prompt_logprobs=True)
    ref = js.generate(target, PROMPTS, LENGTHS, row_keys(1, 3), **kw)
    out, stats = js.speculative_generate(target, PROMPTS, LENGTHS, row_keys(1, 3), draft=d, num_draft_tokens=k,
                                         **kw)
    assert out.tokens.shape == (6, n) and out.top_token_ids.shape == (6, n, 4) and out.prompt_logprobs.shape == (3, 8)
    for f in ("tokens", "lengths", "finish_reason", "top_token_ids"):
        np.testing.assert_array_equal(getattr(out, f), getattr(ref, f), err_msg=f)
    assert int(ref.finish_reason[0]) == js.FinishReason.STOP
    np.testing.assert_array_equal(np.asarray(out.tokens)[0::2], np.asarray(out.tokens)[1::2])  # greedy copies
    np.testing.assert_allclose(out.logprobs_raw, ref.logprobs_raw, atol=1e-4)
    np.testing.assert_allclose(out.logprobs_processed, ref.logprobs_processed, atol=1e-4)
    for f in ("top_logprobs", "prompt_logprobs"):
        np.testing.assert_allclose(getattr(out, f), getattr(ref, f), atol=1e-5, rtol=1e-5, err_msg=f)
    # Stats: at most k drafted per round (fewer where the row's remaining length is
    # shorter); a round emits its accepted drafts and at most one more token.
    rounds, drafted, accepted, emitted = (np.asarray(x) for x in stats)
    lengths = np.asarray(ref.lengths)
    assert np.all(drafted <= k * rounds)
    if which != "lookup":
        assert np.all(drafted >= k * (rounds - 1))  # every round but the last offers k positions
    assert np.all(accepted <= drafted)
    np.testing.assert_array_equal(emitted, lengths - 1)  # every token after the first
    assert np.all(accepted <= emitted) and np.all(emitted <= accepted + rounds)
    if which == "self":  # the target as its own draft: everything is accepted
        np.testing.assert_array_equal(accepted, drafted)
        np.testing.assert_array_equal(rounds, np.ceil((lengths - 1) / (k + 1)))
    print(f"\n{which} k={k}: acceptance {stats.acceptance_rate:.2f}, "
          f"{stats.tokens_per_round:.2f} tokens per target call")


def test_n_samples_use_generates_row_keys(target):
    """Sampled, n = 2: sample j of prompt i is speculative_generate alone with the row key
    fold_in(keys[i], j) (generate's key discipline), and the samples differ."""
    kw = dict(max_new_tokens=10, draft=js.PromptLookup(2), num_draft_tokens=2, top_logprobs=2,
              sampler=js.chain(js.Temperature(1.0)))
    keys = row_keys(5, 2)
    out, _ = js.speculative_generate(target, PROMPTS[:2], LENGTHS[:2], keys, n=2, **kw)
    tokens = np.asarray(out.tokens)
    assert len(set(map(tuple, tokens))) == 4
    for i, j in itertools.product(range(2), range(2)):
        alone, _ = js.speculative_generate(target, PROMPTS[i:i + 1], LENGTHS[i:i + 1],
                                           jax.random.fold_in(keys[i], j)[None], **kw)
        np.testing.assert_array_equal(alone.tokens[0], tokens[2 * i + j])
        np.testing.assert_array_equal(alone.top_token_ids[0], out.top_token_ids[2 * i + j])


def test_prompt_lookup_proposals():
    """Hand-computed proposals: most recent match of the longest n-gram, periodic
    continuation into the suffix, fallback to shorter n-grams and to the last token."""
    from jaxsample._decoding.drafts import lookup as _lookup
    seq = jnp.array([[1, 2, 3, 9, 1, 2, 3, 4, 1, 2, 3, -1, -1, -1],   # '1 2 3' -> most recent: 4 1 2 3
                     [5, 6, 5, 6, 5, 6, -1, -1, -1, -1, -1, -1, -1, -1],  # period 2 runs into the suffix
                     [7, 8, 9, 3, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1],  # only the 1-gram '8' matches
                     [1, 2, 3, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1]])  # no match: last token
    length = jnp.array([11, 6, 5, 3])
    got, found = _lookup(seq, length, 3, 4)
    np.testing.assert_array_equal(got, [[4, 1, 2, 3], [5, 6, 5, 6], [9, 3, 8, 9], [3, 3, 3, 3]])
    np.testing.assert_array_equal(found, [True, True, True, False])
    _, found = _lookup(seq, length, 3, 4, min_ngram=2)  # row 2's 1-gram match no longer counts
    np.testing.assert_array_equal(found, [True, True, False, False])


# ----------------------------------------------------------------------------- distribution


V = 6


@pytest.mark.parametrize("which, k", [pytest.param("model", 1, marks=pytest.mark.slow), ("model", 3), ("lookup", 2)])
def test_sampled_distribution_matches_exact(which, k):
    """The first 3 tokens of 20,000 rows, binned over all V**3 = 216 sequences, against the
    chain's exact distribution (repetition penalty with its state or per-row temperature, top-k):
    chi-square <= df + 5 sqrt(2 df) (normal approximation, ~3e-7 false-alarm rate). The same
    counts against the draft's own distribution fail the test (it has power). k = 1 covers
    the bonus draw within 3 tokens, k = 3 the residual at every index, lookup a point-mass q.
    """
    ta, tb = jax.random.normal(jax.random.key(11), (2, V, V)) * 1.5
    target = ExtendTableModel(ta)
    draft = TableModel(tb)  # without `extend`: the loop falls back to decode calls
    if which == "lookup":  # stateless, per-row values: the batched (vmapped) processing path
        reference = js.chain(js.Temperature(0.9), js.TopK(4))
        sampler = js.chain(js.Temperature(np.full(20_000, 0.9, np.float32)), js.TopK(4))
    else:  # stateful: the state advances along the drafted tokens
        reference = sampler = js.chain(js.RepetitionPenalty(1.8), js.Temperature(0.9), js.TopK(4))
    prompt = np.array([0, 1, 2, 3, 1, 2], np.int32)  # '1 2' repeats: lookup proposes '3 1 ...'
    b, steps = 20_000, 3
    out, stats = js.speculative_generate(
        target, np.repeat(prompt[None], b, 0), np.full(b, prompt.size), row_keys(7, b), max_new_tokens=steps,
        draft=js.PromptLookup(2) if which == "lookup" else draft, num_draft_tokens=k, sampler=sampler)
    tokens = np.asarray(out.tokens)
    assert np.all(np.asarray(out.lengths) == steps)
    cells = (tokens[:, 0] * V + tokens[:, 1]) * V + tokens[:, 2]
    counts = np.bincount(cells, minlength=V ** steps).astype(np.float64)
    _, prob = exact_distribution(target, reference, prompt, steps)
    chi2, df = chi_square(counts, prob * b)
    bound = df + 5 * math.sqrt(2 * df)
    rate = stats.acceptance_rate
    print(f"\n{which} k={k}: chi2 {chi2:.1f} (df {df}, bound {bound:.1f}), acceptance {rate:.2f}")
    assert chi2 <= bound, (chi2, df)
    assert 0.05 < rate < 0.95  # both branches (accept and residual) were exercised
    if which == "model":
        _, q = exact_distribution(draft, reference, prompt, steps)
        wrong, df_wrong = chi_square(counts, q * b)
        assert wrong > df_wrong + 5 * math.sqrt(2 * df_wrong)


def test_row_independent_of_batch_mates(target):
    """Sampled output of a row depends only on its key, prompt and values (per-row key
    discipline): the same rows in another order, with other batch-mates, give the same rows."""
    run = lambda order, t: js.speculative_generate(
        target, PROMPTS[order], LENGTHS[order], row_keys(4, 3)[order], max_new_tokens=12,
        draft=js.PromptLookup(2), num_draft_tokens=2, sampler=js.chain(js.Temperature(t[order])))[0].tokens
    t = np.array([1.0, 0.7, 1.3], np.float32)
    a = np.asarray(run(np.array([0, 1, 2]), t))
    b = np.asarray(run(np.array([2, 0, 1]), t))
    np.testing.assert_array_equal(a[[2, 0, 1]], b)
    c = np.asarray(run(np.array([1, 1, 1]), t))  # row 1 with two copies of itself as batch-mates
    np.testing.assert_array_equal(c[0], a[1])
    assert len(set(map(tuple, a))) == 3  # sampled rows differ (not a degenerate comparison)


# ----------------------------------------------------------------------------- compile, validation


def test_no_recompile_when_values_change(target):
    lm, traces = count_prefill_traces(target)  # traces: one entry per trace, not per call
    for i, t in enumerate([0.5, 0.0]):
        js.speculative_generate(lm, PROMPTS, LENGTHS, row_keys(i, 3), max_new_tokens=12, draft=js.PromptLookup(2),
                                num_draft_tokens=2, sampler=js.chain(js.Temperature(np.full(3, t, np.float32))),
                                stop_ids=[i], pad_id=i)
    assert len(traces) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_draft_tokens=0), "num_draft_tokens must be an int >= 1, got 0"),
    (dict(num_draft_tokens=2.0), "num_draft_tokens must be an int >= 1, got 2.0"),
    (dict(draft="ngram"), "draft must be a LanguageModel .* str has no init_cache"),
    (dict(draft=TableModel(jnp.zeros((V, V)))), "draft vocab_size 6 != target vocab_size 259"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(prompt_lengths=[0, 2, 2]), r"prompt_lengths\[0\]=0"),
    (dict(stop_ids=[300]), "stop id 300 is outside the vocabulary"),
    (dict(n=0), "n must be a positive int .*got 0"),
    (dict(n=2.0), "n must be a positive int .*got 2.0"),
    (dict(top_logprobs=-1), r"top_logprobs must be an int in \[0, vocab size 259\], got -1"),
    (dict(top_logprobs=260), r"top_logprobs must be an int in \[0, vocab size 259\], got 260"),
])
def test_validation(target, kwargs, match):
    args = dict(prompt_tokens=PROMPTS, prompt_lengths=LENGTHS, keys=row_keys(0, 3), max_new_tokens=4,
                draft=js.PromptLookup(2), num_draft_tokens=2)
    args.update(kwargs)
    args["prompt_lengths"] = np.asarray(args["prompt_lengths"])
    with pytest.raises(ValueError, match=match):
        js.speculative_generate(target, **args)


def test_prompt_logprobs_need_prefill_all():
    class NoPrefillAll:  # a LanguageModel without the optional prefill_all
        vocab_size = V
        init_cache = prefill = decode = staticmethod(lambda *a: None)

    with pytest.raises(ValueError, match="prompt_logprobs=True needs a model with prefill_all.*NoPrefillAll"):
        js.speculative_generate(NoPrefillAll(), PROMPTS[:, :2] % V, np.array([2, 2, 2]), row_keys(0, 3),
                                max_new_tokens=4, draft=js.PromptLookup(2), prompt_logprobs=True)


def test_prompt_lookup_validation():
    with pytest.raises(ValueError, match="max_ngram must be an int >= 1, got 0"):
        js.PromptLookup(0)
    with pytest.raises(ValueError, match=r"min_ngram must be an int in \[1, max_ngram=2\], got 3"):
        js.PromptLookup(2, min_ngram=3)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv, match", [
    (["--prompt-lookup", "2", "--draft-checkpoint", "d"], "two drafts: choose one"),
    (["--num-draft-tokens", "3"], "--num-draft-tokens needs a draft"),
    (["--prompt-lookup", "0"], "--prompt-lookup must be >= 1, got 0"),
    (["--prompt-lookup", "2", "--num-draft-tokens", "0"], "--num-draft-tokens must be >= 1, got 0"),
    (["--prompt-lookup", "2", "--num-beams", "2"], "--prompt-lookup cannot be used with --num-beams"),
])
def test_cli_bad_combinations(argv, match):
    gen = load_script("generate")
    assert re_search(match, gen.check_speculative_args(gen.build_parser().parse_args(argv)))


def test_cli_speculative_takes_the_output_flags():
    gen = load_script("generate")
    for argv in (["--prompt-lookup", "2", "--num-samples", "2", "--top-logprobs", "3"],
                 ["--draft-checkpoint", "d", "--prompt-logprobs"]):
        assert gen.check_speculative_args(gen.build_parser().parse_args(argv)) is None


@pytest.mark.slow
def test_cli_speculative_greedy_equals_plain(tmp_path, capsys, target):
    """scripts/generate.py --greedy prints the same text, top-N and prompt log-probs (two
    prompts, two samples each) with either draft as without."""
    from models import save_model
    save_model(str(tmp_path / "target"), target)
    save_model(str(tmp_path / "draft"), DecoderLM.random(preset("tiny"), jax.random.key(2)))
    gen = load_script("generate")
    base = ["ROMEO: ROMEO:", "JULIET:", "--checkpoint", str(tmp_path / "target"), "--greedy", "--max-new-tokens",
            "16", "--num-samples", "2", "--top-logprobs", "2", "--prompt-logprobs", "--no-stream"]
    texts = cli_texts(gen, capsys, base, [], ["--prompt-lookup", "2"],
                      ["--draft-checkpoint", str(tmp_path / "draft"), "--num-draft-tokens", "3"])
    assert texts[0] == texts[1] == texts[2]


def test_one_token_and_immediate_stop(target):
    """max_new_tokens=1 (no round at all) and a stop id emitted as the first token."""
    first = np.asarray(js.generate(target, PROMPTS, LENGTHS, row_keys(1, 3), max_new_tokens=1).tokens)[:, 0]
    for n in (1, 5):
        ref = js.generate(target, PROMPTS, LENGTHS, row_keys(1, 3), max_new_tokens=n, stop_ids=[int(first[2])])
        out, stats = js.speculative_generate(target, PROMPTS, LENGTHS, row_keys(1, 3), max_new_tokens=n,
                                             draft=js.PromptLookup(2), num_draft_tokens=2, stop_ids=[int(first[2])])
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_array_equal(out.lengths, ref.lengths)
        np.testing.assert_array_equal(out.finish_reason, ref.finish_reason)
        assert int(out.lengths[2]) == 1 and int(stats.rounds[2]) == 0


def test_constraint_with_prompt_lookup_equals_generate(target):
    """A stateful constraint (jaxsample.Choice) in the chain: greedy
    speculative output equals greedy generate, and every row is one of the choices."""
    from models import ByteTokenizer
    tok = ByteTokenizer()
    choices = ["yes", "no", "maybe so"]
    sampler = js.chain(js.Choice(choices, tok), js.Temperature(0.0))
    ids, lengths = tok.encode_batch(["ROMEO:", "JULIET: yes"])
    kw = dict(max_new_tokens=10, sampler=sampler, stop_ids=[tok.eos_id], pad_id=tok.pad_id)
    ref = js.generate(target, ids, lengths, row_keys(0, 2), **kw)
    out, _ = js.speculative_generate(target, ids, lengths, row_keys(0, 2), draft=js.PromptLookup(2),
                                     num_draft_tokens=3, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    texts = [tok.decode(np.asarray(out.tokens[i, :int(out.lengths[i]) - 1])) for i in range(2)]
    assert all(t in choices for t in texts), texts
