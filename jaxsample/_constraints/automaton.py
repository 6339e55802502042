"""Regular languages over bytes: a small regex AST, its NFA, a bounded DFA, and the token automaton.

The builders of :mod:`jaxsample._constraints.structured` describe a language as an AST
(tuples, below), compile it to a Thompson NFA over bytes (code points are spelled as their
UTF-8 byte sequences), determinize it over byte classes with a hard cap on the number of
states (the build stops as soon as the cap is crossed, before any large allocation), minimise
it, and walk every token's bytes through the DFA to get the token-level automaton the device
runs (docs/structured.md, "How a constraint is built").

AST nodes::

    ("lit", b"...")             these bytes
    ("set", ((lo, hi), ...))    one code point in the ranges (UTF-8 encoded)
    ("bytes", ((lo, hi), ...))  one byte in the ranges
    ("cat", (n, ...)), ("alt", (n, ...)), ("rep", n, lo, hi | None)
    ("and", a, b), ("diff", a, b)   intersection / difference (product of the two DFAs)
    ("seq", items, sep, lo, hi)      JSON object members: see :func:`seq`
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import re
import threading
try:  # Python >= 3.11
    from re import _constants as _C
    from re import _parser as _P
except ImportError:  # pragma: no cover
    import sre_constants as _C
    import sre_parse as _P
from typing import Sequence

import numpy as np

EMPTY = ("cat", ())
NOTHING = ("alt", ())
MAX_CP = 0x10FFFF


_gc_lock = threading.Lock()
_gc_pauses = 0  # builds running now (any thread) under `no_cyclic_gc`
_gc_was_enabled = False  # the collector's state when the first of them began


@contextlib.contextmanager
def no_cyclic_gc():
    """Python's cyclic garbage collector paused for the block (a build), then as it was.

    A build allocates many small containers (state sets, rows) and frees them by reference
    counting; they would trigger full collections, each a walk over every object of the
    process (tens of milliseconds next to JAX), finding nothing of the build's to collect.
    Builds on several threads (or nested) share one pause: the collector comes back, if it
    was on when the first began, when the last ends.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


class TooLarge(ValueError):
    """A size limit was crossed while building (the build stopped there)."""

    def __init__(self, what: str, limit_name: str, limit: int, detail: str = ""):
        self.limit_name, self.limit, self.detail = limit_name, limit, detail
        super().__init__(f"{what} needs more than {limit} {limit_name[4:]}{detail}")


# ----------------------------------------------------------------------------- AST helpers


def lit(b: bytes | str) -> tuple:
    return ("lit", b.encode("utf-8") if isinstance(b, str) else bytes(b))


def cat(*xs) -> tuple:
    flat = []
    for x in xs:
        if x == NOTHING:
            return NOTHING
        if x[0] == "cat":
            flat.extend(x[1])
        else:
            flat.append(x)
    return flat[0] if len(flat) == 1 else ("cat", tuple(flat))


def alt(*xs) -> tuple:
    flat, seen = [], set()
    for x in xs:
        for y in (x[1] if x[0] == "alt" else (x,)):
            if id(y) not in seen:
                seen.add(id(y))
                flat.append(y)
    return flat[0] if len(flat) == 1 else ("alt", tuple(flat))


def rep(x, lo: int, hi: int | None) -> tuple:
    if hi is not None and hi < lo:
        return NOTHING
    if x == NOTHING:
        return EMPTY if lo == 0 else NOTHING
    if hi == 0 or x == EMPTY:
        return EMPTY
    if lo == hi == 1:
        return x
    return ("rep", x, lo, hi)


def opt(x) -> tuple:
    return rep(x, 0, 1)


