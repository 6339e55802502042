"""The byte-DFA build (jaxsample/_constraints/automaton.py) against Python's ``re`` as the reference.

Random regular expressions over a small alphabet (with a two-byte character, so byte classes
and UTF-8 sequences are exercised), compiled by ``parse_regex`` and ``determinize`` (subset
construction over byte classes, embedded sub-DFAs, Moore minimisation), must accept exactly
the strings ``re.fullmatch`` (or, in JSON Schema ``pattern`` mode, ``re.search``) accepts,
for every string up to a length; products (``and`` / ``diff``) must match the boolean
combination. The minimised DFA is minimal: no two of its states accept the same suffixes.
"""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest

from jaxsample._constraints import automaton as A

ALPHABET = ["a", "b", "-", "\u00e9"]  # U+00E9 is two UTF-8 bytes
STRINGS = ["".join(p) for n in range(5) for p in itertools.product(ALPHABET, repeat=n)]


def _random_regex(rng: random.Random, depth: int = 3) -> str:
    if depth == 0 or rng.random() < 0.25:
        return rng.choice(["a", "b", "-", "\u00e9", "[ab]", "[^a]", ".", "[a\u00e9]", "(?:)"])
    kind = rng.choice(["cat", "cat", "alt", "star", "plus", "opt", "count"])
    x = _random_regex(rng, depth - 1)
    if kind == "cat":
        return x + _random_regex(rng, depth - 1)
    if kind == "alt":
        return f"(?:{x}|{_random_regex(rng, depth - 1)})"
    if kind == "count":
        lo = rng.randint(0, 2)
        return f"(?:{x}){{{lo},{lo + rng.randint(0, 2)}}}"
    return f"(?:{x}){ {'star': '*', 'plus': '+', 'opt': '?'}[kind]}"


def _accepts(d: A.DFA, s: str) -> bool:
    q = 0
    for byte in s.encode("utf-8"):
        q = int(d.table[q, byte])
        if q < 0:
            return False
    return bool(d.accept[q])


def _language(d: A.DFA) -> list[bool]:
    return [_accepts(d, s) for s in STRINGS]


@pytest.mark.parametrize("seed", range(4))
def test_random_regexes_accept_what_re_fullmatch_accepts(seed):
    rng = random.Random(seed)
    for _ in range(30):
        pat = _random_regex(rng)
        d = A.determinize(A.parse_regex(pat), 4000, "t")
        want = [re.fullmatch(pat, s) is not None for s in STRINGS]
        assert _language(d) == want, pat


@pytest.mark.parametrize("seed", range(2))
def test_random_patterns_in_search_mode_accept_what_re_search_accepts(seed):
    # also covers the x{lo,hi} -> x{lo} shortcut next to an unanchored end
    rng = random.Random(100 + seed)
    for _ in range(30):
        pat = _random_regex(rng)
        pat = rng.choice(["", "^"]) + pat + rng.choice(["", "$"])
        d = A.determinize(A.parse_regex(pat, search=True), 4000, "t")
        want = [re.search(pat, s) is not None for s in STRINGS]
        assert _language(d) == want, pat


def test_random_products_and_embedded_dfas_match_the_boolean_combination():
    rng = random.Random(7)
    for _ in range(25):
        p, q = _random_regex(rng), _random_regex(rng)
        a, b = A.parse_regex(p), A.parse_regex(q)
        for kind, op in (("and", lambda x, y: x and y), ("diff", lambda x, y: x and not y)):
            inner = {s: op(re.fullmatch(p, s) is not None, re.fullmatch(q, s) is not None) for s in STRINGS}
            assert _language(A.determinize((kind, a, b), 4000, "t")) == [inner[s] for s in STRINGS], (kind, p, q)
            # the product embedded twice in a repetition, then another embedded DFA
            d = A.determinize(A.cat(A.rep((kind, a, b), 0, 2), A.det(b)), 4000, "t")

            def twice(w: str) -> bool:
                return w == "" or any(inner[w[:i]] and (inner[w[i:]] or w[i:] == "") for i in range(len(w) + 1))

            for s in STRINGS:
                want = any(twice(s[:c]) and re.fullmatch(q, s[c:]) is not None for c in range(len(s) + 1))
                assert _accepts(d, s) == want, (kind, p, q, s)


