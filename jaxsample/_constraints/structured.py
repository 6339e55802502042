"""Constrained decoding on device: regular expressions, JSON schemas and choices as token masks.

A constraint is a token-level automaton (a DFA whose symbols are whole tokens) built on the
host from a regular expression (or a JSON schema compiled to one, :mod:`.schema`) and a
tokenizer's vocabulary (:mod:`.automaton`: byte DFA with a hard state bound, then every
token's bytes walked through it at once over a trie), then held as arrays by the
:class:`Constraint` processor (docs/structured.md). Its state is one DFA state per row
(``int32[B]``), carried through ``generate``'s ``lax.scan`` like any other processor state:
no host round trip per token.

Layout (``S`` states, ``V`` tokens, ``W = ceil(V / 32)`` words, ``T`` transitions)::

    allowed  uint32[S, W]   bit t % 32 of word t // 32: token t is allowed in the state
    offsets  int32[S]       where the state's transitions start in ``targets``
    targets  int16|32[T]    next state of each allowed token, in increasing token order
    initial  int32[] | [B]  start state of every row (-1: unconstrained row)

The next state of token ``t`` in state ``s`` is ``targets[offsets[s] + rank]`` where
``rank`` is the number of tokens ``< t`` allowed in ``s``: a popcount over the state's
mask words (a rank query on the bitmask, ``O(W)`` per row). The table therefore costs
``4 S W + 4 S + 2 T`` bytes (``int16`` targets while ``S <= 32768``) instead of the
``4 S V`` of a dense ``[S, V]`` next-state table: for ``V = 32000``, 4 KB per state plus
2 bytes per allowed (state, token) pair.

State 0 of every table is *dead* (nothing allowed: a row that gets there finishes with
``NO_VALID_TOKEN``); state 1 is *done*: accepting states allow the end-of-sequence token,
which leads to *done*, where only end-of-sequence is allowed. So EOS is allowed exactly in
accepting states, and a row in an accepting state with no other way on can only draw EOS
(pass ``stop_ids=[tok.eos_id]`` to ``generate`` so that it stops there).

Shapes are padded (``S`` and ``T`` up to the next quarter octave, ``{4, 5, 6, 7} * 2**k``,
or to ``max_states`` / ``max_transitions`` when given), and the tables are leaves of the pytree, so swapping a
constraint for another of the same padded size never recompiles.

Per row: :func:`stack_constraints` merges several constraints into one table (the disjoint
union of the automata) with one start state per row; ``None`` rows are unconstrained.
"""

from __future__ import annotations

import json
import time
import weakref
from typing import Any, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample._constraints import automaton as _A
from jaxsample._constraints import host as _H
from jaxsample._constraints import schema as _S
from jaxsample._processors.base import LogitsProcessor, _set, processor_dataclass, static_field

__all__ = [
    "Constraint",
    "Regex",
    "JSONSchema",
    "Choice",
    "stack_constraints",
    "token_bytes",
]

Array = jax.Array

DEAD, DONE, START = 0, 1, 2  # reserved local states of every table
#: Default size limits (pass max_states / max_transitions to change them).
DEFAULT_MAX_STATES = 1 << 16
DEFAULT_MAX_TRANSITIONS = 1 << 26


