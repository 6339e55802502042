"""NGramDraft (corpus n-gram draft for speculative decoding): hand-computed table and
proposals, an independent dict-based backoff model, documents and weights, build
determinism, the file format and its errors, prompt lookup against a plain-Python
reference, and speculative decoding with the table (greedy = generate on ragged prompts,
sampled distribution = the chain's exact one)."""

from __future__ import annotations

import collections
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample._decoding.drafts import lookup as _lookup
from helpers import LOOKUP_LENGTHS as LENGTHS
from helpers import LOOKUP_PROMPTS as PROMPTS
from helpers import ExtendTableModel, chi_square, cli_texts, exact_distribution, load_script, re_search, row_keys

V = 6  # the vocabulary of the distribution test's toy target

# Worked by hand (vocab 8, max_ngram 2, min_count 2):
#   fallback: token counts 1:2 2:5 3:2 4:3 5:3 -> 2
#   order 1:  1->2 (= fallback, pruned)  2->5 (5 x3 beats 3 x2)  3->1 (1 and 4 once each: smaller id)
#             4->2 (= fallback, pruned)  5->4
#   order 2:  (1,2)->3 (x2, differs from 2->5: stored); (4,2)->5, (2,5)->4, (5,4)->2 equal their
#             backoff (pruned); (2,3), (3,1), (3,4) seen once < min_count (back off)
CORPUS = np.array([1, 2, 3, 1, 2, 3, 4, 2, 5, 4, 2, 5, 4, 2, 5])


def small_draft(**kw):
    return js.NGramDraft.build(CORPUS, vocab_size=8, max_ngram=2, min_count=2, **kw)


def propose(draft, contexts, k):
    """Proposals after each context (a list of token lists, ragged) -> list of lists."""
    w = max(map(len, contexts))
    seq = np.full((len(contexts), w), -1, np.int32)
    for i, c in enumerate(contexts):
        seq[i, :len(c)] = c
    return np.asarray(draft.continuation(jnp.asarray(seq), jnp.asarray([len(c) for c in contexts]), k)).tolist()


def test_hand_computed_table_and_proposals():
    draft = small_draft()
    assert int(draft.fallback) == 2
    assert dict(draft.info) == dict(tokens=15, entries=4, dropped=0, min_count=2)
    assert draft.num_entries == 4 and draft.num_slots == 8
    got = propose(draft, [[1, 2], [4, 2], [7], [6, 5], [0, 3]], 4)
    assert got == [[3, 1, 2, 3],   # (1,2)->3, 3->1, 1: fallback 2, (1,2)->3 again
                   [5, 4, 2, 5],   # (4,2) pruned: 2->5, then 5->4, (5,4) and 4 pruned: fallback 2, 2->5
                   [2, 5, 4, 2],   # 7 unseen: fallback 2, (7,2) unseen: 2->5, 5->4, 4->2
                   [4, 2, 5, 4],
                   [1, 2, 3, 1]]   # 3->1, 1: fallback 2, (1,2)->3, 3->1


def reference_predict(corpus_docs, weights, max_ngram, min_count, context, fallback):
    """The backoff model by plain dictionaries: longest suffix counted >= min_count (order 1:
    any count), its most frequent next token (ties: smaller id)."""
    counts = {n: collections.defaultdict(collections.Counter) for n in range(1, max_ngram + 1)}
    for doc, w in zip(corpus_docs, weights):
        doc = list(doc)
        for i in range(len(doc)):
            for n in range(1, max_ngram + 1):
                if i - n >= 0:
                    counts[n][tuple(doc[i - n:i])][doc[i]] += w
    for n in range(min(max_ngram, len(context)), 0, -1):
        c = counts[n].get(tuple(context[-n:]))
        if c and sum(c.values()) and (n == 1 or max(c.values()) >= min_count):
            best = max(c.values())
            return min(t for t, v in c.items() if v == best)
    return fallback


