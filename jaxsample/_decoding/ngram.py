"""Corpus n-gram draft for speculative decoding: a hashed table of next-token predictions.

`NGramDraft` proposes k tokens per row by chaining a backed-off n-gram predictor built
from a corpus (e.g. the target model's training text):

    d_1 = f(last N tokens of the context),  d_2 = f(last N tokens of context + d_1), ...
    f(c) = the most frequent next token after the longest suffix of c (order n = N .. 1)
           whose most frequent continuation was seen at least `min_count` times in the
           corpus; the most frequent token overall when no suffix was seen.

Optionally a match in the row's own context comes first (`prompt_lookup=n`: the
`PromptLookup(n, n)` proposal when the last n tokens occurred earlier in the row). The
draft is deterministic, so q is a point mass and speculative decoding stays exact
(`speculative_generate` accepts d_j with probability p(d_j)).

Table layout (pruned without loss, open addressing, looked up on device):
  * an order-n context is stored only when its prediction differs from what the
    stored orders below it predict (its backoff), so the table reproduces f exactly
    with a fraction of the contexts;
  * context hash h (uint32, `_context_hashes`): slot h mod S, linear probing over
    `probes` slots; a slot holds the fingerprint `fmix(h ^ salt) | 1` (0: empty) and
    the predicted token. An entry that finds no free slot within `probes` is dropped
    (`NGramDraft.build` reports how many); a 32-bit fingerprint collision can only
    cost acceptance, never exactness.
One proposal costs one gather of [B, N, probes] slots, no host callback.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample import _validation as _val
from jaxsample._files import atomic_file
from jaxsample._decoding.drafts import lookup

__all__ = ["NGramDraft", "MAX_NGRAM", "MAX_PROBES", "MAX_SLOTS"]

#: The longest context a table may use. A proposal hashes N tokens and gathers N * probes
#: slots, unrolled k times in the compiled program: compile time and memory grow with
#: N * k (a forged table with N = 2000 took 10 GB). Longer contexts add nothing a
#: 5-gram misses on real text (docs/limits.md).
MAX_NGRAM = 32
#: The most slots a lookup may probe ([B, N, probes] gathers per proposal).
MAX_PROBES = 64
#: The most slots a table may have (keys + values: 8 bytes a slot, 2 GiB at the bound).
MAX_SLOTS = 2 ** 28

_FORMAT = "jaxsample.ngram_draft"
_VERSION = "1"
_SEED = 0x2545F491
_GOLDEN = 0x9E3779B1
_SALT = 0x5BD1E995
_INFO = ("tokens", "entries", "dropped", "min_count")
_TENSORS = ("keys", "values", "fallback", "stats")


def _fmix(h, xp):
    """murmur3's 32-bit finaliser (a bijection on uint32); xp is numpy or jax.numpy."""
    h = h ^ (h >> 16)
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _extend_hash(h, token, xp):
    """Hash of a context extended one token further into the past: uint32 [...]."""
    return _fmix(h + (token.astype(xp.uint32) + xp.uint32(1)) * xp.uint32(_GOLDEN), xp)


def _fingerprint(h, xp):
    return _fmix(h ^ xp.uint32(_SALT), xp) | xp.uint32(1)  # never 0 (the empty slot)


def _context_hashes(window, xp):
    """window [..., N] (most recent token last) -> uint32 [..., N]: entry n - 1 hashes the last n tokens.

    The same function builds the table (NumPy) and looks it up (jax.numpy)."""
    n_max = window.shape[-1]
    h = xp.full(window.shape[:-1], _SEED, xp.uint32)
    out = []
    for n in range(1, n_max + 1):
        h = _extend_hash(h, window[..., n_max - n], xp)
        out.append(h)
    return xp.stack(out, axis=-1)


