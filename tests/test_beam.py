"""Beam search (jaxsample/_beam.py) against transformers' `generate(num_beams=...)`.

A small random-weight `LlamaForCausalLM` is built with transformers, saved locally and
loaded into ours with `models.load_llama` (no download). Its embeddings are scaled down so
the next-token distributions are neither flat nor one-hot (entropy about 1.4 nats): beams
diverge and stop tokens are reached at different steps. Every comparison is in float32:
sequences equal exactly, scores to 1e-4. transformers runs each prompt alone (no padding
involved); ours runs the ragged batch in one call, so rows that stop early (the loop
freezes them) and rows that run on are checked in the same call.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample._decoding import beam as _beam
from helpers import StaticTableModel, load_script, make_hf_llama
from models.config import DecoderConfig
from models.decoder import DecoderLM, init_params

TOL = 1e-4
N = 10  # max_new_tokens
PROMPT_LENGTHS = (5, 3, 7, 4)


@pytest.fixture(scope="module")
def models(hf, tmp_path_factory):
    from models.llama import load_llama

    torch, _ = hf
    hf_model = make_hf_llama(hf, seed=0)
    with torch.no_grad():
        hf_model.model.embed_tokens.weight.mul_(0.5)  # entropy ~1.4 nats instead of ~0
    path = tmp_path_factory.mktemp("beam_llama")
    hf_model.save_pretrained(path)
    return torch, hf_model, load_llama(str(path))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 300, size=n).tolist() for n in PROMPT_LENGTHS]
    tokens = np.zeros((len(rows), max(PROMPT_LENGTHS)), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
    return rows, tokens, np.array(PROMPT_LENGTHS, np.int32)


def _transformers_beams(torch, hf_model, prompt, *, stop_ids, **kw):
    """(generated tokens [R, <=N], lengths [R], scores [R]) of transformers for one prompt."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N,
                                return_dict_in_generate=True, output_scores=True, pad_token_id=0,
                                eos_token_id=list(stop_ids) or None, **kw)
    generated = out.sequences[:, len(prompt):].numpy()
    if kw["num_beams"] > 1:
        lengths = (out.beam_indices.numpy() != -1).sum(axis=1)  # generated tokens, stop token included
        return generated, lengths, out.sequences_scores.numpy()
    # num_beams=1 is greedy search in transformers (one row, no padding): score it like a beam.
    logprobs = hf_model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).numpy()
    lengths = np.array([generated.shape[1]])
    return generated, lengths, logprobs.sum(axis=1) / lengths.astype(np.float64) ** kw["length_penalty"]


# (num_beams, length_penalty, early_stopping, num_return_sequences, stop ids)
SETTINGS = [
    (1, 1.0, False, 1, (169, 279)),  # transformers: greedy search
    (2, 1.0, False, 1, (169, 279)),
    (3, 0.7, True, 2, (241,)),
    (4, 2.0, "never", 3, (233, 241)),
    (4, -1.0, False, 4, (12, 233)),
    (4, 1.5, True, 4, (22, 97)),
    (3, 0.0, "never", 3, ()),
]


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,num_return,stop_ids", SETTINGS,
                         ids=[f"K{s[0]}-lp{s[1]}-es{s[2]}-R{s[3]}-stops{len(s[4])}" for s in SETTINGS])
def test_matches_transformers(models, prompts, num_beams, length_penalty, early_stopping, num_return, stop_ids):
    torch, hf_model, lm = models
    rows, tokens, lengths = prompts
    out = js.beam_search(lm, tokens, lengths, num_beams=num_beams, max_new_tokens=N, length_penalty=length_penalty,
                         early_stopping=early_stopping, num_return_sequences=num_return, stop_ids=stop_ids,
                         pad_id=0)
    assert out.sequences.shape == (len(rows), num_return, N)
    seqs, lens, scores = (np.asarray(x) for x in (out.sequences, out.lengths, out.scores))
    for b, prompt in enumerate(rows):
        t_seqs, t_lens, t_scores = _transformers_beams(torch, hf_model, prompt, stop_ids=stop_ids,
                                                       num_beams=num_beams, length_penalty=length_penalty,
                                                       early_stopping=early_stopping,
                                                       num_return_sequences=num_return)
        np.testing.assert_array_equal(lens[b], t_lens, err_msg=f"prompt {b} lengths")
        for r in range(num_return):
            np.testing.assert_array_equal(seqs[b, r, :lens[b, r]], t_seqs[r, :t_lens[r]], err_msg=f"prompt {b}.{r}")
            assert np.all(seqs[b, r, lens[b, r]:] == 0)  # pad_id after the end
        np.testing.assert_allclose(scores[b], t_scores, atol=TOL, rtol=0, err_msg=f"prompt {b} scores")

    # The scores are what they say: summed log-probs / length ** length_penalty, best first.
    np.testing.assert_allclose(scores, np.asarray(out.sum_logprobs) / lens.astype(np.float64) ** length_penalty,
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)
    stopped = np.asarray(out.finish_reason) == js.FinishReason.STOP
    last = np.take_along_axis(seqs, np.maximum(lens - 1, 0)[..., None], axis=2)[..., 0]
    np.testing.assert_array_equal(stopped, np.isin(last, stop_ids) if stop_ids else False)
    if stop_ids:  # the setting exercises hypotheses ending at different steps
        assert stopped.any() and len(set(lens[stopped].tolist())) > 1, lens


