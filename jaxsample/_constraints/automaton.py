"""Regular languages over bytes: a small regex AST, its NFA, a bounded DFA, and the token automaton.

The builders of :mod:`jaxsample._constraints.structured` describe a language as an AST
(tuples, below), compile it to a Thompson NFA over bytes (code points are spelled as their
UTF-8 byte sequences), determinize it with a hard cap on the number of states (the build
stops as soon as the cap is crossed, before any large allocation) and walk every token's
bytes through the DFA to get the token-level automaton the device runs (docs/structured.md).

AST nodes::

    ("lit", b"...")             these bytes
    ("set", ((lo, hi), ...))    one code point in the ranges (UTF-8 encoded)
    ("bytes", ((lo, hi), ...))  one byte in the ranges
    ("cat", (n, ...)), ("alt", (n, ...)), ("rep", n, lo, hi | None)
    ("and", a, b), ("diff", a, b)   intersection / difference (product of the two DFAs)
    ("seq", items, sep, lo, hi)      JSON object members: see :func:`seq`
"""

from __future__ import annotations

import re
try:  # Python >= 3.11
    from re import _constants as _C
    from re import _parser as _P
except ImportError:  # pragma: no cover
    import sre_constants as _C
    import sre_parse as _P
from typing import Any, Sequence

import numpy as np

EMPTY = ("cat", ())
NOTHING = ("alt", ())
MAX_CP = 0x10FFFF


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


def size_hint(node, memo=None) -> int:
    """NFA states the node will need (a quick upper estimate, for limits before building)."""
    kind = node[0]
    if kind == "lit":
        return len(node[1]) + 1
    if kind in ("set", "bytes"):
        return 3 * len(node[1]) + 2
    if kind in ("cat", "alt"):
        return sum(size_hint(x) for x in node[1]) + 2
    if kind == "rep":
        _, x, lo, hi = node
        return size_hint(x) * max(1, hi if hi is not None else lo + 1) + 2
    if kind in ("and", "diff"):
        return size_hint(node[1]) * size_hint(node[2])
    if kind == "dfa":
        return len(node[1][0]) + 1
    if kind == "seq":
        _, items, sep, lo, hi = node
        phases = (hi if hi is not None else lo) + 1
        return phases * sum(size_hint(x) + size_hint(sep) for x, _, _ in items) + 2
    raise ValueError(kind)


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


# ----------------------------------------------------------------------------- NFA