def test_an_embedded_dfa_that_returns_to_its_start_does_not_leak_into_the_enclosing_state():
    # a*((bc)*d): X's DFA returns to its start after "bc"; that start must not be the loop state of a*
    x = A.det(A.parse_regex("(?:bc)*d"))
    d = A.determinize(A.cat(A.rep(A.lit("a"), 0, None), x), 100, "t")
    for s, ok in (("d", True), ("aad", True), ("abcbcd", True), ("bcad", False), ("abca", False), ("bc", False)):
        assert _accepts(d, s) == ok, s
    d = A.determinize(A.rep(x, 0, None), 100, "t")  # X* : "bc" alone is not a complete X
    for s, ok in (("", True), ("d", True), ("bcdd", True), ("bc", False), ("dbc", False)):
        assert _accepts(d, s) == ok, s


def _distinguishable(d: A.DFA) -> np.ndarray:
    """The table-filling algorithm (the dead state added as the last state): ``[p, q]`` True iff
    some byte string leads exactly one of p, q to acceptance."""
    n = d.table.shape[0]
    t = np.vstack([np.where(d.table < 0, n, d.table), np.full((1, 256), n)])
    acc = np.append(d.accept, False)
    marked = acc[:, None] != acc[None, :]
    while True:
        new = marked | marked[t[:, None, :], t[None, :, :]].any(axis=-1)
        if (new == marked).all():
            return marked
        marked = new


def test_the_minimised_dfa_has_no_two_equivalent_states():
    rng = random.Random(11)
    for _ in range(20):
        pat = _random_regex(rng)
        d = A.determinize(A.parse_regex(pat), 4000, "t")
        n = d.table.shape[0]
        dist = _distinguishable(d)
        off_diagonal = ~np.eye(n + 1, dtype=bool)
        assert dist[off_diagonal].all(), pat  # every two states (and the dead state) differ
        again = A._minimize(d)
        assert np.array_equal(again.table, d.table) and np.array_equal(again.accept, d.accept), pat


def test_long_bounded_repetitions_stay_exact_and_fast_to_build():
    d = A.determinize(A.parse_regex("[ab]{0,300}c"), 4000, "t")
    assert _accepts(d, "ab" * 150 + "c") and not _accepts(d, "a" * 301 + "c") and _accepts(d, "c")
    d = A.determinize(A.parse_regex("[A-Za-z0-9-_.:]{1,255}", search=True), 4000, "t")
    one = A.determinize(A.parse_regex("[A-Za-z0-9-_.:]", search=True), 4000, "t")
    assert np.array_equal(d.table, one.table)  # any text containing one such character
    assert _accepts(d, "--x--") and not _accepts(d, "") and not _accepts(d, "!!")


def test_random_object_member_sequences_match_a_brute_force_enumeration():
    # seq(): members in order, sep between present ones, lo <= #present <= hi; members at counts
    # that lead to the same state share one copy of the member automaton
    rng = random.Random(5)
    for _ in range(20):
        items = [(_random_regex(rng, 1), rng.random() < 0.3, rng.random() < 0.3) for _ in range(rng.randint(1, 3))]
        items = [(p, req and not rep_, rep_) for p, req, rep_ in items]
        lo = rng.randint(0, 2)
        hi = rng.choice([None, lo, lo + 1, lo + 2])
        node = A.seq([(A.parse_regex(p), req, rep_) for p, req, rep_ in items], A.lit("-"), lo, hi)
        d = A.determinize(node, 4000, "t")
        choices = [[1] if req else ([0, 1] if not rep_ else list(range(5))) for _, req, rep_ in items]
        combos = []
        for counts in itertools.product(*choices):
            if lo <= sum(counts) and (hi is None or sum(counts) <= hi):
                parts = [p for (p, _, _), k in zip(items, counts) for _ in range(k)]
                combos.append(re.compile("-".join(f"(?:{p})" for p in parts)))
        for s in STRINGS:
            want = any(c.fullmatch(s) for c in combos)
            assert _accepts(d, s) == want, (items, lo, hi, s)


@pytest.mark.parametrize("pat", ["^a$|^b$", "^ab|-$|\u00e9", "a|b|", "[|]|a-", "(a|b)-|^\u00e9$", r"a\||^b"])
@pytest.mark.parametrize("search", [False, True])
def test_anchored_top_level_alternatives_are_read_one_by_one(pat, search):
    """Python's parser moves a shared ``^`` out of ``^a$|^b$``; each alternative is read on
    its own, in both modes (before: refused as an anchor inside the pattern)."""
    d = A.determinize(A.parse_regex(pat, search=search), 4000, "t")
    strings = STRINGS + ["|", "a|", "a-|"]
    want = [(re.search if search else re.fullmatch)(pat, s) is not None for s in strings]
    assert [_accepts(d, s) for s in strings] == want, pat


def test_an_anchor_inside_a_group_is_still_refused():
    with pytest.raises(A.RegexError, match="an anchor"):
        A.parse_regex("a($|b)")