def test_matches_transformers_left_padded_batch(models, prompts):
    """transformers' own batch (left-padded, attention mask) gives the same hypotheses."""
    torch, hf_model, lm = models
    rows, tokens, lengths = prompts
    p = max(PROMPT_LENGTHS)
    ids = torch.zeros((len(rows), p), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, p - len(row):], mask[b, p - len(row):] = torch.tensor(row), 1
    kw = dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=3)
    with torch.no_grad():
        theirs = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N, pad_token_id=0,
                                   eos_token_id=[233, 241], return_dict_in_generate=True, output_scores=True, **kw)
    out = js.beam_search(lm, tokens, lengths, max_new_tokens=N, stop_ids=(233, 241), **kw)
    t_lens = (theirs.beam_indices.numpy() != -1).sum(axis=1).reshape(len(rows), 3)
    np.testing.assert_array_equal(np.asarray(out.lengths), t_lens)
    t_seqs = theirs.sequences[:, p:].numpy().reshape(len(rows), 3, -1)
    for b in range(len(rows)):
        for r in range(3):
            np.testing.assert_array_equal(np.asarray(out.sequences[b, r, :t_lens[b, r]]), t_seqs[b, r, :t_lens[b, r]])
    np.testing.assert_allclose(np.asarray(out.scores).reshape(-1), theirs.sequences_scores.numpy(), atol=TOL)


def test_sum_logprobs_match_a_full_forward(models, prompts):
    """Invariant: a hypothesis' sum_logprobs is the log-likelihood of its tokens under an
    uncached forward pass of prompt + hypothesis (so the cache reordering is right)."""
    _, _, lm = models
    rows, tokens, lengths = prompts
    out = js.beam_search(lm, tokens, lengths, num_beams=3, max_new_tokens=N, num_return_sequences=3,
                         stop_ids=(270,))
    seqs, lens = np.asarray(out.sequences), np.asarray(out.lengths)
    full = np.zeros((len(rows), 3, tokens.shape[1] + N), np.int32)  # prompt + hypothesis, right-padded
    for b, prompt in enumerate(rows):
        full[b, :, :len(prompt)] = prompt
        full[b, :, len(prompt):len(prompt) + N] = seqs[b]
    logp = np.asarray(jax.nn.log_softmax(jax.jit(lm.forward)(full.reshape(-1, full.shape[-1])), axis=-1))
    logp = logp.reshape(*full.shape, -1)
    for b, prompt in enumerate(rows):
        for r in range(3):
            steps = np.arange(lens[b, r])
            expected = logp[b, r, len(prompt) - 1 + steps, seqs[b, r, steps]].sum()
            np.testing.assert_allclose(float(out.sum_logprobs[b, r]), expected, atol=TOL)


@pytest.mark.parametrize("length_penalty", [0.0, 1.5])
def test_enough_beams_find_the_exhaustive_best(length_penalty):
    """With more beams than candidates, early_stopping="never" is exact: the best
    hypotheses equal the top of an exhaustive enumeration of every finished sequence."""
    v, eos, n = 4, 3, 4
    model = StaticTableModel(np.random.default_rng(0).normal(size=(v, v)) * 1.5)
    logp = np.asarray(jax.nn.log_softmax(model.table, axis=-1), np.float64)
    finished = []  # (score, tokens): ends with eos, or has n tokens and no eos before the last

    def extend(seq, total, last):
        for t in range(v):
            ys, s = seq + [t], total + logp[last, t]
            if t == eos or len(ys) == n:
                finished.append((s / len(ys) ** length_penalty, ys))
            else:
                extend(ys, s, t)

    extend([], 0.0, 1)
    finished.sort(key=lambda x: -x[0])
    out = js.beam_search(model, jnp.array([[0, 1]]), jnp.array([2]), num_beams=64, max_new_tokens=n,
                         length_penalty=length_penalty, early_stopping="never", num_return_sequences=5, stop_ids=[eos])
    exhaustive = {tuple(ys): score for score, ys in finished}  # a bigram model has exact ties: compare by score
    np.testing.assert_allclose(np.asarray(out.scores[0]), [score for score, _ in finished[:5]], rtol=1e-5)
    for r in range(5):
        ys = tuple(np.asarray(out.sequences[0, r, :out.lengths[0, r]]).tolist())
        np.testing.assert_allclose(exhaustive[ys], float(out.scores[0, r]), rtol=1e-5)
    assert len({len(ys) for _, ys in finished[:5] if ys[-1] == eos}) > 1  # stops at different steps


@pytest.fixture(scope="module")
def tiny():
    c = DecoderConfig(vocab_size=300, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=24,
                      max_seq_len=64)
    return DecoderLM(jax.jit(lambda k: init_params(c, k))(jax.random.key(0)), c)