class _NFA:
    """Thompson NFA: ``eps[s]`` epsilon targets, ``moves[s]`` (byte lo, byte hi, target)."""

    def __init__(self, max_nfa: int, what: str, cache: dict | None = None):
        self.eps: list[list[int]] = []
        self.moves: list[list[tuple[int, int, int]]] = []
        self.max_nfa, self.what = max_nfa, what
        self.cache = {} if cache is None else cache  # id(node) -> (node, range moves, accepting)

    def new(self) -> int:
        if len(self.eps) >= self.max_nfa:
            raise TooLarge(self.what, "max_states", self.max_nfa, " NFA states")
        self.eps.append([])
        self.moves.append([])
        return len(self.eps) - 1

    def build(self, node, start: int) -> int:
        """Adds ``node`` from ``start``; returns its end state."""
        kind = node[0]
        if kind == "lit":
            s = start
            for byte in node[1]:
                t = self.new()
                self.moves[s].append((byte, byte, t))
                s = t
            return s
        if kind == "bytes":
            t = self.new()
            for a, b in node[1]:
                self.moves[start].append((a, b, t))
            return t
        if kind == "set":
            end = self.new()
            seqs: list = []
            for a, b in node[1]:
                _utf8_split(a, b, seqs)
            # share prefixes of the byte sequences (a trie) to keep the NFA small
            trie: dict = {}
            for sq in seqs:
                d = trie
                for r in sq[:-1]:
                    d = d.setdefault(r, {})
                d.setdefault(None, []).append(sq[-1])
            self._trie(trie, start, end)
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
            return self._product(node, start)
        if kind == "det":
            got = self.cache.get(id(node[1]))
            if got is None:
                d = determinize(node[1], self.cache.get("__cap__", self.max_nfa), self.what, cache=self.cache)
                got = (node[1], _range_moves(d.table), d.accept.tolist())
                self.cache[id(node[1])] = got
            _, moves, accept = got
            states = [start] + [self.new() for _ in moves[1:]]
            end = self.new()
            for k, ms in enumerate(moves):
                if accept[k]:
                    self.eps[states[k]].append(end)
                self.moves[states[k]].extend((a, b, states[t]) for a, b, t in ms)
            return end
        if kind == "dfa":  # an explicit DFA: (rows of 256 targets or -1, accepting flags); row 0 = start
            table, accept = node[1]
            states = [start] + [self.new() for _ in table[1:]]
            end = self.new()
            for k, row in enumerate(table):
                if accept[k]:
                    self.eps[states[k]].append(end)
                self.moves[states[k]].extend((lo, hi, states[t]) for lo, hi, t in _row_runs(row))
            return end
        if kind == "seq":
            return self._seq(node, start)
        raise ValueError(f"unknown node {kind!r}")

    def _trie(self, trie: dict, s: int, end: int) -> None:
        for r, sub in trie.items():
            if r is None:
                for a, b in sub:
                    self.moves[s].append((a, b, end))
            else:
                t = self.new()
                self.moves[s].append((r[0], r[1], t))
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

            if repeat:
                for c, s in cur.items():
                    self.eps[s].append(state(c))
                for c in range(top + 1):
                    if c not in nxt or (hi is not None and c + 1 > hi):
                        continue
                    e = self.build(x if c == 0 else cat(sep, x), nxt[c])
                    self.eps[e].append(state(clamp(c + 1)))
            else:
                for c, s in list(cur.items()):
                    if not required:
                        self.eps[s].append(state(c))
                    if hi is not None and c + 1 > hi:
                        continue
                    e = self.build(x if c == 0 else cat(sep, x), s)
                    self.eps[e].append(state(clamp(c + 1)))
            cur = nxt
        end = self.new()
        for c, s in cur.items():
            if c >= lo:
                self.eps[s].append(end)
        return end

    def _product(self, node, start: int) -> int:
        kind, a, b = node
        cap = self.cache.get("__cap__", self.max_nfa)
        da = determinize(a, cap, self.what, cache=self.cache)
        db = determinize(b, cap, self.what, cache=self.cache)
        ta = da.table
        dead_b = db.table.shape[0]  # b's dead state as a real sink row (a diff continues through it)
        tb = np.vstack([db.table, np.full((1, 256), -1, db.table.dtype)])
        tb = np.where(tb < 0, dead_b, tb)
        acc_b_of = np.append(db.accept, False)
        ids = {(0, 0): 0}
        order = [(0, 0)]
        rows = []
        i = 0
        while i < len(order):
            sa, sb = order[i]
            na, nb = ta[sa], tb[sb]
            row = np.full(256, -1, np.int64)
            for byte in range(256):
                x, y = na[byte], nb[byte]
                if x < 0 or (kind == "and" and y == dead_b):
                    continue
                key = (int(x), int(y))
                if key not in ids:
                    if len(order) >= cap:
                        raise TooLarge(self.what, "max_states", cap, " product states")
                    ids[key] = len(order)
                    order.append(key)
                row[byte] = ids[key]
            rows.append(row)
            i += 1
        states = [start] + [self.new() for _ in order[1:]]
        end = self.new()
        for k, (sa, sb) in enumerate(order):
            acc_b = bool(acc_b_of[sb])
            if da.accept[sa] and (acc_b if kind == "and" else not acc_b):
                self.eps[states[k]].append(end)
            row = rows[k]
            self.moves[states[k]].extend((lo, hi, states[t]) for lo, hi, t in _row_runs(row))
        return end


def _row_runs(row) -> list[tuple[int, int, int]]:
    """One state's 256 targets (-1: dead) as (byte lo, byte hi, target) runs."""
    runs, byte = [], 0
    while byte < 256:
        t = row[byte]
        if t < 0:
            byte += 1
            continue
        e = byte
        while e + 1 < 256 and row[e + 1] == t:
            e += 1
        runs.append((byte, e, t))
        byte = e + 1
    return runs