def cset(ranges) -> tuple:
    """One code point in ``ranges`` (merged, surrogates removed)."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    rs = []
    for lo, hi in out:  # surrogates are not characters
        if lo < 0xD800 <= hi or lo <= 0xDFFF < hi or 0xD800 <= lo <= hi <= 0xDFFF:
            if lo < 0xD800:
                rs.append((lo, 0xD7FF))
            if hi > 0xDFFF:
                rs.append((0xE000, hi))
        else:
            rs.append((lo, hi))
    return ("set", tuple(rs)) if rs else NOTHING


def complement_ranges(ranges, lo: int = 0, hi: int = MAX_CP) -> list[tuple[int, int]]:
    out, at = [], lo
    for a, b in sorted(ranges):
        if a > at:
            out.append((at, a - 1))
        at = max(at, b + 1)
    if at <= hi:
        out.append((at, hi))
    return out


def intersect_ranges(a, b) -> list[tuple[int, int]]:
    out = []
    for x0, x1 in a:
        for y0, y1 in b:
            lo, hi = max(x0, y0), min(x1, y1)
            if lo <= hi:
                out.append((lo, hi))
    return out


def det(x) -> tuple:
    """``x``, determinized on its own once and embedded as a DFA wherever it occurs.

    The language is the same; the enclosing subset construction then sees one state of
    ``x`` at a time instead of a set of its NFA states (much faster for strings, numbers
    and any-value subschemas that occur many times).
    """
    return x if x[0] in ("lit", "dfa", "det") else ("det", x)


def seq(items: Sequence[tuple[tuple, bool, bool]], sep: tuple, lo: int = 0, hi: int | None = None) -> tuple:
    """Members in order, ``sep`` between present ones, ``lo <= #present <= hi``.

    ``items`` are ``(node, required, repeat)``: a required item is always present; a
    repeat item may occur any number of times. Built as an NFA in ``O(items * phases)``
    (no quadratic regex of the "first present member" alternatives).
    """
    return ("seq", tuple(items), sep, int(lo), hi)


def size_hint(node, memo: dict | None = None) -> int:
    """NFA states the node will need (a quick upper estimate, for limits before building).

    ``memo`` (id(node) -> (node, estimate)) keeps the estimates of sub-nodes across calls,
    so that asking again for nested nodes (as every level of a build does) is linear."""
    if memo is None:
        memo = {}
    got = memo.get(id(node))
    if got is not None:
        return got[1]
    kind = node[0]
    hint = lambda x: size_hint(x, memo)  # noqa: E731
    if kind == "lit":
        n = len(node[1]) + 1
    elif kind in ("set", "bytes"):
        n = 3 * len(node[1]) + 2
    elif kind in ("cat", "alt"):
        n = sum(hint(x) for x in node[1]) + 2
    elif kind == "rep":
        _, x, lo, hi = node
        n = hint(x) * max(1, hi if hi is not None else lo + 1) + 2
    elif kind in ("and", "diff"):
        n = hint(node[1]) * hint(node[2])
    elif kind == "dfa":
        n = len(node[1][0]) + 1
    elif kind == "det":
        n = hint(node[1])
    elif kind == "seq":
        _, items, sep, lo, hi = node
        phases = (hi if hi is not None else lo) + 1
        n = phases * sum(hint(x) + hint(sep) for x, _, _ in items) + 2
    else:
        raise ValueError(kind)
    memo[id(node)] = (node, n)
    return n


# ----------------------------------------------------------------------------- UTF-8


def _utf8_split(lo: int, hi: int, out: list) -> None:
    for a, b in ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, MAX_CP)):
        x, y = max(lo, a), min(hi, b)
        if x <= y:
            _utf8_aligned(x, y, out)


def _utf8_aligned(lo: int, hi: int, out: list) -> None:
    n = len(chr(lo).encode("utf-8", "surrogatepass"))
    for i in range(1, n):
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                _utf8_aligned(lo, lo | m, out)
                _utf8_aligned((lo | m) + 1, hi, out)
                return
            if hi & m != m:
                _utf8_aligned(lo, (hi & ~m) - 1, out)
                _utf8_aligned(hi & ~m, hi, out)
                return
    a, b = chr(lo).encode("utf-8", "surrogatepass"), chr(hi).encode("utf-8", "surrogatepass")
    out.append(tuple(zip(a, b)))


@functools.lru_cache(maxsize=4096)
def _utf8_trie(ranges: tuple) -> dict:
    """The UTF-8 byte sequences of the code points in ``ranges`` as a trie of byte ranges
    (prefixes shared, to keep the NFA small): ``{(lo, hi): subtrie, None: [(lo, hi), ...]}``,
    ``None`` holding the last byte ranges. Memoised (read only): a character class occurs
    in many places of a schema."""
    seqs: list = []
    for a, b in ranges:
        _utf8_split(a, b, seqs)
    trie: dict = {}
    for sq in seqs:
        d = trie
        for r in sq[:-1]:
            d = d.setdefault(r, {})
        d.setdefault(None, []).append(sq[-1])
    return trie


# ----------------------------------------------------------------------------- NFA


#: A node built several times (a repetition, an object member at each count) is determinized
#: on its own first when its DFA has at most this many states.
_AUTO_DET_STATES = 512


class _NFA:
    """Thompson NFA: ``eps[s]`` epsilon targets; moves as flat lists (source, byte lo, byte hi, target).

    Embedded DFAs (``det``, ``dfa``, ``and``, ``diff`` nodes) are added as blocks of states
    with their moves appended in bulk (numpy runs, no per-byte Python); :meth:`moves` gives
    all moves in the order they were added.
    """

    def __init__(self, max_nfa: int, what: str, cache: dict | None = None):
        self.eps: list[list[int]] = []
        self.m_src: list[int] = []
        self.m_lo: list[int] = []
        self.m_hi: list[int] = []
        self.m_dst: list[int] = []
        self.parts: list[tuple] = []  # earlier moves as arrays (source, lo, hi, target), in order
        self.max_nfa, self.what = max_nfa, what
        self.cache = {} if cache is None else cache  # id(node) -> (node, DFA)

    def new(self) -> int:
        if len(self.eps) >= self.max_nfa:
            raise TooLarge(self.what, "max_states", self.max_nfa, " NFA states")
        self.eps.append([])
        return len(self.eps) - 1

    def block(self, k: int) -> int:
        """``k`` new states ``first .. first + k - 1``; returns ``first``."""
        if len(self.eps) + k > self.max_nfa:
            raise TooLarge(self.what, "max_states", self.max_nfa, " NFA states")
        first = len(self.eps)
        self.eps.extend(itertools.repeat((), k))  # no epsilon moves (a block's own are set as lists)
        return first

    def _flush(self) -> None:
        if self.m_src:
            self.parts.append(tuple(np.array(x, np.int64) for x in (self.m_src, self.m_lo, self.m_hi, self.m_dst)))
            self.m_src, self.m_lo, self.m_hi, self.m_dst = [], [], [], []

    def moves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every move so far as (source, byte lo, byte hi, target) arrays, in the order added."""
        self._flush()
        if not self.parts:
            e = np.zeros(0, np.int64)
            return e, e, e, e
        if len(self.parts) > 1:
            self.parts = [tuple(np.concatenate(x) for x in zip(*self.parts))]
        return self.parts[0]

    def move(self, s: int, lo: int, hi: int, t: int) -> None:
        self.m_src.append(s)
        self.m_lo.append(lo)
        self.m_hi.append(hi)
        self.m_dst.append(t)

    def build(self, node, start: int) -> int:
        """Adds ``node`` from ``start``; returns its end state."""
        kind = node[0]
        if kind == "lit":
            s = start
            for byte in node[1]:
                t = self.new()
                self.move(s, byte, byte, t)
                s = t
            return s
        if kind == "bytes":
            t = self.new()
            for a, b in node[1]:
                self.move(start, a, b, t)
            return t
        if kind == "set":
            end = self.new()
            self._trie(_utf8_trie(tuple(map(tuple, node[1]))), start, end)
            return end
        if kind == "cat":
            s = start
            for x in node[1]:
                s = self.build(x, s)
            return s
        if kind == "alt":
            end = self.new()
            for x in node[1]:
                s = self.new()
                self.eps[start].append(s)
                self.eps[self.build(x, s)].append(end)
            return end
        if kind == "rep":
            _, x, lo, hi = node
            copies = hi if hi is not None else lo + 1
            if copies >= 2:
                x = self._auto_det(x)
                got = self.cache.get(id(x[1])) if x[0] == "det" else None
                if got is not None and len(self.eps) + copies * (got[1].table.shape[0] + 2) > self.max_nfa:
                    raise TooLarge(self.what, "max_states", self.max_nfa, " NFA states")  # before building them
            s = start
            for _ in range(lo):
                s = self.build(x, s)
            if hi is None:
                loop = self.new()
                self.eps[s].append(loop)
                e = self.build(x, loop)
                self.eps[e].append(loop)
                return loop
            end = self.new()
            for _ in range(hi - lo):
                self.eps[s].append(end)
                s = self.build(x, s)
            self.eps[s].append(end)
            return end
        if kind in ("and", "diff"):
            got = self.cache.get(id(node))
            if got is None:
                got = self.cache[id(node)] = (node, self._product(node))
            return self._embed(got[1], start)
        if kind == "det":
            got = self.cache.get(id(node[1]))
            if got is None:
                d = determinize(node[1], self.cache.get("__cap__", self.max_nfa), self.what, cache=self.cache)
                got = self.cache[id(node[1])] = (node[1], d)
            return self._embed(got[1], start)
        if kind == "dfa":  # an explicit DFA: (rows of 256 targets or -1, accepting flags); row 0 = start
            got = self.cache.get(id(node))
            if got is None:
                table, accept = node[1]
                got = (node, DFA(np.asarray(table, np.int64).reshape(-1, 256), np.asarray(accept, bool)))
                self.cache[id(node)] = got
            return self._embed(got[1], start)
        if kind == "seq":
            return self._seq(node, start)
        raise ValueError(f"unknown node {kind!r}")

    def _auto_det(self, x):
        """``det(x)`` for a node built several times (its DFA is embedded each time, so the enclosing
        subset construction sees one state of it at a time); ``x`` itself where that DFA needs more
        than ``_AUTO_DET_STATES`` states or more than the NFA of ``x`` (embedding it at each use would
        grow the NFA), or where that NFA is large (not tried)."""
        if x[0] in ("lit", "bytes", "set", "det", "dfa"):
            return x
        got = self.cache.get(("auto", id(x)))
        if got is None:
            try:  # (a failed attempt's work still counts towards the build's bound)
                hint = size_hint(x, self.cache.setdefault("__size__", {}))
                if hint > 32 * _AUTO_DET_STATES:  # its own NFA alone would be slow to build twice
                    raise TooLarge(self.what, "max_states", hint, " NFA states")
                if id(x) not in self.cache:
                    cap = min(_AUTO_DET_STATES, hint, self.cache.get("__cap__", self.max_nfa))
                    d = determinize(x, cap, self.what, cache=self.cache)
                    self.cache[id(x)] = (x, d)
                got = (x, ("det", x))
            except TooLarge:
                got = (x, x)
            self.cache[("auto", id(x))] = got
        return got[1]

    def _embed(self, d: "DFA", start: int) -> int:
        """The DFA's states as a block of NFA states (its state 0 is ``start``); returns the end state."""
        src, lo, hi, dst, n, accepting = d.runs()
        first = self.block(n)  # its own start too: ``start`` may have other moves, and the DFA may return to 0
        end = self.new()
        self.eps[start].append(first)
        self._flush()
        self.parts.append((src + first, lo, hi, dst + first))
        eps = self.eps
        for k in accepting:
            eps[first + k] = [end]
        return end

    def _trie(self, trie: dict, s: int, end: int) -> None:
        for r, sub in trie.items():
            if r is None:
                for a, b in sub:
                    self.move(s, a, b, end)
            else:
                t = self.new()
                self.move(s, r[0], r[1], t)
                self._trie(sub, t, end)

    def _seq(self, node, start: int) -> int:
        _, items, sep, lo, hi = node
        top = hi if hi is not None else max(lo, 1)  # without hi, phase top absorbs (>= 1: a member was written)

        def clamp(c: int) -> int:
            return c if hi is not None else min(c, top)

        cur = {0: start}  # count of members written so far -> state
        for x, required, repeat in items:
            nxt: dict[int, int] = {}

            def state(c: int) -> int:
                if c not in nxt:
                    nxt[c] = self.new()
                return nxt[c]

            arcs = []  # (count, from state, to state): one member written
            if repeat:
                for c, s in cur.items():
                    self.eps[s].append(state(c))
                for c in range(top + 1):
                    if c not in nxt or (hi is not None and c + 1 > hi):
                        continue
                    arcs.append((c, nxt[c], state(clamp(c + 1))))
            else:
                for c, s in list(cur.items()):
                    if not required:
                        self.eps[s].append(state(c))
                    if hi is not None and c + 1 > hi:
                        continue
                    arcs.append((c, s, state(clamp(c + 1))))
            by_target: dict[int, list] = {}
            for c, s, t in arcs:
                by_target.setdefault(t, []).append((c, s))
            if len(by_target) > 1:  # built once per target: one DFA, embedded each time
                x = self._auto_det(x)
            for t, srcs in by_target.items():
                if len(srcs) == 1:
                    c, s = srcs[0]
                    self.eps[self.build(x if c == 0 else cat(sep, x), s)].append(t)
                    continue
                # counts that lead to the same state share one copy of the member after a join
                join = self.new()
                for c, s in srcs:
                    self.eps[s if c == 0 else self.build(sep, s)].append(join)
                self.eps[self.build(x, join)].append(t)
            cur = nxt
        end = self.new()
        for c, s in cur.items():
            if c >= lo:
                self.eps[s].append(end)
        return end

    def _product(self, node) -> "DFA":
        """The intersection / difference of two DFAs (a breadth-first product, one numpy step per level)."""
        kind, a, b = node
        cap = self.cache.get("__cap__", self.max_nfa)
        da = determinize(a, cap, self.what, cache=self.cache)
        db = determinize(b, cap, self.what, cache=self.cache)
        nb = db.table.shape[0]
        dead_b = nb  # b's dead state as a real sink row (a diff continues through it)
        tb = np.vstack([db.table, np.full((1, 256), -1, db.table.dtype)])
        tb = np.where(tb < 0, dead_b, tb)
        acc_b = np.append(db.accept, False)
        # byte classes that neither DFA tells apart
        _, first, cls = np.unique(np.vstack([da.table, tb]), axis=1, return_index=True, return_inverse=True)
        cls = cls.reshape(-1)
        ta_c, tb_c = da.table[:, first], tb[:, first]
        ids = {0: 0}  # key sa * (nb + 1) + sb -> product state
        pa, pb = [0], [0]
        rows: list[np.ndarray] = []
        lo = 0
        while lo < len(pa):
            fa, fb = np.array(pa[lo:]), np.array(pb[lo:])
            lo = len(pa)
            x, y = ta_c[fa], tb_c[fb]
            ok = x >= 0
            if kind == "and":
                ok &= y != dead_b
            key = np.where(ok, x * (nb + 1) + y, -1)
            for k in np.unique(key[ok]).tolist():
                if k not in ids:
                    if len(pa) >= cap:
                        raise TooLarge(self.what, "max_states", cap, " product states")
                    ids[k] = len(pa)
                    pa.append(k // (nb + 1))
                    pb.append(k % (nb + 1))
            u, inv = np.unique(key, return_inverse=True)
            m = np.array([ids.get(k, -1) for k in u.tolist()], np.int64)
            rows.append(m[inv.reshape(key.shape)])
        table_c = np.concatenate(rows)
        pa_, pb_ = np.array(pa), np.array(pb)
        accept = da.accept[pa_] & (acc_b[pb_] if kind == "and" else ~acc_b[pb_])
        return _finish(table_c, cls, accept)


def _table_runs(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A DFA table's (state, byte lo, byte hi, target) runs of equal live targets (vectorised)."""
    t = np.asarray(table, np.int64)
    n = t.shape[0]
    if n == 0:
        e = np.zeros(0, np.int64)
        return e, e, e, e
    start = np.ones((n, 256), bool)
    start[:, 1:] = t[:, 1:] != t[:, :-1]
    s, lo = np.nonzero(start)  # row-major: runs in order
    flat = s * 256 + lo
    hi = np.append(flat[1:], n * 256) - 1
    hi = np.minimum(hi, s * 256 + 255) - s * 256
    tgt = t[s, lo]
    keep = tgt >= 0
    return s[keep], lo[keep], hi[keep], tgt[keep]


def _row_runs(row) -> list[tuple[int, int, int]]:
    """One state's 256 targets (-1: dead) as (byte lo, byte hi, target) runs."""
    _, lo, hi, t = _table_runs(np.asarray(row).reshape(1, 256))
    return list(zip(lo.tolist(), hi.tolist(), t.tolist()))


class DFA:
    """``table[s, byte]`` next state (-1: dead), ``accept[s]``; state 0 is the start."""

    def __init__(self, table: np.ndarray, accept: np.ndarray):
        self.table, self.accept = table, accept
        self._runs = None

    def runs(self) -> tuple:
        """(state, byte lo, byte hi, target) runs as int64 arrays, states, accepting states (a list; computed once)."""
        if self._runs is None:
            s, lo, hi, t = _table_runs(self.table)
            self._runs = (s, lo, hi, t, self.table.shape[0], np.nonzero(self.accept)[0].tolist())
        return self._runs


def determinize(node, max_states: int, what: str, max_nfa: int | None = None, cache: dict | None = None) -> DFA:
    """The minimal DFA of ``node`` (subset construction, trimmed to states that can still accept).

    The subset construction runs over byte classes (bytes no move of the NFA tells apart):
    each NFA state's row (class -> closure of its targets) is computed once (one numpy
    matrix), a DFA state that is one NFA state (the common case, inside embedded DFAs) or has
    one member with moves takes that row as it is, and the sets of several movers found since
    the last batch get their rows in one numpy reduction (unions interned only where two
    members' targets clash). The result is trimmed and minimised (:func:`_minimize`).
    Sub-DFAs (``det`` nodes, products, sub-nodes built several times) are built once per
    build and kept across builds (:data:`_SHARED`).

    Raises:
      TooLarge: more than ``max_states`` DFA states (checked as each state is created).
    """
    nested = cache is not None
    if cache is None:  # the outermost build: its bound also caps the nested ones, and all their work
        cache = {"__cap__": max_states, "__work__": [0, 3 * max_states]}
    work = cache["__work__"]
    key = None
    if nested:
        try:
            key, hit = node, _SHARED.get(node)
        except TypeError:  # an explicit DFA (lists) inside: not shared
            key = hit = None
        if hit is not None:  # the same bounds as building it: its subset states and its work
            d, states, spent = hit
            if states > max_states:
                raise TooLarge(what, "max_states", max_states, " DFA states")
            work[0] += spent
            if work[0] > work[1]:
                raise TooLarge(what, "max_states", max_states, " DFA states")
            return d
    spent0 = work[0]
    nfa = _NFA(max_nfa or max(4 * max_states, 1 << 20), what, cache)
    s0 = nfa.new()
    final = nfa.build(node, s0)
    eps = nfa.eps
    m_src, m_lo, m_hi, m_dst = nfa.moves()
    # byte classes: bytes that every move treats alike
    cuts = np.zeros(257, bool)
    cuts[0] = True
    cuts[m_lo] = True
    cuts[m_hi + 1] = True
    cls = np.cumsum(cuts[:256]) - 1
    ncls = int(cls[-1]) + 1
    # important states: with a move, or the final one
    movers, mover_of_move = np.unique(m_src, return_inverse=True)
    important = set(movers.tolist())
    important.add(final)

    sets: list[frozenset] = []  # interned sets of important NFA states
    sid_of: dict[frozenset, int] = {}

    def intern(fs: frozenset) -> int:
        j = sid_of.get(fs)
        if j is None:
            j = sid_of[fs] = len(sets)
            sets.append(fs)
        return j

    clos: dict[int, int] = {}  # NFA state -> set id of its closure

    def closure_id(s0: int) -> int:
        j = clos.get(s0)
        if j is None:
            if not eps[s0]:
                fs = frozenset((s0,)) if s0 in important else frozenset()
            else:
                seen = {s0}
                stack = [s0]
                while stack:
                    for t in eps[stack.pop()]:
                        if t not in seen:
                            seen.add(t)
                            stack.append(t)
                fs = frozenset(seen & important)
            j = clos[s0] = intern(fs)
        return j

    rows_c, row_list = _rows(movers, mover_of_move, cls[m_lo], cls[m_hi], m_dst, ncls,
                             closure_id, intern, sets)
    index_of = dict(zip(movers.tolist(), range(movers.size)))  # a moving NFA state -> its row
    none_index = movers.size  # the last row: no moves

    union_of: dict[frozenset, int] = {}  # set ids -> the set id of their union
    blocks: list[np.ndarray] = [rows_c]  # rows_c, then the rows of the sets of several movers
    n_rows = [rows_c.shape[0]]

    def union_rows(batch: list[list]) -> np.ndarray:
        """The rows of sets of several moving NFA states (each given by its members' row indices),
        all at once: per class, the union of the members' targets there (the one target where
        the other members have none, as rows are mostly disjoint; an interned union where two
        members reach different sets, set by set and in class order)."""
        sizes = np.array([len(ks) for ks in batch])
        starts = np.cumsum(sizes) - sizes
        m = rows_c[np.concatenate(batch)]
        live = m >= 0
        r = np.maximum.reduceat(m, starts, axis=0)
        many = np.add.reduceat(live.astype(np.int32), starts, axis=0) > 1
        if many.any():
            low = np.minimum.reduceat(np.where(live, m, np.iinfo(np.int64).max), starts, axis=0)
            at, cs = np.nonzero(many & (low != r))
            for b, c in zip(at.tolist(), cs.tolist()):
                ids = frozenset(m[starts[b]:starts[b] + sizes[b], c].tolist()) - {-1}
                j = union_of.get(ids)
                if j is None:
                    j = union_of[ids] = intern(frozenset().union(*(sets[i] for i in ids)))
                r[b, c] = j
        return r

    start = closure_id(s0)
    dfa_of: dict[int, int] = {start: 0}  # set id -> DFA state
    order = [start]
    row_index: list[int] = []  # per DFA state: its row (rows_c, then the unions' rows)

    def find_rows() -> None:
        """The rows of the DFA states found since the last call (the unions in one batch)."""
        batch, at = [], []
        for p in range(len(row_index), len(order)):
            fs = sets[order[p]]
            if len(fs) == 1:
                k = index_of.get(next(iter(fs)), none_index)
            else:
                ks = [index_of[s] for s in fs if s in index_of]
                k = ks[0] if len(ks) == 1 else none_index if not ks else -1
                if k < 0:
                    at.append(p)
                    batch.append(ks)
            row_index.append(k)
        if batch:
            r = union_rows(batch)
            for p, k in zip(at, range(n_rows[0], n_rows[0] + len(at))):
                row_index[p] = k
            n_rows[0] += len(at)
            blocks.append(r)
            row_list.extend(r.tolist())

    i = 0
    while i < len(order):
        if i == len(row_index):
            find_rows()
        r = row_list[row_index[i]]
        i += 1
        for j in set(r):
            if j >= 0 and j not in dfa_of:
                work[0] += 1
                if len(order) >= max_states or work[0] > work[1]:
                    raise TooLarge(what, "max_states", max_states, " DFA states")
                dfa_of[j] = len(order)
                order.append(j)
    to_dfa = np.full(len(sets) + 1, -1, np.int64)
    to_dfa[np.array(order, np.int64)] = np.arange(len(order))
    all_rows = np.concatenate(blocks) if len(blocks) > 1 else rows_c
    table_c = to_dfa[all_rows[np.array(row_index, np.int64)]]
    accept = np.array([final in sets[j] for j in order], bool)
    d = _finish(table_c, cls, accept)
    if key is not None and d.table.shape[0] <= _SHARED_STATES // 8:
        _share(key, d, len(order), work[0] - spent0)
    return d


def _rows(movers, mover_of_move, lo_c, hi_c, dst, ncls: int, closure_id, intern, sets) -> tuple[np.ndarray, list]:
    """Each moving NFA state's row in class space, all at once (numpy): class -> the set id of
    the closure of its targets there (-1: none; several targets: the union of their closures).

    Args:
      movers: the states with a move, sorted; mover_of_move: each move's index in ``movers``.
      lo_c, hi_c, dst: each move's class range and target.

    Returns:
      The rows (``int64[movers + 1, ncls]``, in the order of ``movers``, then a row of -1 for
      the states without moves) and the same as lists.
    """
    if movers.size == 0:
        rows = np.full((1, ncls), -1, np.int64)
        return rows, rows.tolist()
    targets, target_of_move = np.unique(dst, return_inverse=True)
    move_j = np.array([closure_id(t) for t in targets.tolist()], np.int64)[target_of_move]
    width = hi_c - lo_c + 1
    first = np.cumsum(width) - width
    cell = (np.repeat(mover_of_move * ncls + lo_c - first, width) + np.arange(int(width.sum())))  # row * ncls + class
    cell_j = np.repeat(move_j, width)
    flat = np.full((movers.size + 1) * ncls, -1, np.int64)
    flat[cell] = cell_j
    clash = flat[cell] != cell_j  # a class several moves reach, with different closures
    if clash.any():
        bad = np.unique(cell[clash])
        hit = np.isin(cell, bad)
        c, j = cell[hit], cell_j[hit]
        order = np.argsort(c, kind="stable")
        c, j = c[order], j[order]
        cuts = np.flatnonzero(np.diff(c)) + 1
        for key, js in zip(c[np.r_[0, cuts]].tolist(), np.split(j, cuts)):
            flat[key] = intern(frozenset().union(*(sets[i] for i in set(js.tolist()))))
    rows = flat.reshape(movers.size + 1, ncls)
    return rows, rows.tolist()


#: Sub-DFAs kept across builds (key: the node) with the subset states and work they took; at
#: most ``_SHARED_STATES`` states in all (the oldest go first).
_SHARED: dict = {}
_SHARED_STATES = 1 << 15
_shared_size = [0]
_shared_lock = threading.Lock()  # builds may run in several threads; a lookup needs no lock


def _share(key, d: DFA, states: int, spent: int) -> None:
    d = DFA(d.table.astype(np.int32), d.accept)
    with _shared_lock:
        old = _SHARED.pop(key, None)  # built twice (two threads): counted once
        if old is not None:
            _shared_size[0] -= old[0].table.shape[0]
        _SHARED[key] = (d, states, spent)
        _shared_size[0] += d.table.shape[0]
        while _shared_size[0] > _SHARED_STATES:
            old = _SHARED.pop(next(iter(_SHARED)))
            _shared_size[0] -= old[0].table.shape[0]


def _finish(table_c: np.ndarray, cls: np.ndarray, accept: np.ndarray) -> DFA:
    """A DFA over byte classes (``cls[byte]``), trimmed and minimised, as a 256-column DFA."""
    d = _minimize(_trim_dfa(DFA(table_c, accept)))
    return DFA(d.table[:, cls], d.accept)


#: Moore's refinement stops after this many rounds (the DFA is then kept unminimised: a long
#: chain, such as a string of bounded length, is nearly minimal already). The large object
#: schemas of MaskBench need up to about 90 (their members' DFAs are no longer minimised one
#: level at a time, see ``_NFA._seq``).
_MOORE_ROUNDS = 128


def _minimize(d: DFA) -> DFA:
    """The minimal DFA of a trimmed DFA over any columns (Moore's refinement, vectorised; 0 stays the start).

    Blocks are refined by a 64-bit hash of (block, successor blocks per byte class) until
    their number stops growing; the final partition is then checked to be a congruence
    (same acceptance, same successor blocks), so a hash collision can never merge states
    that differ: if the check fails the refinement is redone with exact row comparison.
    """
    t = d.table
    n = t.shape[0]
    if n <= 1:
        return d
    tc = t[:, _distinct_columns(t)]
    k = tc.shape[1]
    dead = tc < 0
    mult = _random_weights(0x5EED, 2**63 - 1, k + 1) | np.uint64(1)

    live = np.maximum(tc, 0)

    e_src, e_col = np.nonzero(~dead)  # by state, then class
    e_dst = tc[e_src, e_col]
    e_w = mult[1 + e_col]
    # the transitions from one state to one other as one edge, weighted by the sum of their
    # classes' weights (the same hash, mod 2**64, over far fewer edges)
    if e_src.size:
        pair = e_src * n + e_dst
        by_pair = np.argsort(pair, kind="stable")
        pair = pair[by_pair]
        first = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
        e_src, e_dst = e_src[by_pair[first]], e_dst[by_pair[first]]
        with np.errstate(over="ignore"):
            e_w = np.add.reduceat(e_w[by_pair], first)
    # every state's edges from e_first[state] on (a state without any: one edge of weight 0)
    e_first = np.searchsorted(e_src, np.arange(n))
    bare = np.flatnonzero(e_first == np.append(e_first[1:], e_src.size))
    if bare.size:
        at = e_first[bare]
        e_dst = np.insert(e_dst, at, 0)
        e_w = np.insert(e_w, at, np.uint64(0))
        e_first = e_first + np.searchsorted(bare, np.arange(n))  # shifted by the dummies before

    def refine(exact: bool) -> np.ndarray | None:
        blk = d.accept.astype(np.int64)
        nb = int(np.unique(blk).size)
        for _ in range(_MOORE_ROUNDS if not exact else n + 1):
            if exact:
                succ = np.where(dead, -1, blk[live])
                _, new = np.unique(np.column_stack([blk, succ]), axis=0, return_inverse=True)
            else:  # over the live transitions only (a DFA row has few of them)
                with np.errstate(over="ignore"):
                    h = (blk.astype(np.uint64) + np.uint64(1)) * mult[0]
                    h += np.add.reduceat(e_w * (blk[e_dst] + 2).astype(np.uint64), e_first)
                _, new = np.unique(h, return_inverse=True)
            new = new.reshape(-1)
            m = int(new.max()) + 1
            if m == nb:
                return new
            blk, nb = new, m
        return None

    blk = refine(False)
    if blk is None:  # distinguishing words longer than _MOORE_ROUNDS (a long chain): left as it is
        return d
    nb = int(blk.max()) + 1
    rep = np.full(nb, n, np.int64)
    np.minimum.at(rep, blk, np.arange(n))
    succ = np.where(dead, -1, blk[np.maximum(tc, 0)])
    if not ((succ == succ[rep[blk]]).all() and (d.accept == d.accept[rep[blk]]).all()):
        blk = refine(True)  # pragma: no cover - a 64-bit hash collision
        nb = int(blk.max()) + 1
        rep = np.full(nb, n, np.int64)
        np.minimum.at(rep, blk, np.arange(n))
    if nb == n:
        return d
    rank = np.empty(nb, np.int64)  # blocks numbered by their first state (the start's block is 0)
    rank[np.argsort(rep, kind="stable")] = np.arange(nb)
    reps = np.sort(rep)
    rows = t[reps]
    table = np.where(rows < 0, -1, rank[blk[np.maximum(rows, 0)]])
    return DFA(table, d.accept[reps])


_WEIGHTS: dict = {}  # (seed, high) -> the longest run of weights drawn so far


def _random_weights(seed: int, high: int, n: int) -> np.ndarray:
    """The first ``n`` of ``np.random.default_rng(seed).integers(1, high)`` as uint64 (a prefix of
    a longer draw is the same numbers: one run per seed, drawn again longer when needed)."""
    got = _WEIGHTS.get((seed, high))
    if got is None or got.size < n:
        got = np.random.default_rng(seed).integers(1, high, size=max(n, 1024), dtype=np.int64).astype(np.uint64)
        _WEIGHTS[(seed, high)] = got
    return got[:n]


def _distinct_columns(t: np.ndarray) -> np.ndarray:
    """Indices of the distinct columns of ``t`` (the first of each), by a hash checked exactly."""
    w = _random_weights(0xC0105, 2**62, t.shape[0])
    with np.errstate(over="ignore"):
        h = ((t.astype(np.int64) + 2).astype(np.uint64) * w[:, None]).sum(axis=0, dtype=np.uint64)
    _, first, inv = np.unique(h, return_index=True, return_inverse=True)
    if (t[:, first[inv.reshape(-1)]] == t).all():
        return np.sort(first)
    return np.sort(np.unique(t, axis=1, return_index=True)[1])  # pragma: no cover - a hash collision


def _trim_dfa(d: DFA) -> DFA:
    """Dead (cannot accept) states become -1 (linear reverse search)."""
    n = d.table.shape[0]
    src, byte = np.nonzero(d.table >= 0)
    dst = d.table[src, byte]
    live = _co_reachable(src, dst, np.nonzero(d.accept)[0], n)
    table = np.where((d.table >= 0) & live[np.maximum(d.table, 0)], d.table, -1)
    table[~live] = -1
    return DFA(table, d.accept & live)


def _reach(src: np.ndarray, dst: np.ndarray, seeds, n: int) -> tuple[np.ndarray, list[int]]:
    """States reachable from ``seeds`` along edges src -> dst: (mask, BFS order).

    One pass over a CSR adjacency (``O(states + edges)``; for large graphs in C through
    scipy's ``breadth_first_order`` where scipy is installed, as it is with JAX).
    """
    src = np.asarray(src, np.int64)
    dst = np.asarray(dst, np.int64)
    order_e = _sorting_order(src)
    if order_e is not None:
        src, dst = src[order_e], dst[order_e]
    seeds = [int(g) for g in seeds]
    if _bfs_order is not None and src.size > _SCIPY_EDGES:
        # a virtual source n (after every state) pointing at the seeds, then scipy's BFS (edges
        # visited in CSR order)
        s2 = np.concatenate([src, np.full(len(seeds), n, np.int64)])
        d2 = np.concatenate([dst, np.array(seeds, np.int64)])
        indptr = np.searchsorted(s2, np.arange(n + 2))
        g = _csr_matrix((np.ones(s2.size, np.int8), d2, indptr), shape=(n + 1, n + 1))
        got = _bfs_order(g, n, directed=True, return_predecessors=False)[1:]
        seen = np.zeros(n, bool)
        seen[got] = True
        return seen, got.tolist()
    nbr = dst.tolist()
    starts = np.searchsorted(src, np.arange(n + 1)).tolist()
    seen = bytearray(n)
    order = []
    for g in seeds:
        if not seen[g]:
            seen[g] = 1
            order.append(g)
    i = 0
    while i < len(order):
        s = order[i]
        i += 1
        for t in nbr[starts[s]:starts[s + 1]]:
            if not seen[t]:
                seen[t] = 1
                order.append(t)
    return np.frombuffer(bytes(seen), np.uint8).astype(bool), order


def _sorting_order(key: np.ndarray) -> np.ndarray | None:
    """A stable sorting permutation of ``key``; None where it is sorted already (one pass to check)."""
    if key.size < 2 or bool((key[1:] >= key[:-1]).all()):
        return None
    return np.argsort(key, kind="stable")


_SCIPY_EDGES = 1 << 14  # below this many edges the Python BFS is faster than scipy's setup

try:  # scipy comes with JAX; without it the BFS above runs in Python
    from scipy.sparse import csr_matrix as _csr_matrix
    from scipy.sparse.csgraph import breadth_first_order as _bfs_order
except ImportError:  # pragma: no cover
    _csr_matrix = _bfs_order = None


def _co_reachable(src: np.ndarray, dst: np.ndarray, goals: np.ndarray, n: int) -> np.ndarray:
    """States from which a goal is reachable (a reverse search, linear in states + edges).

    Large graphs go to scipy unsorted (its COO -> CSR conversion orders the reversed edges in
    linear time, in C), with a virtual source n pointing at the goals."""
    if _bfs_order is None or np.size(src) <= _SCIPY_EDGES:
        return _reach(np.asarray(dst, np.int64), np.asarray(src, np.int64), goals, n)[0]
    goals = np.asarray(goals, np.int64).reshape(-1)
    rows = np.concatenate([np.asarray(dst, np.int64), np.full(goals.size, n, np.int64)])
    cols = np.concatenate([np.asarray(src, np.int64), goals])
    # int32 weights: duplicate edges are summed, and a sum must not wrap to an explicit zero
    g = _csr_matrix((np.ones(rows.size, np.int32), (rows, cols)), shape=(n + 1, n + 1))
    live = np.zeros(n + 1, bool)
    live[_bfs_order(g, n, directed=True, return_predecessors=False)] = True
    return live[:n]


# ----------------------------------------------------------------------------- tokens


class TokenTrie:
    """A vocabulary's token bytes as a trie in BFS order (for walking all tokens at once)."""

    def __init__(self, pieces: Sequence[bytes | None], eos_id: int, size: int):
        nodes_parent = [-1]
        nodes_byte = [0]
        children: list[dict[int, int]] = [{}]
        ends: list[list[int]] = [[]]
        for i, b in enumerate(pieces[:size]):
            if not b or i == eos_id:
                continue
            n = 0
            for byte in b:
                nxt = children[n].get(byte)
                if nxt is None:
                    nxt = len(nodes_parent)
                    children[n][byte] = nxt
                    nodes_parent.append(n)
                    nodes_byte.append(byte)
                    children.append({})
                    ends.append([])
                n = nxt
            ends[n].append(i)
        # renumber in BFS order so that parents come before children, by level
        order = [0]
        k = 0
        while k < len(order):
            for byte in sorted(children[order[k]]):
                order.append(children[order[k]][byte])
            k += 1
        pos = np.empty(len(order), np.int64)
        pos[np.array(order)] = np.arange(len(order))
        self.parent = np.array([pos[nodes_parent[o]] if o else -1 for o in order], np.int64)
        self.byte = np.array([nodes_byte[o] for o in order], np.int64)
        depth = np.zeros(len(order), np.int64)
        for k in range(1, len(order)):
            depth[k] = depth[self.parent[k]] + 1
        self.levels = [np.nonzero(depth == d)[0] for d in range(1, int(depth.max()) + 1 if len(order) > 1 else 1)]
        tok_node, tok_id = [], []
        for o_new, o in enumerate(order):
            for t in ends[o]:
                tok_node.append(o_new)
                tok_id.append(t)
        self.tok_node = np.array(tok_node, np.int64)
        self.tok_id = np.array(tok_id, np.int64)
        self.n = len(order)
        self._csr = None

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per node: its children ``[lo, hi)`` (contiguous in BFS order) and its tokens ``[lo, hi)``."""
        if self._csr is None:
            nodes = np.arange(self.n)
            par = self.parent[1:]  # non-decreasing in BFS order
            self._csr = (np.searchsorted(par, nodes) + 1, np.searchsorted(par, nodes, "right") + 1,
                         np.searchsorted(self.tok_node, nodes), np.searchsorted(self.tok_node, nodes, "right"))
        return self._csr


def _expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges ``[lo[i], hi[i])``: (i, j) for every j in range i, as two flat arrays."""
    cnt = hi - lo
    tot = int(cnt.sum())
    if tot == cnt.size and bool((cnt == 1).all()):  # one each (a token per trie node, say)
        return np.arange(cnt.size), lo
    r = np.repeat(np.arange(cnt.size), cnt)
    return r, np.repeat(lo - np.cumsum(cnt) + cnt, cnt) + np.arange(tot)


def token_automaton(d: DFA, trie: TokenTrie, max_states: int, max_transitions: int, what: str):
    """The token-level automaton reachable from the DFA's start: (states, src, tok, dst, accept).

    Every DFA state walks the trie at once (chunks of states, one numpy step per trie level:
    the first level as one dense gather of the states' rows at the first bytes, the deeper ones
    over the live (state, trie node) pairs only: a pair whose byte is dead is not expanded);
    then the states reachable from the start at token boundaries are kept, numbered in BFS
    order (0 = the start). Stops with :class:`TooLarge` past either limit.
    """
    table = d.table.astype(np.int32)
    n_dfa = table.shape[0]
    child_lo, child_hi, tok_lo, tok_hi = trie.csr()
    chunk = max(1, (1 << 21) // max(trie.n, 1))
    srcs, toks, dsts = [], [], []
    total = 0
    first_lo, first_hi = int(child_lo[0]), int(child_hi[0])  # the root's children: the first bytes
    first_byte = trie.byte[first_lo:first_hi]
    n_first = first_hi - first_lo
    every_byte = n_first == 256  # (sorted) then the table's columns are the first level as they are
    for c0 in range(0, n_dfa, chunk):
        # the first level densely (every state of the chunk by every first byte), then the
        # live (state, trie node) pairs level by level
        q_first = (table[c0:c0 + chunk] if every_byte else table[c0:c0 + chunk][:, first_byte]).reshape(-1)
        pair = np.flatnonzero(q_first >= 0)
        q = q_first[pair]
        s, node = np.divmod(pair, n_first)
        s += c0
        node += first_lo
        depth = 1
        while s.size:
            r, k = _expand(tok_lo[node], tok_hi[node])
            if r.size:
                total += r.size
                if total > max_transitions * 4:
                    raise TooLarge(what, "max_transitions", max_transitions, " token transitions")
                srcs.append(s[r])
                toks.append(k)
                dsts.append(q[r])
            if depth == len(trie.levels):  # the deepest level: no children
                break
            depth += 1
            r, child = _expand(child_lo[node], child_hi[node])
            if not r.size:
                break
            q2 = table[q[r], trie.byte[child]]
            ok = q2 >= 0
            s, node, q = s[r[ok]], child[ok], q2[ok]
    if not srcs:
        srcs, toks, dsts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
    src, k, dst = np.concatenate(srcs), np.concatenate(toks), np.concatenate(dsts)
    o = _sorting_order(src * max(trie.tok_id.size, 1) + k)  # by state, then the trie's token order
    if o is not None:
        src, k, dst = src[o], k[o], dst[o]
    tok = trie.tok_id[k].astype(np.int32)
    # the states reachable from the start at token boundaries, in BFS order
    seen, order = _reach(src.astype(np.int64), dst.astype(np.int64), [0], n_dfa)
    if len(order) > max_states:
        raise TooLarge(what, "max_states", max_states, " token-level states")
    order = np.array(order, np.int64)
    local = np.full(n_dfa, -1, np.int64)
    local[order] = np.arange(order.size)
    keep = seen[src]
    if int(keep.sum()) > max_transitions:
        raise TooLarge(what, "max_transitions", max_transitions, " token transitions")
    return (order.size, local[src[keep]], tok[keep].astype(np.int64), local[dst[keep]], d.accept[order])


# ----------------------------------------------------------------------------- regex syntax


_UNICODE_CATS: dict[str, list[tuple[int, int]]] = {}
_ALL_CHARS: str | None = None


def _unicode_category(name: str) -> list[tuple[int, int]]:
    """Code points Python's ``re`` puts in ``\\d`` / ``\\w`` / ``\\s`` (computed once)."""
    if name not in _UNICODE_CATS:
        global _ALL_CHARS
        if _ALL_CHARS is None:  # every code point but the surrogates, in order
            _ALL_CHARS = "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, MAX_CP + 1)))
        pat = re.compile({"digit": r"\d+", "word": r"\w+", "space": r"\s+"}[name])
        gap = 0xE000 - 0xD800  # string index -> code point past the surrogates
        ranges = []
        for m in pat.finditer(_ALL_CHARS):  # runs of members, found by re itself
            a, b = m.start(), m.end() - 1
            if a < 0xD800 <= b:  # a run across the surrogate gap is two ranges
                ranges += [(a, 0xD7FF), (0xE000, b + gap)]
            else:
                ranges.append((a if a < 0xD800 else a + gap, b if b < 0xD800 else b + gap))
        _UNICODE_CATS[name] = ranges
    return _UNICODE_CATS[name]


_ASCII_CATS = {
    _C.CATEGORY_DIGIT: [(48, 57)],
    _C.CATEGORY_WORD: [(48, 57), (65, 90), (95, 95), (97, 122)],
    _C.CATEGORY_SPACE: [(9, 13), (32, 32)],
}
_NOT_CATS = {_C.CATEGORY_NOT_DIGIT: "digit", _C.CATEGORY_NOT_WORD: "word", _C.CATEGORY_NOT_SPACE: "space"}


class RegexError(ValueError):
    pass


def _class_ranges(items) -> list[tuple[int, int]]:
    """The code points of one ``[...]`` (or a category)."""
    out: list[tuple[int, int]] = []
    negate = False
    for op, av in items:
        if op is _C.NEGATE:
            negate = True
        elif op is _C.LITERAL:
            out.append((av, av))
        elif op is _C.RANGE:
            out.append(av)
        elif op is _C.CATEGORY:
            out.extend(_category(av))
        else:
            raise RegexError(f"unsupported class item {op}")
    return complement_ranges(out) if negate else out


def _category(av) -> list[tuple[int, int]]:
    # positive classes: the ASCII members (a subset under Python's and ECMA-262's rules);
    # negated ones: the complement of Python's Unicode class (a subset under both)
    if av in _ASCII_CATS:
        return _ASCII_CATS[av]
    if av in _NOT_CATS:
        return complement_ranges(_unicode_category(_NOT_CATS[av]))
    raise RegexError(f"unsupported category {av}")


def top_alternatives(p: str) -> list[str]:
    """``p`` split at its top-level ``|`` (outside groups, classes and escapes)."""
    out, depth, cls, i, begin, cls_start = [], 0, False, 0, 0, 0
    while i < len(p):
        c = p[i]
        if c == "\\":
            i += 2
            continue
        if cls:
            cls = c != "]" or i == cls_start  # a "]" first in a class is a member
        elif c == "[":
            cls, cls_start = True, i + 1 + (p[i + 1:i + 2] == "^")
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            out.append(p[begin:i])
            begin = i + 1
        i += 1
    return out + [p[begin:]]


def parse_regex(pattern: str, *, search: bool = False, char=None, max_repeat: int = 1 << 16) -> tuple:
    """A Python ``re`` pattern as an AST node.

    Args:
      pattern: the regular expression.
      search: JSON Schema ``pattern`` semantics (the pattern may match anywhere unless
        anchored by ``^`` / ``$`` at the ends of a top-level alternative); otherwise the
        whole text must match (``^`` / ``$`` allowed only there).
      char: maps a tuple of code-point ranges to the node spelling one such character
        (default: its UTF-8 bytes; JSON strings pass the escaping spelling).
      max_repeat: the largest ``{n}`` accepted.

    Each top-level alternative is read on its own (the same language), so that anchored
    alternatives such as ``^a$|^b$`` work (Python's parser moves a shared ``^`` out of them).

    Raises:
      RegexError: syntax errors and constructs that are not regular (look-around,
        back-references) or not supported (flags).
    """
    alternatives = top_alternatives(pattern)
    if len(alternatives) > 1:
        return alt(*(parse_regex(a, search=search, char=char, max_repeat=max_repeat) for a in alternatives))
    char = char or cset
    try:
        tree = _P.parse(pattern)
    except re.error as e:
        raise RegexError(f"invalid regular expression: {e}") from None
    if tree.state.flags & ~(_C.SRE_FLAG_UNICODE):
        raise RegexError("inline flags such as (?i) are not supported")
    any_char = char(complement_ranges([(10, 10)]))

    def conv(items) -> tuple:
        parts = []
        for op, av in items:
            if op is _C.LITERAL:
                parts.append(char([(av, av)]))
            elif op is _C.NOT_LITERAL:
                parts.append(char(complement_ranges([(av, av)])))
            elif op is _C.ANY:
                parts.append(any_char)
            elif op is _C.IN:
                parts.append(char(_class_ranges(av)))
            elif op is _C.BRANCH:
                parts.append(alt(*(conv(b) for b in av[1])))
            elif op is _C.SUBPATTERN:
                _, add, rem, sub = av
                if add or rem:
                    raise RegexError("inline flags such as (?i:...) are not supported")
                parts.append(conv(sub))
            elif op in (_C.MAX_REPEAT, _C.MIN_REPEAT, getattr(_C, "POSSESSIVE_REPEAT", None)):
                lo, hi, sub = av
                hi = None if hi is _C.MAXREPEAT else hi
                if lo > max_repeat or (hi is not None and hi > max_repeat):
                    raise RegexError(f"a repetition count above {max_repeat}")
                parts.append(rep(conv(sub), lo, hi))
            elif op is _C.AT:
                raise RegexError("an anchor (^, $, \\b, \\A, \\Z) inside the pattern; only ^ at the start and $ at "
                                 "the end of the pattern or of a top-level alternative are supported")
            elif op is _C.CATEGORY:
                parts.append(char(_category(av)))
            elif op is getattr(_C, "ATOMIC_GROUP", None):
                parts.append(conv(av))
            elif op in (_C.ASSERT, _C.ASSERT_NOT):
                raise RegexError("look-around assertions are not regular")
            elif op in (_C.GROUPREF, _C.GROUPREF_EXISTS):
                raise RegexError("back-references are not regular")
            else:
                raise RegexError(f"unsupported construct {op}")
        return cat(*parts)

    def top(items) -> tuple:
        items = list(items)
        if len(items) == 1 and items[0][0] is _C.BRANCH:
            return alt(*(top(b) for b in items[0][1][1]))
        if len(items) == 1 and items[0][0] is _C.SUBPATTERN and not items[0][1][1] and not items[0][1][2] \
                and any(op is _C.AT or op is _C.BRANCH for op, _ in items[0][1][3]):
            return top(items[0][1][3])
        begin = bool(items) and items[0] == (_C.AT, _C.AT_BEGINNING)
        end = bool(items) and items[-1][0] is _C.AT and items[-1][1] in (_C.AT_END, _C.AT_END_STRING)
        if begin:
            items = items[1:]
        if end and items:
            items = items[:-1]
        elif end:
            pass
        body = conv(items)
        if search:
            # next to an unanchored end, x{lo,hi} matches where x{lo} does (the rest is absorbed
            # by the any-text around it): a much smaller automaton for [a-z]{1,255} or \w+
            parts = list(body[1]) if body[0] == "cat" else [body]
            if not end and parts and parts[-1][0] == "rep":
                parts[-1] = rep(parts[-1][1], parts[-1][2], parts[-1][2])
            if not begin and parts and parts[0][0] == "rep":
                parts[0] = rep(parts[0][1], parts[0][2], parts[0][2])
            star = rep(char(complement_ranges([])), 0, None)
            body = det(cat(EMPTY if begin else star, *parts, EMPTY if end else star))
        return body

    return top(list(tree))