@pytest.mark.parametrize("max_ngram, min_count, weights", [(3, 1, (1, 1)), (4, 3, (1, 3))])
def test_matches_dictionary_backoff_model(max_ngram, min_count, weights):
    """A Markov-ish corpus over 5 tokens in two documents: the table's prediction equals the
    dictionary model's for 400 random contexts (seen and unseen, every length)."""
    rng = np.random.default_rng(0)
    docs = []
    for size in (1500, 700):
        x = [int(rng.integers(5))]
        for _ in range(size - 1):  # mostly deterministic successor, sometimes random
            x.append((x[-1] * 2 + 1) % 5 if rng.random() < 0.6 else int(rng.integers(5)))
        docs.append(np.array(x))
    draft = js.NGramDraft.build(docs, weights=list(weights), vocab_size=6, max_ngram=max_ngram,
                                min_count=min_count, probes=16)
    assert dict(draft.info)["dropped"] == 0
    contexts = [list(rng.integers(0, 6, rng.integers(1, 7))) for _ in range(400)]  # token 5: never seen
    got = propose(draft, contexts, 1)
    want = [reference_predict(docs, weights, max_ngram, min_count, c, int(draft.fallback)) for c in contexts]
    assert [g[0] for g in got] == want


def test_documents_and_weights():
    a, b = np.array([1, 2]), np.array([6, 5, 5, 5, 5])
    draft = js.NGramDraft.build([a, b], vocab_size=8, max_ngram=1, min_count=1)
    assert propose(draft, [[2]], 1) == [[5]]  # '2 -> 6' spans two documents: not counted (fallback 5)
    joined = js.NGramDraft.build(np.concatenate([a, b]).tolist(), vocab_size=8, max_ngram=1, min_count=1)
    assert propose(joined, [[2]], 1) == [[6]]  # a list of ints is one document
    c, d = np.array([1, 2, 1, 2, 1, 2]), np.array([1, 3])  # after 1: 2 (x3) vs 3 (x1 * weight)
    assert propose(js.NGramDraft.build([c, d], weights=[1, 3], vocab_size=8, max_ngram=1), [[1]], 1) == [[2]]
    assert propose(js.NGramDraft.build([c, d], weights=[1, 4], vocab_size=8, max_ngram=1), [[1]], 1) == [[3]]
    assert propose(js.NGramDraft.build([c, d], weights=[1, 0], vocab_size=8, max_ngram=1), [[3]], 1) == [[1]]


def test_prompt_lookup_first():
    """prompt_lookup=n: an in-context match of n tokens wins over the table; without one the
    table proposes."""
    draft = small_draft(prompt_lookup=2)
    # '1 2' occurred earlier in the row, followed by '6 7': the row's own continuation wins.
    assert propose(draft, [[1, 2, 6, 7, 1, 2], [4, 2]], 3) == [[6, 7, 1], [5, 4, 2]]
    assert propose(draft.replace(prompt_lookup=0), [[1, 2, 6, 7, 1, 2]], 3) == [[3, 1, 2]]