# ----------------------------------------------------------------------------- vocabulary


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode map, inverted (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _hf_token_bytes(tok: Any) -> list[bytes | None]:
    """Bytes of every id of a ``tokenizers.Tokenizer`` (None for special tokens).

    Supports byte-level BPE (a ``ByteLevel`` decoder: GPT-2, Llama 3, Qwen, ...) and
    SentencePiece-style vocabularies (``▁`` for space, ``<0xNN>`` byte fallback: Llama 2,
    Mistral). Other decoders (WordPiece, ...) are refused.
    """
    spec = json.loads(tok.to_str())
    decoder = spec.get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["id"]: t["content"] for t in spec.get("added_tokens", []) if not t.get("special")}
    vocab = tok.get_vocab(with_added_tokens=True)
    out: list[bytes | None] = [None] * tok.get_vocab_size()
    if "ByteLevel" in kinds:
        table = _byte_level_decoder()

        def to_bytes(s: str) -> bytes | None:
            try:
                return bytes(table[c] for c in s)
            except KeyError:  # not in the byte alphabet: a plain-text added token
                return s.encode("utf-8")
    elif kinds & {"ByteFallback", "Metaspace", "Replace"}:
        def to_bytes(s: str) -> bytes | None:
            if len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                return bytes([int(s[3:5], 16)])
            return s.replace("\u2581", " ").encode("utf-8")
    else:
        raise ValueError(f"token_bytes: unsupported tokenizer decoder {sorted(k for k in kinds if k)}; "
                         f"byte-level BPE and SentencePiece-style vocabularies are supported")
    for text, i in vocab.items():
        if i in special or not 0 <= i < len(out):
            continue
        out[i] = added[i].encode("utf-8") if i in added else to_bytes(text)
    return out


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id stands for (``None``: a special token, never generated as text).

    Accepts ``models.ByteTokenizer`` (ids 0..255 are bytes), ``models.HFTokenizer``, a
    ``tokenizers.Tokenizer``, or any object with a ``token_bytes()`` method returning such
    a list.

    Example:
      >>> from models import ByteTokenizer
      >>> token_bytes(ByteTokenizer())[65], token_bytes(ByteTokenizer())[257]
      (b'A', None)
    """
    if callable(getattr(tokenizer, "token_bytes", None)):  # models.ByteTokenizer has one
        return list(tokenizer.token_bytes())
    inner = getattr(tokenizer, "_tok", tokenizer)  # models.HFTokenizer wraps a tokenizers.Tokenizer
    if hasattr(inner, "to_str") and hasattr(inner, "get_vocab"):
        return _hf_token_bytes(inner)
    raise TypeError(f"token_bytes: unsupported tokenizer {type(tokenizer).__name__}; pass a ByteTokenizer, "
                    f"an HFTokenizer, a tokenizers.Tokenizer, or an object with token_bytes()")


class _Vocab(NamedTuple):
    trie: Any  # automaton.TokenTrie
    size: int
    eos_id: int
    pieces: frozenset  # the bytes of every ordinary token
    max_len: int
    cache: dict  # compiled constraints by (kind, text, options)


_VOCABS: "weakref.WeakKeyDictionary[Any, _Vocab]" = weakref.WeakKeyDictionary()
_CACHE_SIZE = 64


def _vocabulary(tokenizer: Any) -> _Vocab:
    """The tokenizer's token trie (cached per tokenizer object, with its compiled constraints)."""
    try:
        return _VOCABS[tokenizer]
    except (KeyError, TypeError):
        pass
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise ValueError("constraint: the tokenizer has no eos_id; constrained rows end with it")
    pieces = token_bytes(tokenizer)
    size = int(getattr(tokenizer, "vocab_size", len(pieces)))
    if not 0 <= int(eos) < size:
        raise ValueError(f"constraint: eos_id={eos} is outside the vocabulary [0, {size})")
    words = frozenset(b for i, b in enumerate(pieces[:size]) if b and i != eos)
    vocab = _Vocab(_A.TokenTrie(pieces, int(eos), size), size, int(eos), words,
                   max((len(b) for b in words), default=0), {})
    try:
        _VOCABS[tokenizer] = vocab
    except TypeError:  # not weak-referenceable: no cache
        pass
    return vocab


def _spellable(vocab: _Vocab, text: bytes) -> bool:
    """Whether some sequence of the vocabulary's tokens spells ``text`` exactly."""
    reach = np.zeros(len(text) + 1, bool)
    reach[0] = True
    for i in range(len(text)):
        if reach[i]:
            for j in range(i + 1, min(len(text), i + vocab.max_len) + 1):
                if text[i:j] in vocab.pieces:
                    reach[j] = True
    return bool(reach[-1])


# ----------------------------------------------------------------------------- host tables


class _Table(NamedTuple):
    """Unpadded host arrays of one automaton (see the module docstring)."""

    allowed: np.ndarray  # uint32 [S, W]
    offsets: np.ndarray  # int32 [S]
    targets: np.ndarray  # int32 [T]