def _check_score_range(max_ngram: int, vocab_size: int, where: str) -> None:
    """`predict` ranks hits by ``order * vocab_size + token`` in int32."""
    if (max_ngram + 1) * vocab_size >= 2 ** 31:
        raise ValueError(f"{where}: max_ngram={max_ngram} with vocab_size={vocab_size} is too large "
                         f"((max_ngram + 1) * vocab_size must stay below 2**31)")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    value = _val.check_int(name, value, low=low, fn="NGramDraft", expected=f"an int >= {low}")
    if high is not None and value > high:
        raise ValueError(f"NGramDraft: {name}={value} exceeds the bound {high} (docs/limits.md)")
    return value


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NGramDraft:
    """A draft for `speculative_generate`: n-gram predictions from a corpus, chained k times.

    Build it from token ids with `NGramDraft.build`, save it with `save`, load it with
    `NGramDraft.load`; the shipped Shakespeare model's table is
    `models.load_ngram_draft()`. It is a pytree (the table arrays are leaves, the rest
    static), so a jitted caller takes it as data: another table of the same shape does
    not recompile.

    Attributes:
      keys: uint32 [S] slot fingerprints (0: empty), S a power of two.
      values: int32 [S] the predicted next token of each slot.
      fallback: int32 [] the corpus' most frequent token (order 0).
      stats: int32 [4] about the build: corpus tokens, stored entries, dropped entries
        (no free slot within `probes`), min_count (data, so it never recompiles;
        `info` names them).
      max_ngram: N, the longest context used (static).
      probes: slots searched per context (static).
      vocab_size: the token vocabulary the table was built for (static; checked against
        the target model).
      prompt_lookup: 0, or n: when the row's last n tokens occurred earlier in its own
        context, propose what followed them (`PromptLookup(n, n)`) instead (static).

    Example:
      >>> import numpy as np, jaxsample as js
      >>> corpus = np.frombuffer(b"to be or not to be, that is the question", np.uint8)
      >>> draft = js.NGramDraft.build(corpus, vocab_size=256, max_ngram=3, min_count=1)
      >>> bytes(np.asarray(draft.continuation(np.frombuffer(b"not t", np.uint8)[None], np.array([5]), 4))[0]
      ...       .astype(np.uint8))
      b'o be'
    """

    keys: jax.Array
    values: jax.Array
    fallback: jax.Array
    stats: jax.Array
    max_ngram: int = dataclasses.field(metadata=dict(static=True))
    probes: int = dataclasses.field(metadata=dict(static=True))
    vocab_size: int = dataclasses.field(metadata=dict(static=True))
    prompt_lookup: int = dataclasses.field(default=0, metadata=dict(static=True))

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, tokens, *, vocab_size: int, weights=None, max_ngram: int = 5, min_count: int = 4,
              probes: int = 8, load_factor: float = 0.5, prompt_lookup: int = 0) -> "NGramDraft":
        """Counts every context of 1..max_ngram tokens and its next token; stores the pruned table.

        Deterministic: ties between next tokens go to the smaller id, and entries are
        placed in a fixed order.

        Args:
          tokens: int [T] (an array or a list of ints), or a sequence of such arrays
            (documents): a context never spans two arrays.
          vocab_size: every token must lie in [0, vocab_size).
          weights: None (all 1), or one int >= 0 per array of `tokens`: each of its
            occurrences counts that many times (e.g. to weigh text the target model
            generated above the raw corpus).
          max_ngram: N in [1, MAX_NGRAM = 32], the longest context.
          min_count: a context of order >= 2 is used only when its most frequent next
            token was seen (weighted) at least this often after it (rarer ones back off
            to shorter contexts), >= 1.
          probes: slots searched per lookup, in [1, MAX_PROBES = 64].
          load_factor: target entries / slots, in (0, 1]; S is the next power of two.
          prompt_lookup: see the class attributes (0: off).

        Returns:
          The draft; `info` names the corpus size, the stored entries and the
          dropped ones (entries without a free slot).
        """
        vocab_size = _check_int("vocab_size", vocab_size, 1)
        max_ngram = _check_int("max_ngram", max_ngram, 1, MAX_NGRAM)
        _check_score_range(max_ngram, vocab_size, "NGramDraft")
        min_count = _check_int("min_count", min_count, 1)
        probes = _check_int("probes", probes, 1, MAX_PROBES)
        prompt_lookup = _check_int("prompt_lookup", prompt_lookup, 0)
        if not isinstance(load_factor, (int, float)) or isinstance(load_factor, bool) or not 0 < load_factor <= 1:
            raise ValueError(f"NGramDraft: load_factor must be a float in (0, 1], got {load_factor!r}")
        single = isinstance(tokens, (np.ndarray, jax.Array)) or (
            isinstance(tokens, (list, tuple)) and len(tokens) > 0 and np.isscalar(tokens[0]))
        docs = [tokens] if single else list(tokens)
        if not docs:
            raise ValueError("NGramDraft: tokens is an empty sequence")
        docs = [np.asarray(d) for d in docs]
        weights = [1] * len(docs) if weights is None else list(weights)
        if len(weights) != len(docs):
            raise ValueError(f"NGramDraft: weights has {len(weights)} entries for {len(docs)} token arrays")
        for i, (d, w) in enumerate(zip(docs, weights)):
            where = "tokens" if single else f"tokens[{i}]"
            if d.ndim != 1 or not (np.issubdtype(d.dtype, np.integer) or d.size == 0):
                raise ValueError(f"NGramDraft: {where} must be a 1-D integer array, got shape {d.shape} "
                                 f"dtype {d.dtype}")
            if d.size and (d.min() < 0 or d.max() >= vocab_size):
                bad = int(np.flatnonzero((d < 0) | (d >= vocab_size))[0])
                raise ValueError(f"NGramDraft: {where}[{bad}]={d[bad]} is outside the vocabulary [0, {vocab_size})")
            _check_int(f"weights[{i}]", w, 0)
        x = np.concatenate(docs).astype(np.int64)
        m = x.size
        lengths = np.array([d.size for d in docs])
        start = np.repeat(np.cumsum(lengths) - lengths, lengths)  # first index of each position's array
        weight = np.repeat(np.asarray(weights, np.int64), lengths)
        if not np.any((weight > 0) & (np.arange(m) > start)):
            raise ValueError("NGramDraft: no context to count (every array is shorter than 2 tokens or has "
                             "weight 0)")
        fallback = int(np.bincount(x, weights=weight, minlength=vocab_size).argmax())
        h = np.full(m, _SEED, np.uint32)  # h[i]: hash of the order-n context x[i-n:i] (i >= n)
        eff = np.full(m, fallback, np.int64)  # what the table stored so far predicts at position i
        ent_h, ent_v = [], []
        for n in range(1, max_ngram + 1):
            h[n:] = _extend_hash(h[n:], x[:m - n], np)
            key, nxt, eff_n = h[n:], x[n:], eff[n:]
            valid = np.arange(n, m) - n >= start[n:]  # the context lies inside one array
            counted = valid & (weight[n:] > 0)
            pairs, inverse = np.unique((key[counted].astype(np.uint64) << np.uint64(32))
                                       | nxt[counted].astype(np.uint64), return_inverse=True)  # by (context, next)
            counts = np.bincount(inverse.reshape(-1), weights=weight[n:][counted]).astype(np.int64)
            ctx = (pairs >> np.uint64(32)).astype(np.uint32)
            order = np.lexsort((-counts, ctx))  # per context: highest count first, then smaller id (stable)
            ctx, nx, counts = ctx[order], (pairs[order] & np.uint64(0xFFFFFFFF)).astype(np.int64), counts[order]
            first = np.r_[True, ctx[1:] != ctx[:-1]] if ctx.size else np.zeros(0, bool)
            ctx, nx, counts = ctx[first], nx[first], counts[first]
            if not ctx.size:
                break
            at = np.minimum(np.searchsorted(ctx, key), ctx.size - 1)
            pred = nx[at]
            count = np.where(valid & (ctx[at] == key), counts[at], 0)  # uncounted context: 0
            use = (count >= min_count) | ((n == 1) & (count > 0))
            store = use & (pred != eff_n)  # lossless pruning: only what the backoff gets wrong
            eff[n:] = np.where(use, pred, eff_n)
            stored, idx = np.unique(key[store], return_index=True)
            ent_h.append(stored)
            ent_v.append(pred[store][idx])
        ent_h, ent_v = np.concatenate(ent_h), np.concatenate(ent_v)
        # At least `probes` slots: a lookup never probes past the table (or `load` refuses it).
        size = 1 << max(int(np.ceil(np.log2(max(ent_h.size, 1) / load_factor))), (probes - 1).bit_length(), 1)
        if size > MAX_SLOTS:
            raise ValueError(f"NGramDraft: {ent_h.size} entries at load_factor={load_factor} need {size} slots, "
                             f"above the bound MAX_SLOTS={MAX_SLOTS} (docs/limits.md): raise min_count or "
                             f"lower max_ngram")
        keys, values, dropped = _place(ent_h, ent_v, size, probes)
        stats = jnp.asarray([m, ent_h.size, dropped, min_count], jnp.int32)
        return cls(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(fallback, jnp.int32), stats, max_ngram, probes,
                   vocab_size, prompt_lookup)

    def replace(self, **changes) -> "NGramDraft":
        """A copy with some fields changed, e.g. `draft.replace(prompt_lookup=5)`."""
        if "prompt_lookup" in changes:
            _check_int("prompt_lookup", changes["prompt_lookup"], 0)
        if "max_ngram" in changes:
            _check_int("max_ngram", changes["max_ngram"], 1, MAX_NGRAM)
        if "probes" in changes:
            _check_int("probes", changes["probes"], 1, MAX_PROBES)
        return dataclasses.replace(self, **changes)

    @property
    def info(self) -> dict[str, int]:
        """The build's `stats` by name: tokens, entries, dropped, min_count."""
        return dict(zip(_INFO, np.asarray(self.stats).tolist()))

    @property
    def num_slots(self) -> int:
        return int(self.keys.shape[0])

    @property
    def num_entries(self) -> int:
        """Stored contexts (occupied slots)."""
        return int(np.count_nonzero(np.asarray(self.keys)))

    # ------------------------------------------------------------------ files

    def save(self, path: str, **metadata: str) -> None:
        """Writes the table to a safetensors file, atomically (temp file + rename).

        Extra string `metadata` (e.g. the corpus it was built from) is stored with it.
        `prompt_lookup` is a drafting option, not table data: it is not saved.
        """
        from safetensors.numpy import save_file

        meta = {"format": _FORMAT, "version": _VERSION, "max_ngram": str(self.max_ngram),
                "probes": str(self.probes), "vocab_size": str(self.vocab_size)}
        meta.update({k: str(v) for k, v in self.info.items()})
        reserved = sorted(set(metadata) & set(meta))
        if reserved:
            raise ValueError(f"NGramDraft.save: metadata keys {reserved} are reserved (the table's own fields)")
        meta.update({k: str(v) for k, v in metadata.items()})
        tensors = {"keys": np.asarray(self.keys, np.uint32), "values": np.asarray(self.values, np.int32),
                   "fallback": np.asarray(self.fallback, np.int32).reshape(1),
                   "stats": np.asarray(self.stats, np.int32)}
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str, *, prompt_lookup: int = 0) -> "NGramDraft":
        """Reads a table written by `save`; a missing, foreign, inconsistent or oversized file
        raises ValueError.

        Every size the file declares (its metadata and its tensors' shapes) is checked
        against the bounds (`MAX_NGRAM`, `MAX_PROBES`, `MAX_SLOTS`, docs/limits.md) before
        any tensor is read.
        """
        from safetensors import SafetensorError, safe_open

        prompt_lookup = _check_int("prompt_lookup", prompt_lookup, 0)
        if not os.path.isfile(path):
            raise ValueError(f"NGramDraft.load: no such file: {path!r}")
        try:
            with safe_open(path, framework="numpy") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                ints = cls._check_header(path, meta, names)
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in _TENSORS}
                cls._check_shapes(path, shapes)
                tensors = {k: f.get_tensor(k) for k in _TENSORS}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"NGramDraft.load: {path!r} is not a safetensors file ({e})") from None
        keys, values, fallback = tensors["keys"], tensors["values"], tensors["fallback"]
        s = keys.shape[0]
        if keys.dtype != np.uint32:
            raise ValueError(f"NGramDraft.load: {path!r} keys must be uint32 [S] with S a power of two, "
                             f"got {keys.dtype} {keys.shape}")
        if values.dtype != np.int32:
            raise ValueError(f"NGramDraft.load: {path!r} values must be int32 {keys.shape}, "
                             f"got {values.dtype} {values.shape}")
        if fallback.dtype != np.int32:
            raise ValueError(f"NGramDraft.load: {path!r} fallback must be int32 [1], got {fallback.dtype} "
                             f"{fallback.shape}")
        v = ints["vocab_size"]
        used = values[keys != 0]
        if (used.size and (used.min() < 0 or used.max() >= v)) or not 0 <= fallback[0] < v:
            raise ValueError(f"NGramDraft.load: {path!r} holds token ids outside its vocabulary [0, {v})")
        if tensors["stats"].dtype != np.int32:
            raise ValueError(f"NGramDraft.load: {path!r} stats must be int32 [{len(_INFO)}], got "
                             f"{tensors['stats'].dtype} {tensors['stats'].shape}")
        if ints["probes"] > s:
            raise ValueError(f"NGramDraft.load: {path!r} probes={ints['probes']} exceeds the {s} slots")
        return cls(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(fallback[0]), jnp.asarray(tensors["stats"]),
                   ints["max_ngram"], ints["probes"], v, prompt_lookup)

    @staticmethod
    def _check_header(path: str, meta: dict, names: set) -> dict[str, int]:
        """The format, version, tensor names and bounded sizes of a table file's header."""
        if meta.get("format") != _FORMAT:
            raise ValueError(f"NGramDraft.load: {path!r} is not an n-gram draft table "
                             f"(metadata format={meta.get('format')!r}, expected {_FORMAT!r})")
        if meta.get("version") != _VERSION:
            raise ValueError(f"NGramDraft.load: {path!r} has table version {meta.get('version')!r}; "
                             f"this jaxsample reads version {_VERSION!r} (rebuild the table)")
        missing = set(_TENSORS) - names
        if missing:
            raise ValueError(f"NGramDraft.load: {path!r} lacks tensor(s) {sorted(missing)}")
        ints = {}
        for name, high in (("max_ngram", MAX_NGRAM), ("probes", MAX_PROBES), ("vocab_size", None)):
            text = meta.get(name)
            if not isinstance(text, str) or not re.fullmatch(r"\s*[-+]?\d{1,12}\s*", text):  # no 10**4000
                raise ValueError(f"NGramDraft.load: {path!r} metadata {name}={text!r} is not an int")
            ints[name] = int(text)
            if ints[name] < 1:
                raise ValueError(f"NGramDraft.load: {path!r} metadata {name}={ints[name]} must be >= 1")
            if high is not None and ints[name] > high:
                raise ValueError(f"NGramDraft.load: {path!r} metadata {name}={ints[name]} exceeds the bound "
                                 f"{high} (docs/limits.md): a forged or foreign table")
        _check_score_range(ints["max_ngram"], ints["vocab_size"], f"NGramDraft.load: {path!r}")
        return ints

    @staticmethod
    def _check_shapes(path: str, shapes: dict[str, tuple[int, ...]]) -> None:
        """The declared tensor shapes, before any tensor is read."""
        keys = shapes["keys"]
        s = keys[0] if len(keys) == 1 else 0
        if s < 1 or s & (s - 1):
            raise ValueError(f"NGramDraft.load: {path!r} keys must be uint32 [S] with S a power of two, "
                             f"got shape {keys}")
        if s > MAX_SLOTS:
            raise ValueError(f"NGramDraft.load: {path!r} has {s} slots, above the bound MAX_SLOTS={MAX_SLOTS} "
                             f"(docs/limits.md)")
        if shapes["values"] != keys:
            raise ValueError(f"NGramDraft.load: {path!r} values must be int32 {keys}, got shape {shapes['values']}")
        if shapes["fallback"] != (1,):
            raise ValueError(f"NGramDraft.load: {path!r} fallback must be int32 [1], got shape {shapes['fallback']}")
        if shapes["stats"] != (len(_INFO),):
            raise ValueError(f"NGramDraft.load: {path!r} stats must be int32 [{len(_INFO)}], got shape "
                             f"{shapes['stats']}")

    # ------------------------------------------------------------------ drafting

    def predict(self, window: jax.Array, available: jax.Array) -> jax.Array:
        """The next token after each row's context: window int [B, N] (most recent last),
        available int [B] (how many of the window's last tokens are real) -> int32 [B]."""
        mask = self.keys.shape[0] - 1
        h = _context_hashes(window, jnp)  # [B, N]
        slots = (h[..., None] + jnp.arange(self.probes, dtype=jnp.uint32)) & jnp.uint32(mask)  # [B, N, P]
        usable = jnp.arange(1, self.max_ngram + 1) <= available[:, None]  # [B, N]: order n fits the context
        hit = (self.keys[slots] == _fingerprint(h, jnp)[..., None]) & usable[..., None]
        # One reduction picks the longest order with a hit and its token: order-major score.
        order = jnp.arange(self.max_ngram, dtype=jnp.int32)[:, None] * self.vocab_size  # [N, 1]
        best = jnp.max(jnp.where(hit, order + self.values[slots], -1), axis=(1, 2))  # [B]
        return jnp.where(best >= 0, best % self.vocab_size, self.fallback).astype(jnp.int32)

    def start(self, prompt_tokens: jax.Array, prompt_lengths: jax.Array, cache_size: int, n: int) -> Any:
        """The draft protocol (`jaxsample._decoding.drafts`): no state."""
        return ()

    def propose(self, state: Any, ctx: Any, k: int) -> tuple[jax.Array, None, Any]:
        """The draft protocol: :meth:`continuation` of every row's context, a point mass."""
        return self.continuation(ctx.seq, ctx.length, k), None, state

    def continuation(self, seq: jax.Array, length: jax.Array, k: int) -> jax.Array:
        """k proposals per row after the context seq[b, :length[b]] (seq int [B, W], length
        int [B] >= 1): int32 [B, k]. Jittable; k is static."""
        seq = jnp.asarray(seq).astype(jnp.int32)
        length = jnp.asarray(length).astype(jnp.int32)
        n = self.max_ngram
        idx = length[:, None] - n + jnp.arange(n)[None, :]
        window = jnp.take_along_axis(seq, jnp.clip(idx, 0, seq.shape[1] - 1), axis=1)  # [B, N]
        available = length
        out = []
        for _ in range(k):
            token = self.predict(window, available)
            out.append(token)
            window = jnp.concatenate([window[:, 1:], token[:, None]], axis=1)
            available = available + 1
        proposals = jnp.stack(out, axis=1)
        if self.prompt_lookup:
            matched, found = lookup(seq, length, self.prompt_lookup, k, self.prompt_lookup)
            proposals = jnp.where(found[:, None], matched, proposals)
        return proposals


def _place(hashes: np.ndarray, values: np.ndarray, size: int, probes: int):
    """Open addressing with linear probing, in entry order: (keys uint32 [S], values int32 [S], dropped)."""
    keys = np.zeros(size, np.uint32)
    table = np.zeros(size, np.int32)
    fps = _fingerprint(hashes, np)
    pending = np.arange(hashes.size)
    for p in range(probes):
        slots = (hashes[pending] + np.uint32(p)) & np.uint32(size - 1)
        free = keys[slots] == 0
        cand, cslots = pending[free], slots[free]
        _, first = np.unique(cslots, return_index=True)  # the earliest entry wins a contested slot
        win = cand[first]
        keys[cslots[first]] = fps[win]
        table[cslots[first]] = values[win]
        placed = np.zeros(hashes.size, bool)
        placed[win] = True
        pending = pending[~placed[pending]]
        if not pending.size:
            break
    return keys, table, int(pending.size)