def test_values_are_traced_no_recompile(tiny):
    tokens, lengths = jnp.array([[256, 72, 105]]), jnp.array([3])
    kw = dict(num_beams=2, max_new_tokens=4)
    js.beam_search(tiny, tokens, lengths, **kw)
    before = _beam._beam_traced_model._cache_size()
    for lp, es, stops, pad, r in [(0.5, True, (5,), 3, 2), (-2.0, "never", (7,), 0, 1), (1.0, False, (), 1, 2)]:
        js.beam_search(tiny, tokens, lengths, length_penalty=lp, early_stopping=es, stop_ids=stops, pad_id=pad,
                       num_return_sequences=r, **kw)
    assert _beam._beam_traced_model._cache_size() == before


@pytest.mark.parametrize("kw,match", [
    (dict(num_beams=0), "num_beams must be a positive int, got 0"),
    (dict(num_beams=2.0), "num_beams must be a positive int, got 2.0"),
    (dict(num_beams=True), "num_beams must be a positive int, got True"),
    (dict(num_return_sequences=3), "num_return_sequences=3 must be <= num_beams=2"),
    (dict(num_return_sequences=0), "num_return_sequences must be a positive int, got 0"),
    (dict(length_penalty=float("nan")), "length_penalty must be in .*got nan"),
    (dict(length_penalty=float("inf")), "length_penalty must be in .*got inf"),
    (dict(length_penalty=[1.0, 2.0]), r"length_penalty must be a scalar, got shape \(2,\)"),
    (dict(early_stopping="always"), "early_stopping must be True, False or 'never', got 'always'"),
    (dict(early_stopping=1), "early_stopping must be True, False or 'never', got 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int, got 0"),
    (dict(stop_ids=(100000,)), "stop id 100000 is outside the vocabulary"),
    (dict(pad_id=1.5), "pad_id must be integers, got 1.5"),
    (dict(cache_size=4), "cache_size=4 is smaller than"),
])
def test_bad_values_raise(tiny, kw, match):
    args = dict(num_beams=2, max_new_tokens=4) | kw
    with pytest.raises(ValueError, match=match):
        js.beam_search(tiny, jnp.array([[256, 72, 105]]), jnp.array([3]), **args)


def test_cache_that_is_not_batch_leading_raises(tiny):
    class TimeMajor:  # cache leaves [S, B, ...]: cannot be reordered along axis 0
        vocab_size = tiny.vocab_size

        def init_cache(self, b, s):
            return jnp.zeros((s, b, 2))

    with pytest.raises(ValueError, match="leading axis is not B"):
        js.beam_search(TimeMajor(), jnp.array([[1, 2]]), jnp.array([2]), num_beams=2, max_new_tokens=2)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli():
    return load_script("generate")


def test_cli_prints_the_hypotheses_of_beam_search(cli, tiny, tmp_path, capsys):
    from models import load_pretrained, save_model

    save_model(str(tmp_path / "tiny"), tiny)
    flags = ["--num-beams", "3", "--num-return-sequences", "2", "--length-penalty", "0.5", "--early-stopping",
             "never", "--max-new-tokens", "5"]
    assert cli.main(["AB", "xyz", "--checkpoint", str(tmp_path / "tiny"), *flags]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split(" ")[0] for line in lines] == ["[0.0]", "[0.1]", "[1.0]", "[1.1]"]
    lm, tok = load_pretrained(str(tmp_path / "tiny"))
    ids, lengths = tok.encode_batch(["AB", "xyz"])
    out = js.beam_search(lm, ids, lengths, num_beams=3, num_return_sequences=2, length_penalty=0.5,
                         early_stopping="never", max_new_tokens=5, stop_ids=[tok.eos_id], pad_id=tok.pad_id)
    printed = [float(line.split(" ")[2]) for line in lines]
    np.testing.assert_allclose(printed, np.asarray(out.scores).reshape(-1), atol=1e-4)


@pytest.mark.parametrize("flags,message", [
    (["--num-beams", "2", "--top-p", "0.9"], "--top-p=0.9 cannot be used with --num-beams"),
    (["--num-beams", "2", "--greedy"], "--greedy=True cannot be used with --num-beams"),
    (["--num-beams", "2", "--num-samples", "2"], "--num-samples=2 cannot be used with --num-beams"),
    (["--length-penalty", "2"], "--length-penalty needs --num-beams"),
    (["--early-stopping", "never"], "--early-stopping needs --num-beams"),
    (["--num-beams", "0"], "--num-beams must be >= 1, got 0"),
    (["--num-beams", "2", "--num-return-sequences", "3"],
     r"--num-return-sequences must be in \[1, --num-beams=2\], got 3"),
    (["--num-beams", "2", "--num-return-sequences", "0"],
     r"--num-return-sequences must be in \[1, --num-beams=2\], got 0"),
    (["--num-beams", "2", "--length-penalty", "nan"], "--length-penalty must be finite, got nan"),
])
def test_cli_bad_beam_flags_exit_2(cli, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["--checkpoint", "/nonexistent", *flags])  # fails before the model loads
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