def test_shared_sub_dfas_are_counted_once_when_shared_from_several_threads():
    """Two builds (threads) that share the same sub-DFA count its states once."""
    import threading

    d = A.DFA(np.array([[1] * 256, [-1] * 256]), np.array([False, True]))
    saved, size = dict(A._SHARED), A._shared_size[0]
    try:
        A._SHARED.clear()
        A._shared_size[0] = 0
        keys = [("lit", bytes([i])) for i in range(50)]
        threads = [threading.Thread(target=lambda: [A._share(k, d, 2, 1) for k in keys]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(A._SHARED) == set(keys)
        assert A._shared_size[0] == 2 * len(keys)
    finally:
        A._SHARED.clear()
        A._SHARED.update(saved)
        A._shared_size[0] = size


def _walk(d: A.DFA, q: int, piece: bytes) -> int:
    for byte in piece:
        q = int(d.table[q, byte])
        if q < 0:
            break
    return q


@pytest.mark.parametrize("every_byte", [True, False])
def test_the_token_automaton_is_every_token_walked_from_every_reachable_state(every_byte):
    # the first trie level is gathered densely (the table itself when every byte is a token), the
    # deeper ones pair by pair: against walking each token's bytes through the DFA
    rng = random.Random(7)
    d = A.determinize(A.parse_regex("(?:ab|a-|\u00e9b|b+)*[ab]{0,3}-?"), 4000, "t")
    singles = [bytes([b]) for b in range(256) if every_byte or b not in b"a\xc3"]
    multi = {bytes(rng.choice(b"ab-\xc3\xa9") for _ in range(rng.randint(2, 4))) for _ in range(60)}
    pieces = singles + sorted(multi) + [None]  # the last one: end-of-sequence
    eos = len(pieces) - 1
    trie = A.TokenTrie(pieces, eos, len(pieces))
    n, src, tok, dst, accept = A.token_automaton(d, trie, 10_000, 1 << 20, "t")
    state_of = {0: 0}  # local state -> DFA state (local states are numbered in BFS order)
    got = set()
    for s, t, u in zip(src.tolist(), tok.tolist(), dst.tolist()):
        q = _walk(d, state_of[s], pieces[t])
        assert q >= 0
        assert state_of.setdefault(u, q) == q
        got.add((state_of[s], t, q))
    assert sorted(state_of) == list(range(n))
    assert [bool(a) for a in accept] == [bool(d.accept[state_of[s]]) for s in range(n)]
    want, todo, seen = set(), [0], {0}
    while todo:
        q = todo.pop()
        for t, piece in enumerate(pieces[:eos]):
            r = _walk(d, q, piece)
            if r >= 0:
                want.add((q, t, r))
                if r not in seen:
                    seen.add(r)
                    todo.append(r)
    assert got == want
    assert set(state_of.values()) == seen


def test_dfas_that_need_more_than_48_refinement_rounds_are_minimised():
    # four copies of a long chain, three of them equal (after x, w, y) and one that differs only at
    # its end (after z): telling the last one apart takes Moore's refinement about 60 rounds, and
    # only then are the equal ones merged
    chain = "".join("ab"[i % 2] for i in range(60))
    node = A.alt(*(A.parse_regex(f"{first}{chain}{last}") for first, last in ("xc", "wc", "yc", "zd")))
    d = A.determinize(node, 4000, "t")
    n = d.table.shape[0]
    assert n == 1 + 2 * 61 + 1  # the start, the chain ending in c, the one ending in d, the accepting end
    assert _distinguishable(d)[~np.eye(n + 1, dtype=bool)].all()
    assert _accepts(d, "w" + chain + "c") and _accepts(d, "z" + chain + "d") and not _accepts(d, "z" + chain + "c")


def test_builds_pause_the_cyclic_gc_and_restore_it():
    import gc

    was = gc.isenabled()
    try:
        gc.enable()
        with pytest.raises(KeyError):
            with A.no_cyclic_gc():
                assert not gc.isenabled()
                raise KeyError("a build that fails")
        assert gc.isenabled()  # restored after an error too
        gc.disable()
        with A.no_cyclic_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a caller's own pause is kept
    finally:
        (gc.enable if was else gc.disable)()


def test_overlapping_builds_on_two_threads_share_one_gc_pause():
    import gc
    import threading

    was = gc.isenabled()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with A.no_cyclic_gc():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with A.no_cyclic_gc():
            second_in.set()
            first_out.wait(10)
            seen["after the first ended"] = gc.isenabled()  # the first's exit must not re-enable it
        seen["after both"] = gc.isenabled()

    try:
        gc.enable()
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert seen == {"after the first ended": False, "after both": True}
    finally:
        (gc.enable if was else gc.disable)()