def test_build_is_deterministic_and_file_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    corpus = rng.integers(0, 30, 5000)
    a = js.NGramDraft.build(corpus, vocab_size=30, max_ngram=4, min_count=2)
    b = js.NGramDraft.build(corpus, vocab_size=30, max_ngram=4, min_count=2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    path = str(tmp_path / "t.safetensors")
    a.save(path, corpus="random")
    assert os.listdir(tmp_path) == ["t.safetensors"]  # no temp file left behind
    c = js.NGramDraft.load(path, prompt_lookup=3)
    assert (c.max_ngram, c.probes, c.vocab_size, c.prompt_lookup, c.info) == (4, 8, 30, 3, a.info)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
        np.testing.assert_array_equal(x, y)
    ctx = rng.integers(0, 30, (8, 10)).astype(np.int32)
    np.testing.assert_array_equal(a.continuation(ctx, np.full(8, 10), 5), c.continuation(ctx, np.full(8, 10), 5))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_ngram=0), "max_ngram must be an int >= 1, got 0"),
    (dict(min_count=0), "min_count must be an int >= 1, got 0"),
    (dict(probes=2.0), "probes must be an int >= 1, got 2.0"),
    (dict(load_factor=1.5), r"load_factor must be a float in \(0, 1\], got 1.5"),
    (dict(prompt_lookup=-1), "prompt_lookup must be an int >= 0, got -1"),
    (dict(vocab_size=5), r"tokens\[8\]=5 is outside the vocabulary \[0, 5\)"),
    (dict(tokens=CORPUS[None]), r"tokens must be a 1-D integer array, got shape \(1, 15\)"),
    (dict(tokens=[CORPUS, CORPUS[:1].astype(float)]), r"tokens\[1\] must be a 1-D integer array"),
    (dict(tokens=[CORPUS, CORPUS], weights=[1]), "weights has 1 entries for 2 token arrays"),
    (dict(tokens=[CORPUS, CORPUS], weights=[1, -1]), r"weights\[1\] must be an int >= 0, got -1"),
    (dict(tokens=[CORPUS], weights=[0]), "no context to count"),
    (dict(vocab_size=2 ** 28, max_ngram=7), r"max_ngram=7 with vocab_size=268435456 is too large"),
])
def test_build_errors(kwargs, match):
    args = dict(tokens=CORPUS, vocab_size=8, max_ngram=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        js.NGramDraft.build(args.pop("tokens"), **args)


def test_small_table_round_trips_and_saves_carefully(tmp_path):
    """A table smaller than its probe count still loads (at least `probes` slots); the
    file gets the usual permissions; the table's own metadata keys are refused."""
    draft = js.NGramDraft.build([1, 2], vocab_size=5, max_ngram=2, min_count=1)
    assert draft.num_slots >= draft.probes
    path = str(tmp_path / "small.safetensors")
    umask = os.umask(0o022)
    try:
        draft.save(path)
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644
    again = js.NGramDraft.load(path)
    np.testing.assert_array_equal(again.continuation(np.array([[1]], np.int32), np.array([1]), 2),
                                  draft.continuation(np.array([[1]], np.int32), np.array([1]), 2))
    with pytest.raises(ValueError, match=r"metadata keys \['probes', 'vocab_size'\] are reserved"):
        draft.save(path, probes="1", vocab_size="9")


def test_load_errors(tmp_path):
    from safetensors.numpy import save_file
    with pytest.raises(ValueError, match="no such file"):
        js.NGramDraft.load(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a table at all")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        js.NGramDraft.load(str(junk))
    good = small_draft()
    tensors = dict(keys=np.asarray(good.keys), values=np.asarray(good.values), fallback=np.array([2], np.int32),
                   stats=np.asarray(good.stats))
    meta = dict(format="jaxsample.ngram_draft", version="1", max_ngram="2", probes="8", vocab_size="8")
    cases = [
        (dict(tensors), {**meta, "format": "weights"}, "is not an n-gram draft table"),
        (dict(tensors), {**meta, "version": "9"}, "has table version '9'"),
        ({k: v for k, v in tensors.items() if k != "values"}, meta, r"lacks tensor\(s\) \['values'\]"),
        (dict(tensors), {**meta, "probes": "x"}, "metadata probes='x' is not an int"),
        ({**tensors, "keys": tensors["keys"][:6]}, meta, "S a power of two"),
        ({**tensors, "values": tensors["values"].astype(np.int64)}, meta, "values must be int32"),
        ({**tensors, "fallback": np.array([9], np.int32)}, meta, r"token ids outside its vocabulary \[0, 8\)"),
        ({**tensors, "stats": np.zeros(3, np.int32)}, meta, r"stats must be int32 \[4\]"),
        (dict(tensors), {**meta, "probes": "64"}, "probes=64 exceeds the 8 slots"),
    ]
    for i, (t, m, match) in enumerate(cases):
        path = str(tmp_path / f"bad{i}.safetensors")
        save_file(t, path, metadata=m)
        with pytest.raises(ValueError, match=match):
            js.NGramDraft.load(path)
    path = str(tmp_path / "ok.safetensors")
    save_file(tensors, path, metadata=meta)
    assert js.NGramDraft.load(path).num_entries == 4


def reference_lookup(ctx, max_ngram, min_ngram, k):
    """Prompt lookup in plain Python: the longest n-gram first, its most recent earlier
    occurrence, what followed it (repeating the period into the suffix)."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if len(ctx) <= n:
            continue
        for j in range(len(ctx) - n - 1, -1, -1):
            if ctx[j:j + n] == ctx[-n:]:
                period = len(ctx) - n - j
                return [ctx[j + n + i % period] for i in range(k)], True
    return [ctx[-1]] * k, False


def test_prompt_lookup_matches_python_reference():
    rng = np.random.default_rng(3)
    b, w = 300, 24
    seq = rng.integers(0, 3, (b, w)).astype(np.int32)  # 3 symbols: many matches of every length
    length = rng.integers(1, w + 1, b)
    for max_n, min_n, k in [(3, 1, 4), (4, 2, 3), (2, 2, 5)]:
        got, found = _lookup(jnp.asarray(seq), jnp.asarray(length), max_n, k, min_n)
        for r in range(b):
            want, want_found = reference_lookup(seq[r, :length[r]].tolist(), max_n, min_n, k)
            assert bool(found[r]) == want_found and np.asarray(got[r]).tolist() == want, (r, max_n, min_n)


# ----------------------------------------------------------------------------- speculative decoding


def test_greedy_with_ngram_draft_equals_generate(target):
    """Ragged prompts, a stateful penalty, a stop id: token for token equal to generate. The
    table is built from the target's own greedy text, so most proposals are accepted."""
    sampler = js.chain(js.RepetitionPenalty(1.3), js.Temperature(0.0))
    n = 40
    ref = js.generate(target, PROMPTS, LENGTHS, row_keys(1, 3), max_new_tokens=n, sampler=sampler)
    text = [np.asarray(ref.tokens)[r, :20] for r in range(3)]  # first halves only: the rest must be predicted
    stop = int(np.asarray(ref.tokens)[0, 30])
    ref = js.generate(target, PROMPTS, LENGTHS, row_keys(1, 3), max_new_tokens=n, sampler=sampler,
                      stop_ids=[stop], pad_id=258)
    draft = js.NGramDraft.build(text, vocab_size=target.vocab_size, max_ngram=3, min_count=1, prompt_lookup=2)
    out, stats = js.speculative_generate(target, PROMPTS, LENGTHS, row_keys(1, 3), max_new_tokens=n, draft=draft,
                                         num_draft_tokens=3, sampler=sampler, stop_ids=[stop], pad_id=258)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.finish_reason, ref.finish_reason)
    np.testing.assert_allclose(out.logprobs_processed, ref.logprobs_processed, atol=1e-4)
    # At most 3 a round (the last round of a row offers only the positions it can still
    # emit; a prompt-lookup match may propose fewer).
    rounds, drafted, accepted = np.asarray(stats.rounds), np.asarray(stats.drafted), np.asarray(stats.accepted)
    assert np.all(accepted <= drafted) and np.all(drafted <= 3 * rounds)
    np.testing.assert_array_equal(stats.emitted, np.asarray(ref.lengths) - 1)
    print(f"\nngram k=3: acceptance {stats.acceptance_rate:.2f}, {stats.tokens_per_round:.2f} tokens per call")
    assert 0.2 < stats.acceptance_rate < 1.0


def test_ngram_draft_vocabulary_must_match(target):
    with pytest.raises(ValueError, match="NGramDraft vocab_size 8 != target vocab_size 259"):
        js.speculative_generate(target, PROMPTS, LENGTHS, row_keys(0, 3), max_new_tokens=4, draft=small_draft())


def test_new_table_of_the_same_shape_does_not_recompile(target, monkeypatch):
    """The table is data (a pytree), not a compile-time constant: `propose` is traced once."""
    traces = []
    propose = js.NGramDraft.propose
    monkeypatch.setattr(js.NGramDraft, "propose", lambda self, *a: traces.append(1) or propose(self, *a))
    a = js.NGramDraft.build(CORPUS, vocab_size=259, max_ngram=2, min_count=1)
    b = js.NGramDraft.build(np.r_[CORPUS[::-1], 7], vocab_size=259, max_ngram=2, min_count=1)
    assert a.num_slots == b.num_slots and not np.array_equal(a.values, b.values) and a.info != b.info
    kw = dict(max_new_tokens=6, num_draft_tokens=2)
    for draft in (a, b):
        js.speculative_generate(target, PROMPTS, LENGTHS, row_keys(0, 3), draft=draft, **kw)
    assert len(traces) == 1
    js.speculative_generate(target, PROMPTS, LENGTHS, row_keys(0, 3), draft=a.replace(prompt_lookup=2), **kw)
    assert len(traces) == 2  # a static field is part of the program: a new trace (the counter works)


@pytest.mark.slow  # the point-mass path is covered by test_speculative's prompt-lookup case too
def test_sampled_distribution_with_ngram_draft():
    """20,000 rows, first 3 tokens against the chain's exact distribution (chi-square <=
    df + 5 sqrt(2 df)), with a point-mass draft that is sometimes right and sometimes not."""
    ta = jax.random.normal(jax.random.key(11), (V, V)) * 1.5
    target_model = ExtendTableModel(ta)
    sampler = js.chain(js.RepetitionPenalty(1.8), js.Temperature(0.9), js.TopK(4))
    draft = js.NGramDraft.build(np.array([0, 1, 2, 3, 4, 5, 1, 3, 5, 0, 2, 4]), vocab_size=V, max_ngram=2,
                                min_count=1)
    prompt = np.array([0, 1, 2, 3, 1, 2], np.int32)
    b, steps = 20_000, 3
    out, stats = js.speculative_generate(target_model, np.repeat(prompt[None], b, 0), np.full(b, prompt.size),
                                         row_keys(7, b), max_new_tokens=steps, draft=draft, num_draft_tokens=2,
                                         sampler=sampler)
    tokens = np.asarray(out.tokens)
    cells = (tokens[:, 0] * V + tokens[:, 1]) * V + tokens[:, 2]
    counts = np.bincount(cells, minlength=V ** steps).astype(np.float64)
    _, prob = exact_distribution(target_model, sampler, prompt, steps)
    chi2, df = chi_square(counts, prob * b)
    assert chi2 <= df + 5 * math.sqrt(2 * df), (chi2, df)
    assert 0.05 < stats.acceptance_rate < 0.95


def test_shipped_table_loads_and_fits_budget():
    from models import SHIPPED_NGRAM_DRAFT, load_ngram_draft
    draft = load_ngram_draft()
    assert os.path.getsize(SHIPPED_NGRAM_DRAFT) <= 5_000_000
    assert (draft.vocab_size, draft.max_ngram, draft.prompt_lookup) == (259, 5, 5)  # match of 5 first
    assert load_ngram_draft(prompt_lookup=0).prompt_lookup == 0
    assert dict(draft.info)["entries"] == draft.num_entries + dict(draft.info)["dropped"]


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv, match", [
    (["--ngram-draft", "--draft-checkpoint", "d"], "--draft-checkpoint and --ngram-draft are two drafts"),
    (["--ngram-draft", "--num-beams", "2"], "--ngram-draft cannot be used with --num-beams"),
    (["--ngram-draft", "t.safetensors", "--num-draft-tokens", "0"], "--num-draft-tokens must be >= 1, got 0"),
    (["--ngram-draft", "--prompt-lookup", "0"], "--prompt-lookup must be >= 1, got 0"),
])
def test_cli_bad_combinations(argv, match):
    gen = load_script("generate")
    assert re_search(match, gen.check_speculative_args(gen.build_parser().parse_args(argv)))
    assert gen.check_speculative_args(gen.build_parser().parse_args(["--ngram-draft", "--prompt-lookup", "3"])) is None