def _range_moves(table: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """A DFA table as per-state (byte lo, byte hi, target) runs."""
    return [_row_runs(row) for row in table.tolist()]


class DFA:
    """``table[s, byte]`` next state (-1: dead), ``accept[s]``; state 0 is the start."""

    def __init__(self, table: np.ndarray, accept: np.ndarray):
        self.table, self.accept = table, accept


def determinize(node, max_states: int, what: str, max_nfa: int | None = None, cache: dict | None = None) -> DFA:
    """The DFA of ``node`` (subset construction), trimmed to states that can still accept.

    Raises:
      TooLarge: more than ``max_states`` DFA states (checked as each state is created).
    """
    if cache is None:  # the outermost build: its bound also caps the nested ones, and all their work
        cache = {"__cap__": max_states, "__work__": [0, 3 * max_states]}
    work = cache["__work__"]
    nfa = _NFA(max_nfa or max(4 * max_states, 1 << 20), what, cache)
    s0 = nfa.new()
    final = nfa.build(node, s0)
    eps, moves = nfa.eps, nfa.moves
    # byte classes: bytes that every move treats alike
    cuts = np.zeros(257, bool)
    cuts[0] = True
    for ms in moves:
        for a, b, _ in ms:
            cuts[a] = True
            cuts[b + 1] = True
    cls = np.cumsum(cuts[:256]) - 1
    cls[cls < 0] = 0
    ncls = int(cls.max()) + 1
    first = np.full(ncls, 0, np.int64)
    for byte in range(255, -1, -1):
        first[cls[byte]] = byte
    moves_c = [[(int(cls[a]), int(cls[b]), t) for a, b, t in ms] for ms in moves]

    memo: dict[int, frozenset] = {}

    def one(s0: int) -> frozenset:
        got = memo.get(s0)
        if got is None:
            seen = {s0}
            stack = [s0]
            while stack:
                s = stack.pop()
                for t in eps[s]:
                    if t not in seen:
                        seen.add(t)
                        stack.append(t)
            got = memo[s0] = frozenset(s for s in seen if moves[s] or s == final)
        return got

    def closure(states) -> frozenset:
        if len(states) == 1:
            return one(next(iter(states)))
        return frozenset().union(*(one(s) for s in states))

    def _unused(states) -> frozenset:
        seen = set(states)
        stack = list(states)
        while stack:
            s = stack.pop()
            for t in eps[s]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(s for s in seen if moves[s] or s == final)

    start = closure([s0])
    ids = {start: 0}
    order = [start]
    rows: list[np.ndarray] = []
    i = 0
    while i < len(order):
        by_cls: dict[int, set] = {}
        for s in order[i]:
            for a, b, t in moves_c[s]:
                for c in range(a, b + 1):
                    by_cls.setdefault(c, set()).add(t)
        row = np.full(ncls, -1, np.int64)
        for c, ts in by_cls.items():
            key = closure(ts)
            j = ids.get(key)
            if j is None:
                work[0] += 1
                if len(order) >= max_states or work[0] > work[1]:
                    raise TooLarge(what, "max_states", max_states, " DFA states")
                j = ids[key] = len(order)
                order.append(key)
            row[c] = j
        rows.append(row)
        i += 1
    table_c = np.stack(rows)
    accept = np.array([final in st for st in order], bool)
    table = table_c[:, cls]
    return _trim_dfa(DFA(table, accept))


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

    One pass over a CSR adjacency (``O(states + edges)``, no per-level array work), so a
    chain of a million states costs the same per state as a wide automaton.
    """
    order_e = np.argsort(src, kind="stable")
    nbr = dst[order_e].tolist()
    starts = np.searchsorted(src[order_e], np.arange(n + 1)).tolist()
    seen = bytearray(n)
    order = []
    for g in seeds:
        g = int(g)
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


def _co_reachable(src: np.ndarray, dst: np.ndarray, goals: np.ndarray, n: int) -> np.ndarray:
    """States from which a goal is reachable (a reverse search, linear in states + edges)."""
    return _reach(np.asarray(dst, np.int64), np.asarray(src, np.int64), goals, n)[0]


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
        levels = [0]
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


def token_automaton(d: DFA, trie: TokenTrie, max_states: int, max_transitions: int, what: str):
    """The token-level automaton reachable from the DFA's start: (states, src, tok, dst, accept).

    Every DFA state walks the whole trie at once (chunks of states, one numpy step per
    trie level); then the states reachable from the start at token boundaries are kept,
    numbered in BFS order (0 = the start). Stops with :class:`TooLarge` past either limit.
    """
    table = d.table.astype(np.int32)
    n_dfa = table.shape[0]
    chunk = max(1, (1 << 21) // max(trie.n, 1))
    srcs, toks, dsts = [], [], []
    total = 0
    for c0 in range(0, n_dfa, chunk):
        st = np.arange(c0, min(n_dfa, c0 + chunk), dtype=np.int32)
        at = np.full((st.size, trie.n), -1, np.int32)
        at[:, 0] = st
        for lv in trie.levels:
            p = at[:, trie.parent[lv]]
            if (p < 0).all():
                break
            at[:, lv] = np.where(p >= 0, table[np.maximum(p, 0), trie.byte[lv]], -1)
        end = at[:, trie.tok_node]
        r, k = np.nonzero(end >= 0)
        total += r.size
        if total > max_transitions * 4:
            raise TooLarge(what, "max_transitions", max_transitions, " token transitions")
        srcs.append(st[r])
        toks.append(trie.tok_id[k].astype(np.int32))
        dsts.append(end[r, k])
    src, tok, dst = np.concatenate(srcs), np.concatenate(toks), np.concatenate(dsts)
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


def _unicode_category(name: str) -> list[tuple[int, int]]:
    """Code points Python's ``re`` puts in ``\\d`` / ``\\w`` / ``\\s`` (computed once)."""
    if name not in _UNICODE_CATS:
        pat = re.compile({"digit": r"\d", "word": r"\w", "space": r"\s"}[name])
        ranges, start = [], None
        for c in range(MAX_CP + 2):
            inside = c <= MAX_CP and not (0xD800 <= c <= 0xDFFF) and pat.match(chr(c)) is not None
            if inside and start is None:
                start = c
            elif not inside and start is not None:
                ranges.append((start, c - 1))
                start = None
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

    Raises:
      RegexError: syntax errors and constructs that are not regular (look-around,
        back-references) or not supported (flags).
    """
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
            star = rep(char(complement_ranges([])), 0, None)
            body = cat(EMPTY if begin else star, body, EMPTY if end else star)
        return body

    return top(list(tree))