def _words(vocab_size: int) -> int:
    return max(1, -(-vocab_size // 32))


def _pack(n: int, src: np.ndarray, tok: np.ndarray, dst: np.ndarray, accept: np.ndarray,
          vocab_size: int, eos_id: int) -> _Table:
    """Token automaton (local state 0 = start) -> packed arrays: DEAD = 0, DONE = 1, start = 2.

    Only states from which the output can still end are kept (a reverse search, linear in
    states + transitions): a vocabulary that cannot spell some continuation leaves traps.
    """
    acc = np.nonzero(accept)[0]
    src = np.concatenate([[DONE], src + START, acc + START]).astype(np.int64)
    tok = np.concatenate([[eos_id], tok, np.full(acc.size, eos_id)]).astype(np.int64)
    dst = np.concatenate([[DONE], dst + START, np.full(acc.size, DONE)]).astype(np.int64)
    n = n + START
    live = _A._co_reachable(src, dst, np.array([DONE]), n)
    if not live[START]:
        raise ValueError("the vocabulary cannot spell any complete match (no accepting state is reachable)")
    keep = (tok >= 0) & (tok < vocab_size) & live[src] & live[dst]
    src, tok, dst = src[keep], tok[keep], dst[keep]
    order = np.argsort(src * vocab_size + tok, kind="stable")  # by state, then token: the rank order
    src, tok, dst = src[order], tok[order], dst[order]
    words = _words(vocab_size)
    allowed = np.zeros((n, words), np.uint32)
    if src.size:  # each word: the OR of its bits (a run of equal words, sorted)
        word = src * words + (tok >> 5)
        runs = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
        bits = np.uint32(1) << (tok & 31).astype(np.uint32)
        allowed.reshape(-1)[word[runs]] = np.bitwise_or.reduceat(bits, runs)
    counts = np.bincount(src, minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    return _Table(allowed, offsets, dst.astype(np.int32))


def _trim(allowed: np.ndarray, offsets: np.ndarray, targets: np.ndarray) -> _Table:
    """Drops trailing padding (states with an empty mask, transitions past the last state's)."""
    counts = _popcount_rows(allowed)
    used = np.nonzero(counts)[0]
    s = int(used[-1]) + 1 if used.size else START
    t = int((offsets[:s].astype(np.int64) + counts[:s]).max()) if s else 0
    return _Table(allowed[:s], offsets[:s], targets[:t].astype(np.int32))


def _popcount_rows(allowed: np.ndarray) -> np.ndarray:
    return np.unpackbits(allowed.view(np.uint8), axis=-1).sum(axis=-1).astype(np.int64)


def _bucket(n: int, minimum: int) -> int:
    """``n`` rounded up to a quarter octave (``{4, 5, 6, 7} * 2**k``: at most 25% padding)."""
    if n <= minimum:
        return minimum
    step = max(1, (1 << (int(n - 1).bit_length() - 1)) // 4)
    return -(-n // step) * step


def _padded(table: _Table, initial: np.ndarray, vocab_size: int, max_states: int | None,
            max_transitions: int | None, fn: str) -> "Constraint":
    s, t = table.allowed.shape[0], table.targets.shape[0]
    for name, need, limit, default in (("max_states", s, max_states, DEFAULT_MAX_STATES),
                                       ("max_transitions", t, max_transitions, DEFAULT_MAX_TRANSITIONS)):
        if limit is not None and (not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"{fn}: {name} must be a positive int, got {limit!r}")
        if need > (default if limit is None else limit):
            raise ValueError(f"{fn}: the automaton needs {need} {name[4:]}, more than {name}="
                             f"{default if limit is None else limit}; pass a larger {name} or a simpler constraint")
    s_pad = int(max_states) if max_states is not None else _bucket(s, 8)
    t_pad = int(max_transitions) if max_transitions is not None else _bucket(t, 64)
    allowed = np.zeros((s_pad, table.allowed.shape[1]), np.uint32)
    allowed[:s] = table.allowed
    offsets = np.full((s_pad,), t, np.int32)
    offsets[:s] = table.offsets
    targets = np.zeros((t_pad,), np.int16 if s_pad <= 1 << 15 else np.int32)
    targets[:t] = table.targets
    return Constraint(allowed, offsets, targets, initial, vocab_size=vocab_size)


# ----------------------------------------------------------------------------- processor


@processor_dataclass
class Constraint(LogitsProcessor):
    """A token-level automaton as a processor: only tokens that keep the output matching.

    ``apply`` sets every token the row's state does not allow to ``-inf``; ``update``
    moves the row's state along the drawn token. Rows whose start state is ``-1`` are
    unconstrained (their logits pass through). Build one with :func:`Regex`,
    :func:`JSONSchema` or :func:`Choice`, several per row with :func:`stack_constraints`;
    see the module docstring for the layout. All arrays are traced leaves; only
    ``vocab_size`` (the tokenizer's) is static.

    Attributes:
      allowed: ``uint32[S, W]`` allowed-token bitmask per state.
      offsets: ``int32[S]`` start of each state's transitions in ``targets``.
      targets: ``int16[T]`` (``int32`` when ``S > 32768``) next states in token order.
      initial: ``int32`` start state, a scalar or one per row (``-1``: unconstrained).
      vocab_size: static, the tokenizer's vocabulary size.

    Example:
      >>> import jax, jax.numpy as jnp, jaxsample as js
      >>> from models import ByteTokenizer
      >>> tok = ByteTokenizer()
      >>> c = js.Regex("[0-9]{2}", tok)
      >>> state = c.init(jnp.zeros((1, 1), jnp.int32), jnp.array([1]), 259)
      >>> masked = c.apply(jnp.zeros((1, 259)), state, None)
      >>> [chr(i) for i in jnp.nonzero(jnp.isfinite(masked[0]))[0]]
      ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']
    """

    stateful: ClassVar[bool] = True

    allowed: Any
    offsets: Any
    targets: Any
    initial: Any
    vocab_size: int = static_field(default=0)
    field_ranks = {"allowed": None, "offsets": None, "targets": None}

    def __post_init__(self) -> None:
        fn = "Constraint"
        allowed, offsets, targets = (np.asarray(getattr(self, n)) for n in ("allowed", "offsets", "targets"))
        if allowed.ndim != 2 or allowed.dtype != np.uint32:
            raise ValueError(f"{fn}: allowed must be uint32 [S, W], got {allowed.dtype} {allowed.shape}")
        s, w = allowed.shape
        if offsets.shape != (s,) or offsets.dtype != np.int32:
            raise ValueError(f"{fn}: offsets must be int32 [S] = [{s}], got {offsets.dtype} {offsets.shape}")
        if targets.ndim != 1 or targets.dtype not in (np.int16, np.int32):
            raise ValueError(f"{fn}: targets must be int16 or int32 [T], got {targets.dtype} {targets.shape}")
        if not isinstance(self.vocab_size, (int, np.integer)) or not 0 < self.vocab_size <= 32 * w:
            raise ValueError(f"{fn}: vocab_size must be in [1, {32 * w}] (32 per mask word), got {self.vocab_size!r}")
        initial = np.asarray(self.initial)
        if initial.ndim > 1 or not np.issubdtype(initial.dtype, np.integer):
            raise ValueError(f"{fn}: initial must be an int scalar or [B], got {initial.dtype} {initial.shape}")
        if initial.size and (initial.min() < -1 or initial.max() >= s):
            raise ValueError(f"{fn}: initial states must be in [-1, {s}), got {initial.tolist()}")
        _set(self, "vocab_size", int(self.vocab_size))
        for name, value in (("allowed", allowed), ("offsets", offsets), ("targets", targets)):
            _set(self, name, jax.device_put(value))  # on device once, not per call (jnp.asarray compiles per shape)
        _set(self, "initial", jax.device_put(initial.astype(np.int32)))

    # -- sizes (host) ---------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Device bytes of the padded table."""
        return int(sum(np.asarray(a).nbytes for a in (self.allowed, self.offsets, self.targets)))

    def sizes(self) -> dict[str, int]:
        """States and transitions used and padded, and the padded table's bytes."""
        used = _trim(*(np.asarray(a) for a in (self.allowed, self.offsets, self.targets)))
        return dict(states=int(used.allowed.shape[0]), transitions=int(used.targets.shape[0]),
                    padded_states=int(self.allowed.shape[0]), padded_transitions=int(self.targets.shape[0]),
                    nbytes=self.nbytes)

    def accepts(self, token_ids: Sequence[int], row: int = 0) -> bool:
        """Whether ``token_ids`` then end-of-sequence is a complete output (a host-side walk).

        The walk is the device's ``update`` on the host (the same table): for tests,
        benchmarks and checking outputs. ``row`` picks the start state of a per-row table.
        """
        host = self.__dict__.get("_host")
        if host is None:
            allowed = np.asarray(self.allowed)
            bits = np.unpackbits(allowed.view(np.uint8), axis=-1, bitorder="little")
            host = (bits, np.asarray(self.offsets), np.asarray(self.targets))
            object.__setattr__(self, "_host", host)
        bits, offsets, targets = host
        init = np.asarray(self.initial)
        s = int(init if init.ndim == 0 else init[row])
        if s < 0:
            return True
        for t in token_ids:
            t = int(t)
            if not (0 <= t < bits.shape[1]) or not bits[s, t]:
                return False
            s = int(targets[offsets[s] + int(bits[s, :t].sum())])
        n = int(bits[s].sum())
        return bool((targets[offsets[s]:offsets[s] + n] == DONE).any())

    # -- processor protocol ---------------------------------------------------------

    def init(self, prompt_tokens, prompt_lengths, vocab_size, *, max_new_tokens=None) -> Array:
        """The start state of every row, ``int32[B]``."""
        del prompt_lengths, max_new_tokens
        if prompt_tokens is None:
            raise ValueError("Constraint.init: pass the prompts (int [B, P]); the state is one DFA state per row")
        b = jnp.shape(prompt_tokens)[0]
        if vocab_size is not None and vocab_size < self.vocab_size:
            raise ValueError(f"Constraint: the model's vocabulary ({vocab_size}) is smaller than the "
                             f"tokenizer's ({self.vocab_size}) the constraint was built for")
        if self.initial.ndim == 1 and self.initial.shape[0] != b:
            raise ValueError(f"Constraint: one start state per row was given for {self.initial.shape[0]} rows, "
                             f"but the batch has {b} rows (with n samples per prompt: one per sample)")
        return jnp.broadcast_to(self.initial, (b,)).astype(jnp.int32)

    def apply(self, logits: Array, state: Array, key: Array | None) -> Array:
        del key
        return _apply(logits, state, self.allowed)

    def update(self, state: Array, token: Array, processed_logits: Array) -> Array:
        del processed_logits
        return _update(state, token, self.allowed, self.offsets, self.targets)


_bits = _H._bits  # uint32 [B, W] -> bool [B, v]: one definition, shared with the host engine


def _apply(logits: Array, state: Array, allowed: Array) -> Array:
    """logits [B, V], state int32 [B] -> logits with disallowed tokens at -inf."""
    words = allowed[jnp.maximum(state, 0)]  # [B, W]
    keep = _bits(words, logits.shape[-1]) | (state < 0)[:, None]
    return jnp.where(keep, logits, jnp.asarray(-jnp.inf, logits.dtype))


def _update(state: Array, token: Array, allowed: Array, offsets: Array, targets: Array) -> Array:
    """Next state: targets[offsets[s] + #allowed tokens below t]; a disallowed token -> DEAD."""
    s = jnp.maximum(state, 0)
    words = allowed[s]  # [B, W]
    w = words.shape[-1]
    t = jnp.clip(token, 0, 32 * w - 1)
    word_i, bit = t >> 5, (t & 31).astype(jnp.uint32)
    word = jnp.take_along_axis(words, word_i[:, None], axis=1)[:, 0]  # [B]
    hit = (((word >> bit) & 1) == 1) & (token >= 0) & (token < 32 * w)
    counts = jax.lax.population_count(words).astype(jnp.int32)  # [B, W]
    below = jnp.sum(jnp.where(jnp.arange(w)[None, :] < word_i[:, None], counts, 0), axis=1)
    below = below + jax.lax.population_count(word & ((jnp.uint32(1) << bit) - 1)).astype(jnp.int32)
    nxt = targets[jnp.clip(offsets[s] + below, 0, targets.shape[0] - 1)].astype(jnp.int32)
    return jnp.where(state < 0, state, jnp.where(hit, nxt, DEAD))


# ----------------------------------------------------------------------------- builders


def _check_limit(fn: str, name: str, value) -> int:
    if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")
    return int(value) if value is not None else {"max_states": DEFAULT_MAX_STATES,
                                                 "max_transitions": DEFAULT_MAX_TRANSITIONS}[name]


class _Deadline(list):
    """The determinization's shared work counter (``[done, budget]``) that also stops at a wall-clock deadline.

    :func:`automaton.determinize` bumps ``work[0]`` for every DFA state it creates (nested
    builds too); past ``deadline`` (``time.perf_counter()``) the bump raises ``TooLarge``,
    so a ``host="auto"`` build that runs long goes to the host engine instead.
    """

    def __init__(self, budget: int, deadline: float, what: str, cap: int, seconds: float):
        super().__init__([0, budget])
        self.deadline, self.what, self.cap, self.seconds = deadline, what, cap, seconds

    def __setitem__(self, i, v):
        if time.perf_counter() > self.deadline:
            raise _A.TooLarge(self.what, "max_states", self.cap,
                              f" DFA states in the {self.seconds:g} s build budget (AUTO_BUILD_SECONDS)")
        super().__setitem__(i, v)


def _table(node: tuple, vocab: "_Vocab", what: str, s_lim: int, t_lim: int, dfa_cap: int | None = None,
           seconds: float | None = None) -> _Table:
    """AST -> bounded byte DFA -> token automaton -> packed host table (raises _A.TooLarge).

    ``seconds``: stop the determinization (``TooLarge``) once it has run this long.
    """
    cap = dfa_cap or 2 * s_lim + 8
    cache = None
    if seconds is not None:
        cache = {"__cap__": cap, "__work__": _Deadline(3 * cap, time.perf_counter() + seconds, what, cap, seconds)}
    dfa = _A.determinize(node, cap, what, cache=cache)
    if not dfa.accept.any():
        raise ValueError("the language is empty (nothing can match)")
    n, src, tok, dst, accept = _A.token_automaton(dfa, vocab.trie, s_lim, t_lim, what)
    return _pack(n, src, tok, dst, accept, vocab.size, vocab.eos_id)


#: With ``host="auto"`` and llguidance installed, JSON schemas whose byte DFA needs more
#: states than this go to the host engine (their device build would take seconds on the host CPU).
AUTO_DEVICE_STATES = 8_000
#: ... and so do those whose estimated automaton (:func:`schema.cost`) is larger than this,
#: before any build (docs/structured.md, MaskBench: every schema of the sample that builds
#: under AUTO_DEVICE_STATES estimates below it) ...
AUTO_DEVICE_COST = 60_000
#: ... and those whose device build is still running after this many seconds ...
AUTO_BUILD_SECONDS = 2.0
#: ... and those whose masks (``allowed``, 4 bytes per 32 tokens per state) would need more
#: device memory than this (a 128k-token vocabulary: about 4,200 states).
AUTO_DEVICE_BYTES = 64 << 20


def _build(node: tuple, tokenizer: Any, fn: str, what: str, max_states, max_transitions,
           key: tuple | None = None, dfa_cap: int | None = None, seconds: float | None = None) -> Constraint:
    """AST -> bounded byte DFA -> token automaton -> padded device table (cached by ``key``)."""
    s_lim = _check_limit(fn, "max_states", max_states)
    t_lim = _check_limit(fn, "max_transitions", max_transitions)
    vocab = _vocabulary(tokenizer)
    if key is not None:
        key = key + (max_states, max_transitions)
        hit = vocab.cache.get(key)
        if hit is not None:
            return hit
    try:
        with _A.no_cyclic_gc():
            table = _table(node, vocab, what, s_lim, t_lim, dfa_cap, seconds)
    except _A.TooLarge as e:
        bound = s_lim if e.limit_name == "max_states" else t_lim
        per = 4 * _words(vocab.size) + 4 if e.limit_name == "max_states" else 2
        raise ValueError(f"{fn}: the automaton of {what} needs more than {e.limit_name}={bound} "
                         f"{e.limit_name[4:]} (at least {bound * per / 2**20:.1f} MiB of device table; the build "
                         f"stopped as soon as it crossed {e.limit}{e.detail}); pass a larger {e.limit_name} "
                         f"or a simpler constraint") from None
    except ValueError as e:
        raise ValueError(f"{fn}: cannot build a token automaton for {what}: {e}") from None
    out = _padded(table, np.int32(START), vocab.size, max_states, max_transitions, fn)
    if key is not None:
        if len(vocab.cache) >= _CACHE_SIZE:
            vocab.cache.pop(next(iter(vocab.cache)))
        vocab.cache[key] = out
    return out


def _parse_regex_arg(pattern: Any, fn: str, name: str):
    """The regex AST of argument `name` of `fn`; errors name the argument and its value."""
    if not isinstance(pattern, str):
        raise TypeError(f"{fn}: {name} must be a str (a regex), got {type(pattern).__name__}")
    try:
        return _A.parse_regex(pattern)
    except _A.RegexError as e:
        raise ValueError(f"{fn}: {name}={pattern!r}: {e}") from None


def Regex(pattern: str, tokenizer: Any, *, max_states: int | None = None,
          max_transitions: int | None = None) -> Constraint:
    """Outputs that fully match a regular expression, then end-of-sequence.

    The syntax is Python's ``re`` (parsed by its own parser): classes, repetitions,
    groups and alternation; ``^`` / ``$`` only at the ends of the pattern or of a
    top-level alternative; no look-around, back-references or inline flags (a clear
    error). ``\\d``, ``\\w``, ``\\s`` match their ASCII members, ``\\D``, ``\\W``,
    ``\\S`` what Python's Unicode classes leave out, so every output also matches the
    pattern under Python's ``re``. The match is over the UTF-8 bytes of the
    tokens, so a token may stop inside a multi-byte character.

    Args:
      pattern: the regular expression the whole output must match.
      tokenizer: ``models.ByteTokenizer``, ``models.HFTokenizer`` or see :func:`token_bytes`.
      max_states: pad the state table to exactly this many states (an error if more are
        needed); default: rounded up to ``{4, 5, 6, 7} * 2**k`` (at most 25% padding),
        at most 65536.
      max_transitions: likewise for (state, token) transitions; default: rounded up
        likewise, at most 2**26.

    Returns:
      A :class:`Constraint` (a stateful processor; put it first in a :func:`chain`).

    Raises:
      ValueError: an invalid pattern, one the vocabulary cannot spell, or a size limit.

    Example:
      >>> import jaxsample as js
      >>> from models import ByteTokenizer
      >>> js.Regex("[0-9]{4}-[0-9]{2}-[0-9]{2}", ByteTokenizer()).sizes()["states"]
      13
    """
    node = _parse_regex_arg(pattern, "Regex", "pattern")
    return _build(node, tokenizer, "Regex", f"pattern={pattern!r}", max_states, max_transitions,
                  key=("regex", pattern))


def _schema_text(schema: Any, fn: str) -> tuple[Any, str]:
    """(parsed schema, canonical JSON text) of a dict, a JSON text or a Pydantic model class."""
    if isinstance(schema, type) and callable(getattr(schema, "model_json_schema", None)):
        schema = schema.model_json_schema()  # a Pydantic v2 model class
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"{fn}: schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise TypeError(f"{fn}: schema must be a dict, a JSON text, a boolean or a Pydantic model class, "
                        f"got {type(schema).__name__}")
    return schema, json.dumps(schema, sort_keys=False, separators=(",", ":"))


def JSONSchema(schema: Any, tokenizer: Any, *, whitespace: str = r"[ ]?", host: str = "auto",
               max_states: int | None = None, max_transitions: int | None = None):
    """Outputs that are JSON documents valid under a JSON schema, never an invalid one.

    The schema is compiled to a regular language of JSON texts (docs/structured.md lists
    the keywords): every keyword is enforced exactly, or the schema is refused with an
    error naming the keyword and its JSON path. Objects are written with their listed
    properties in the schema's order, then any other allowed properties; strings as
    ``json.dumps(..., ensure_ascii=False)`` writes them; numbers without an exponent where
    bounded. A schema that is valid but not regular (a recursive ``$ref``) or whose
    automaton exceeds the limits runs on the host with llguidance when ``host="auto"``
    and llguidance is installed (:class:`HostJSONSchema`); the others stay on device.

    Args:
      schema: a dict, its JSON text, or a Pydantic model class (``model_json_schema()``).
      tokenizer: as for :func:`Regex`.
      whitespace: the regex for whitespace between JSON tokens (default: one optional
        space, as ``json.dumps`` writes after ``,`` and ``:``; ``""`` for compact JSON).
      host: ``"auto"`` (device, else the host engine), ``"never"`` (device or an
        error) or ``"always"`` (the host engine).
      max_states, max_transitions: as for :func:`Regex`.

    Raises:
      ValueError: a keyword that cannot be enforced (named with its path), an invalid
        schema, or a size limit (with ``host="never"`` or without llguidance).

    Example:
      >>> import jaxsample as js
      >>> from models import ByteTokenizer
      >>> c = js.JSONSchema({"type": "object", "properties": {"ok": {"type": "boolean"}},
      ...                    "required": ["ok"]}, ByteTokenizer())
      >>> c.sizes()["states"] > 10
      True
    """
    fn = "JSONSchema"
    if host not in ("auto", "never", "always"):
        raise ValueError(f"{fn}: host must be 'auto', 'never' or 'always', got {host!r}")
    schema, text = _schema_text(schema, fn)
    ws = _parse_regex_arg(whitespace, fn, "whitespace")
    if host == "always":
        return _host_schema(schema, tokenizer, whitespace, fn, None)
    vocab = _vocabulary(tokenizer)
    key = ("schema", text, whitespace, host, max_states, max_transitions)
    hit = vocab.cache.get(key)
    if hit is not None:
        return hit
    auto = host == "auto" and _H.available()  # route what is slow on device to the host engine
    what = f"schema {text[:200]!r}"
    disjoint: dict = {}  # the subschemas whose oneOf is provably an anyOf (llguidance has no oneOf)
    try:
        node = _S.schema_node(schema, ws, _S.MAX_SUBSCHEMAS if auto else None, disjoint)
    except _S.Unsupported as e:
        raise ValueError(f"{fn}: cannot enforce the schema exactly: {e}") from None
    except _S.NotRegular as e:
        if host == "never":
            raise ValueError(f"{fn}: the schema is not regular ({e}); pass host='auto' with llguidance "
                             f"installed to run it on the host") from None
        return _cached(vocab, key, _host_schema(_S.one_of_as_any_of(schema, disjoint), tokenizer, whitespace, fn,
                                                str(e)))
    except _S.TooBig as e:  # only when auto: the host engine, else the device build after all
        return _cached(vocab, key, _host_or_device(
            _S.one_of_as_any_of(schema, disjoint), tokenizer, whitespace, fn, str(e),
            lambda: _build(_S.schema_node(schema, ws), tokenizer, fn, what, max_states, max_transitions,
                           dfa_cap=_auto_cap(fn, max_states, vocab), seconds=AUTO_BUILD_SECONDS)))

    def device():
        return _build(node, tokenizer, fn, what, max_states, max_transitions, key=key[:4],
                      dfa_cap=_auto_cap(fn, max_states, vocab) if auto else None,
                      seconds=AUTO_BUILD_SECONDS if auto else None)

    cost = _S.cost(node) if auto else 0
    if cost > AUTO_DEVICE_COST:
        why = f"its automaton is estimated at {cost} NFA states (more than AUTO_DEVICE_COST={AUTO_DEVICE_COST})"
        return _cached(vocab, key, _host_or_device(_S.one_of_as_any_of(schema, disjoint), tokenizer, whitespace, fn,
                                                   why, device))
    try:
        return device()
    except ValueError as e:
        if not auto or "max_" not in str(e):
            raise
        return _cached(vocab, key, _host_schema(_S.one_of_as_any_of(schema, disjoint), tokenizer, whitespace, fn,
                                                str(e)))


def _auto_cap(fn: str, max_states, vocab: _Vocab) -> int:
    """The byte-DFA bound of a ``host="auto"`` build: AUTO_DEVICE_STATES, fewer where the
    vocabulary makes each state's mask row large (at most AUTO_DEVICE_BYTES of masks)."""
    by_bytes = max(START + 1, AUTO_DEVICE_BYTES // (4 * _words(vocab.size) + 4))
    return min(2 * _check_limit(fn, "max_states", max_states) + 8, AUTO_DEVICE_STATES, by_bytes)


def _cached(vocab: _Vocab, key: tuple, value):
    if len(vocab.cache) >= _CACHE_SIZE:
        vocab.cache.pop(next(iter(vocab.cache)))
    vocab.cache[key] = value
    return value


def _host_or_device(schema, tokenizer, whitespace, fn, why, device):
    """The host engine; where llguidance refuses the schema, the device build (``device()``) after all."""
    try:
        return _host_schema(schema, tokenizer, whitespace, fn, why)
    except ValueError as host_error:
        try:
            return device()
        except ValueError as e:
            raise ValueError(f"{e}; {host_error}") from None


def _host_schema(schema, tokenizer, whitespace, fn, why):
    try:
        return _H.HostJSONSchema(schema, tokenizer, token_bytes(tokenizer), whitespace=whitespace)
    except ImportError:
        raise ValueError(f"{fn}: {why or 'host=always'}; the host engine needs llguidance: "
                         f"pip install 'jaxsample[structured]'") from None


def Choice(choices: Sequence[str], tokenizer: Any, *, max_states: int | None = None,
           max_transitions: int | None = None) -> Constraint:
    """Outputs that are exactly one of the given strings, then end-of-sequence.

    Example:
      >>> import jaxsample as js
      >>> from models import ByteTokenizer
      >>> js.Choice(["yes", "no"], ByteTokenizer()).sizes()["states"]
      7
    """
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise TypeError(f"Choice: choices must be a list of strings, got {type(choices).__name__}")
    if not choices:
        raise ValueError("Choice: choices must not be empty")
    bad = [c for c in choices if not isinstance(c, str)]
    if bad:
        raise TypeError(f"Choice: every choice must be a str, got {bad[:3]!r}")
    vocab = _vocabulary(tokenizer)
    for c in choices:
        if not _spellable(vocab, c.encode("utf-8")):
            raise ValueError(f"Choice: the choice {c!r} cannot be spelled with the tokenizer's vocabulary")
    node = _A.alt(*(_A.lit(c) for c in choices))
    return _build(node, tokenizer, "Choice", f"choices={list(choices)[:20]!r}", max_states, max_transitions,
                  key=("choice", tuple(choices)))


def stack_constraints(rows: Sequence[Constraint | None], *, max_states: int | None = None,
                      max_transitions: int | None = None) -> Constraint:
    """One constraint per row: ``rows[b]`` constrains row ``b``; ``None`` leaves it free.

    The automata are merged into one table (each distinct constraint object once), and
    each row starts in its own automaton's start state. Padding as for :func:`Regex`, so
    batches of constraints with the same padded size share one compilation.

    Example:
      >>> import jaxsample as js
      >>> from models import ByteTokenizer
      >>> tok = ByteTokenizer()
      >>> c = js.stack_constraints([js.Choice(["a"], tok), None, js.Regex("[0-9]+", tok)])
      >>> c.initial.tolist()
      [2, -1, 6]
    """
    rows = list(rows)
    if not rows:
        raise ValueError("stack_constraints: rows must not be empty")
    for i, r in enumerate(rows):
        if r is not None and not isinstance(r, Constraint):
            raise TypeError(f"stack_constraints: rows[{i}] must be a Constraint or None, got {type(r).__name__}")
        if r is not None and np.ndim(r.initial) != 0:
            raise ValueError(f"stack_constraints: rows[{i}] is already per-row (initial of shape "
                             f"{np.shape(r.initial)}); stack single constraints")
    parts = [r for r in rows if r is not None]
    if not parts:
        raise ValueError("stack_constraints: every row is None; use no constraint instead")
    vocab_size, words = parts[0].vocab_size, parts[0].allowed.shape[1]
    for r in parts:
        if (r.vocab_size, r.allowed.shape[1]) != (vocab_size, words):
            raise ValueError(f"stack_constraints: constraints built for different vocabularies "
                             f"({vocab_size} and {r.vocab_size} tokens)")
    unique: dict[int, int] = {}  # id(constraint) -> its state offset
    allowed, offsets, targets, s_off, t_off = [], [], [], 0, 0
    for r in parts:
        if id(r) in unique:
            continue
        table = _trim(*(np.asarray(a) for a in (r.allowed, r.offsets, r.targets)))
        allowed.append(table.allowed)
        offsets.append(table.offsets + t_off)
        targets.append(table.targets + s_off)
        unique[id(r)] = s_off + int(np.asarray(r.initial))
        s_off += table.allowed.shape[0]
        t_off += table.targets.shape[0]
    table = _Table(np.concatenate(allowed), np.concatenate(offsets).astype(np.int32), np.concatenate(targets))
    initial = np.array([-1 if r is None else unique[id(r)] for r in rows], np.int32)
    return _padded(table, initial, vocab_size, max_states, max_transitions, "stack_constraints")