@pytest.mark.slow
def test_cli_ngram_draft_greedy_equals_plain(tmp_path, capsys):
    """scripts/generate.py --greedy prints the same text with --ngram-draft (the shipped
    table, and a table file with --prompt-lookup) as without; a bad file is a clear error."""
    gen = load_script("generate")
    path = str(tmp_path / "t.safetensors")
    js.NGramDraft.build(np.frombuffer(b"ROMEO: Good morrow, cousin. ROMEO: What, is the day so young?", np.uint8),
                        vocab_size=259, max_ngram=3, min_count=1).save(path)
    base = ["ROMEO:", "--greedy", "--max-new-tokens", "24", "--no-stream"]
    texts = cli_texts(gen, capsys, base, [], ["--ngram-draft"],
                      ["--ngram-draft", path, "--prompt-lookup", "2", "--num-draft-tokens", "3"])
    assert texts[0] == texts[1] == texts[2]
    with pytest.raises(SystemExit):
        gen.main(base + ["--ngram-draft", str(tmp_path / "missing.safetensors")])
    assert "--ngram-draft: NGramDraft.load: no such file" in capsys.readouterr().err


def test_cli_ngram_draft_reading_a_prompt_as_its_file_says_so():
    """`--ngram-draft "ROMEO:"` reads the prompt as the optional FILE: the error says how
    to write it instead."""
    gen = load_script("generate")
    args = gen.build_parser().parse_args(["--greedy", "--ngram-draft", "ROMEO:"])
    with pytest.raises(ValueError, match=r"no such file: 'ROMEO:'.*--ngram-draft=FILE"):
        gen.speculative_runner(args, None, None, None, None, None, (), 0, [])
