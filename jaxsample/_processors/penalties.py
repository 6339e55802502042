"""History-aware penalties and stateful / stochastic samplers, as processors.

Every class here is a :class:`jaxsample.LogitsProcessor` pytree (values are traced
leaves: changing one never recompiles; only shapes and ``static`` options are part of
the structure). Semantics follow ``docs/sampling.md`` ("History-aware penalties",
"Adaptive and stochastic filters"); each docstring names the system it matches.

State. A processor that needs the tokens so far keeps a :class:`History` per row: a
buffer ``int32[B, C]`` of the last tokens (oldest first) and a count ``int32[B]``,
initialised from the prompt by ``init`` and appended to by ``update``. Its capacity
``C`` is static: prompt width ``P`` + ``max_new_tokens`` (generation passes it to
``init``), so in generation nothing is ever dropped. Counts, "seen" masks and n-gram
matches are derived from the buffer at each step (one scatter / a few vectorised
passes over it); windows ("the last N tokens") are masks over buffer positions with a
traced ``N``, so changing ``N`` never recompiles. Mirostat keeps ``mu`` (``float32[B]``),
:class:`MinNewTokens` a step count (``int32[B]``).

The same ``init``/``apply``/``update`` functions work outside :func:`jaxsample.generate`,
in a user's own loop (:func:`jaxsample.sample_step` runs one step)::

    state = chain.init(prompt_tokens, prompt_lengths, V, max_new_tokens=N)
    for i in range(N):
        token, state, out = js.sample_step(chain, logits, state, step_keys)

Stateful processors work on ``logits[B, V]`` (one row per state row); each numeric
value is a scalar or one value per row (``[B]``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample._filters import filters as _filters
from jaxsample._filters import sampling as _sampling
from jaxsample import _validation as _val
from jaxsample._processors.base import LogitsProcessor, _leaf, _set, processor_dataclass, static_field

__all__ = [
    "History",
    "RepetitionPenalty",
    "PresenceFrequencyPenalty",
    "NoRepeatNGram",
    "BadWords",
    "MinNewTokens",
    "DRY",
    "XTC",
    "MirostatV2",
    "DynamicTemperature",
]

Array = jax.Array
ArrayLike = Any

_F32 = jnp.float32
_I32 = jnp.int32
_LN2 = math.log(2.0)
_INF = math.inf
#: llama.cpp clamps DRY's exponent to ``FLOAT_MAX_LOG / ln(base)`` so base**e stays finite.
_FLOAT_MAX_LOG = 88.7228391


# ----------------------------------------------------------------------------- history


class History(NamedTuple):
    """The last tokens of every row, oldest first: the state of history-aware processors.

    Attributes:
      tokens: ``int32[B, C]``; row ``b`` holds its last ``count[b]`` tokens in
        ``tokens[b, :count[b]]`` (oldest first) and ``-1`` after them. ``C`` is static.
      count: ``int32[B]``, tokens held (``<= C``).

    When a row is full, appending drops its oldest token (a sliding window of ``C``).

    Example:
      >>> import jax.numpy as jnp
      >>> h = History.create(jnp.array([[5, 6, 7]]), jnp.array([2]), capacity=4)
      >>> h.append(jnp.array([9])).tokens
      Array([[ 5,  6,  9, -1]], dtype=int32)
    """

    tokens: Array
    count: Array

    @classmethod
    def create(
        cls,
        prompt_tokens: ArrayLike,
        prompt_lengths: ArrayLike,
        capacity: int,
        include_prompt: bool = True,
    ) -> "History":
        """The last ``capacity`` prompt tokens of each row (none if not ``include_prompt``)."""
        tokens = jnp.asarray(prompt_tokens, _I32)  # [B, P]
        lengths = jnp.asarray(prompt_lengths, _I32)  # [B]
        b, p = tokens.shape
        if not include_prompt:
            return cls(jnp.full((b, capacity), -1, _I32), jnp.zeros((b,), _I32))
        held = jnp.minimum(lengths, capacity)  # [B]
        j = jnp.arange(capacity)
        source = jnp.clip(lengths[:, None] - held[:, None] + j, 0, p - 1)  # [B, C]
        values = jnp.take_along_axis(tokens, source, axis=1)
        return cls(jnp.where(j < held[:, None], values, -1), held)

    def append(self, token: ArrayLike) -> "History":
        """Appends ``token`` (``int32[B]``) to every row; ``-1`` ("no token") is skipped."""
        return _append(self, jnp.asarray(token, _I32))


@jax.jit
def _append(history: History, token: Array) -> History:
    b, c = history.tokens.shape
    full = history.count >= c
    shifted = jnp.where(full[:, None], jnp.roll(history.tokens, -1, axis=1), history.tokens)
    tokens = shifted.at[jnp.arange(b), jnp.minimum(history.count, c - 1)].set(token)
    valid = token >= 0
    return History(
        jnp.where(valid[:, None], tokens, history.tokens),
        jnp.where(valid, jnp.minimum(history.count + 1, c), history.count),
    )


def _window_start(count: Array, window: ArrayLike) -> Array:
    """First buffer position of the last ``window`` tokens (``window = 0``: all), ``[B]``."""
    w = jnp.asarray(window, _I32)
    return jnp.where(w > 0, jnp.maximum(count - w, 0), 0)


def _window_counts(tokens: Array, count: Array, window: ArrayLike, vocab_size: int) -> Array:
    """Occurrences of every token among the last ``window`` held tokens, ``float32[B, V]``."""
    b, c = tokens.shape
    j = jnp.arange(c)
    start = _window_start(count, window)
    inside = (j >= start[:, None]) & (j < count[:, None]) & (tokens >= 0)
    ids = jnp.where(inside, tokens, vocab_size)  # out of range -> dropped
    rows = jnp.arange(b)[:, None]
    return jnp.zeros((b, vocab_size), _F32).at[rows, ids].add(1.0, mode="drop")


def _token_mask(tokens: Array, hit: Array, vocab_size: int) -> Array:
    """``bool[B, V]``: True at ``tokens[b, j]`` for every ``j`` with ``hit[b, j]``."""
    b = tokens.shape[0]
    ids = jnp.where(hit & (tokens >= 0), tokens, vocab_size)
    rows = jnp.arange(b)[:, None]
    return jnp.zeros((b, vocab_size), bool).at[rows, ids].set(True, mode="drop")


def _suffix_matches(tokens: Array, count: Array, start: Array, cap: Array) -> Array:
    """How far the context before each position repeats the end of the context.

    ``m[b, j]`` is the largest ``k <= cap[b]`` with ``tokens[j - i] == tokens[count - i]``
    for ``i = 1 .. k`` and ``j - k >= start[b]``: the length of the longest suffix of
    the whole context that also ends just before position ``j`` (inside the window).
    Emitting ``tokens[j]`` next would then repeat ``m + 1`` tokens. Only ``j < count``
    are meaningful.

    One vectorised pass over the buffer per matched length, in a ``while_loop`` that
    stops as soon as no row still matches (cost ``O(B * C * (longest match + 1))``).
    """
    b, c = tokens.shape
    j = jnp.arange(c)[None, :]  # [1, C]
    start = start[:, None]
    cap = cap[:, None]

    def body(carry):
        i, alive, m = carry
        earlier = jnp.take_along_axis(tokens, jnp.clip(j - i, 0, c - 1), axis=1)  # [B, C]
        tail = jnp.take_along_axis(tokens, jnp.clip(count - i, 0, c - 1)[:, None], axis=1)
        alive = alive & (i <= cap) & (j - i >= start) & (earlier == tail)
        return i + 1, alive, m + alive.astype(_I32)

    alive = j < count[:, None]  # [B, C]
    m = jnp.zeros((b, c), _I32)
    _, _, m = jax.lax.while_loop(lambda s: jnp.any(s[1]), body, (jnp.int32(1), alive, m))
    return m


# ----------------------------------------------------------------------------- helpers


def _check_prompts(fn: str, prompt_tokens: Any, prompt_lengths: Any) -> tuple[Array, Array]:
    if prompt_tokens is None or prompt_lengths is None:
        raise ValueError(
            f"{fn}.init: pass the prompts (int [B, P]) and their lengths (int [B]); "
            f"the processor keeps per-row state initialised from them"
        )
    tokens = jnp.asarray(prompt_tokens)
    lengths = jnp.asarray(prompt_lengths)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(
            f"{fn}.init: prompt_tokens must be [B, P] and prompt_lengths [B], got shapes "
            f"{tokens.shape} and {lengths.shape}"
        )
    return tokens.astype(_I32), lengths.astype(_I32)


def _check_logits_rows(fn: str, logits: Any, batch: int) -> Array:
    _val.check_logits(logits, fn)
    logits = jnp.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != batch:
        raise ValueError(
            f"{fn}: logits must be [B, V] with B = {batch} (the rows of the state), "
            f"got logits of shape {logits.shape}"
        )
    return logits


def _check_values(fn: str, batch_shape: tuple[int, ...], **values: Any) -> None:
    for name, value in values.items():
        _val.check_batch_shape(fn, name, value, batch_shape)


def _float_field(obj: Any, name: str, low: float, high: float, *, low_closed: bool = True,
                 high_closed: bool = False) -> None:
    """Validates and canonicalises a float field (Python float, or an array leaf)."""
    fn = type(obj).__name__
    _val.check_range(fn, name, getattr(obj, name), low, high, low_closed=low_closed, high_closed=high_closed)
    _set(obj, name, _leaf(fn, name, getattr(obj, name), np.float32))  # checked as given, then cast


def _int_field(obj: Any, name: str, low: int = 0) -> None:
    """Validates and canonicalises a non-negative integer field."""
    fn = type(obj).__name__
    _val.check_range(fn, name, getattr(obj, name), low, _INF, low_closed=True, high_closed=False)
    _val.check_integer(fn, name, getattr(obj, name))  # checked as given, then cast
    _set(obj, name, _leaf(fn, name, getattr(obj, name), np.int32))


def _ids_field(obj: Any, name: str, ndim: tuple[int, ...]) -> None:
    """Token-id field: host lists become int32 arrays; ``-1`` is padding."""
    fn = type(obj).__name__
    value = getattr(obj, name)
    if isinstance(value, (list, tuple)):
        value = np.asarray(value, np.int32) if len(value) else np.zeros((0,), np.int32)
    if np.ndim(value) not in ndim:
        raise ValueError(f"{fn}: {name} must have {' or '.join(map(str, ndim))} axes, got shape "
                         f"{np.shape(value)}")
    _val.check_token_ids(fn, name, value, None)
    _set(obj, name, _leaf(fn, name, value, np.int32))


def _col(value: ArrayLike, dtype=_F32) -> Array:
    """A scalar or ``[B]`` value as ``[B, 1]`` (or ``[1]``) to broadcast against ``[B, V]``."""
    return jnp.asarray(value, dtype)[..., None]


def _rows(value: ArrayLike, batch: int, dtype) -> Array:
    return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))


class _HistoryProcessor(LogitsProcessor):
    """A processor whose state is a :class:`History` (capacity ``P + max_new_tokens``)."""

    stateful: ClassVar[bool] = True

    def _include_prompt(self) -> bool:
        return True

    def _capacity(self, prompt_width: int, max_new_tokens: int | None) -> int:
        if max_new_tokens is None:
            raise ValueError(
                f"{type(self).__name__}.init: pass max_new_tokens=N (its history buffer is "
                f"static: the prompt plus N generated tokens); generate passes it"
            )
        _val.check_int("max_new_tokens", max_new_tokens, low=0, fn=f"{type(self).__name__}.init")
        width = prompt_width if self._include_prompt() else 0
        return max(width + int(max_new_tokens), 1)

    def init(self, prompt_tokens, prompt_lengths, vocab_size, *, max_new_tokens=None) -> History:
        """A :class:`History` of the prompts (``max_new_tokens`` sizes the buffer)."""
        tokens, lengths = _check_prompts(type(self).__name__, prompt_tokens, prompt_lengths)
        self._check_vocab(vocab_size)
        capacity = self._capacity(tokens.shape[1], max_new_tokens)
        return History.create(tokens, lengths, capacity, self._include_prompt())

    def _check_vocab(self, vocab_size: int) -> None:
        del vocab_size

    def update(self, state: History, token: Array, processed_logits: Array) -> History:
        return state.append(token)


# ----------------------------------------------------------------------------- penalties


@processor_dataclass
class RepetitionPenalty(_HistoryProcessor):
    """Repetition penalty over prompt + output (transformers, vLLM, llama.cpp).

    Math: for every token seen among the last ``window`` tokens of prompt + output
    (``window = 0``: all of them), ``x -> x / r`` if ``x > 0`` else ``x * r``.
    ``r = 1`` is the identity; ``r > 1`` discourages repeats.

    Attributes:
      penalty: ``r > 0``, scalar or one per row.
      window: ``int >= 0``, scalar or one per row (traced: changing it never
        recompiles); ``0`` means the whole history. (llama.cpp's ``repeat_last_n``;
        there 0 disables the penalty.)

    Example:
      >>> import jax.numpy as jnp
      >>> p = RepetitionPenalty(2.0)
      >>> s = p.init(jnp.array([[1, 2]]), jnp.array([2]), 4, max_new_tokens=3)
      >>> p.apply(jnp.array([[1.0, 1.0, -1.0, 1.0]]), s, None)
      Array([[ 1. ,  0.5, -2. ,  1. ]], dtype=float32)
    """

    identity: ClassVar[dict[str, Any]] = {"penalty": 1.0}  # `prune` drops it
    penalty: ArrayLike = 1.0
    window: ArrayLike = 0

    def __post_init__(self) -> None:
        _float_field(self, "penalty", 0.0, _INF, low_closed=False)
        _int_field(self, "window")

    def apply(self, logits: Array, state: History, key: Array | None) -> Array:
        logits = _check_logits_rows("RepetitionPenalty", logits, state.count.shape[0])
        _check_values("RepetitionPenalty", logits.shape[:-1], penalty=self.penalty, window=self.window)
        return _repetition_penalty(logits, state.tokens, state.count, self.penalty, self.window)


@jax.jit
def _repetition_penalty(logits, tokens, count, penalty, window):
    def run(x):
        seen = _window_counts(tokens, count, window, x.shape[-1]) > 0  # [B, V]
        r = _col(penalty)
        return jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)

    x = logits.astype(_F32)
    out = _filters._unless_all_disabled(jnp.asarray(penalty) == 1, run, x)
    return out.astype(logits.dtype)


@processor_dataclass
class PresenceFrequencyPenalty(_HistoryProcessor):
    """Presence and frequency penalties over generated tokens (OpenAI API, vLLM).

    Math: ``x_i -> x_i - (b * c_i + a * [c_i > 0])`` where ``c_i`` counts token ``i``
    among the last ``window`` generated tokens (``window = 0``: all of them).
    ``a = b = 0`` is the identity. With ``include_prompt=True`` the counts run over
    prompt + output instead (llama.cpp's penalties sampler).

    Attributes:
      presence: ``a`` (any finite value), scalar or one per row.
      frequency: ``b`` (any finite value), scalar or one per row.
      window: ``int >= 0`` (traced), ``0`` = no window.
      include_prompt: static; ``False`` (default) counts generated tokens only.

    Example:
      >>> import jax.numpy as jnp
      >>> p = PresenceFrequencyPenalty(presence=0.5, frequency=1.0)
      >>> s = p.init(jnp.array([[3]]), jnp.array([1]), 4, max_new_tokens=4)
      >>> s = p.update(p.update(s, jnp.array([1]), None), jnp.array([1]), None)
      >>> p.apply(jnp.zeros((1, 4)), s, None)  # token 1 twice; the prompt's 3 not counted
      Array([[ 0. , -2.5,  0. ,  0. ]], dtype=float32)
    """

    identity: ClassVar[dict[str, Any]] = {"presence": 0.0, "frequency": 0.0}  # `prune` drops it
    presence: ArrayLike = 0.0
    frequency: ArrayLike = 0.0
    window: ArrayLike = 0
    include_prompt: bool = static_field(default=False)

    def __post_init__(self) -> None:
        _float_field(self, "presence", -_INF, _INF, low_closed=False)
        _float_field(self, "frequency", -_INF, _INF, low_closed=False)
        _int_field(self, "window")
        _set(self, "include_prompt", bool(self.include_prompt))

    def _include_prompt(self) -> bool:
        return self.include_prompt

    def apply(self, logits: Array, state: History, key: Array | None) -> Array:
        fn = "PresenceFrequencyPenalty"
        logits = _check_logits_rows(fn, logits, state.count.shape[0])
        _check_values(fn, logits.shape[:-1], presence=self.presence, frequency=self.frequency,
                      window=self.window)
        return _presence_frequency(logits, state.tokens, state.count, self.presence,
                                   self.frequency, self.window)


@jax.jit
def _presence_frequency(logits, tokens, count, presence, frequency, window):
    def run(x):
        c = _window_counts(tokens, count, window, x.shape[-1])  # [B, V]
        return x - (_col(frequency) * c + _col(presence) * (c > 0))

    x = logits.astype(_F32)
    disabled = (jnp.asarray(presence) == 0) & (jnp.asarray(frequency) == 0)
    return _filters._unless_all_disabled(disabled, run, x).astype(logits.dtype)


@processor_dataclass
class NoRepeatNGram(_HistoryProcessor):
    """Bans every token that would complete an n-gram already in prompt + output (transformers).

    Math: with context ``y_1 .. y_L``, token ``t`` is banned when some ``j`` has
    ``y_{j-n+1} .. y_{j-1} = y_{L-n+2} .. y_L`` and ``y_j = t``. ``n = 0`` is the
    identity; ``n = 1`` bans every token seen. Computed by comparing shifted copies of
    the history buffer (no Python loop over tokens).

    Attributes:
      n: n-gram size, ``int >= 0``, scalar or one per row (traced).

    Example:
      >>> import jax.numpy as jnp
      >>> p = NoRepeatNGram(2)
      >>> s = p.init(jnp.array([[1, 2, 3, 1]]), jnp.array([4]), 5, max_new_tokens=2)
      >>> jnp.isfinite(p.apply(jnp.zeros((1, 5)), s, None))  # "1 2" seen: 2 banned after 1
      Array([[ True,  True, False,  True,  True]], dtype=bool)
    """

    identity: ClassVar[dict[str, Any]] = {"n": 0}  # `prune` drops it
    n: ArrayLike = 0

    def __post_init__(self) -> None:
        _int_field(self, "n")

    def apply(self, logits: Array, state: History, key: Array | None) -> Array:
        logits = _check_logits_rows("NoRepeatNGram", logits, state.count.shape[0])
        _check_values("NoRepeatNGram", logits.shape[:-1], n=self.n)
        return _no_repeat_ngram(logits, state.tokens, state.count, self.n)


@jax.jit
def _no_repeat_ngram(logits, tokens, count, n):
    b, c = tokens.shape
    n = _rows(n, b, _I32)  # [B]

    def run(x):
        cap = jnp.where(n >= 1, n - 1, 0)
        m = _suffix_matches(tokens, count, jnp.zeros_like(count), cap)  # [B, C]
        j = jnp.arange(c)
        hit = (n[:, None] >= 1) & (j < count[:, None]) & (m >= cap[:, None])
        return jnp.where(_token_mask(tokens, hit, x.shape[-1]), -jnp.inf, x)

    x = logits.astype(_F32)
    return _filters._unless_all_disabled(n == 0, run, x).astype(logits.dtype)


@processor_dataclass
class BadWords(_HistoryProcessor):
    """Bans the last token of a token sequence whose other tokens end the context.

    Math: for each sequence ``s_1 .. s_k``, ``s_k`` gets ``-inf`` when the context
    (prompt + output) ends with ``s_1 .. s_{k-1}``; one-token sequences are always
    banned (transformers ``NoBadWordsLogitsProcessor``; vLLM ``bad_words``, which
    matches against the output only: ``include_prompt=False``). May empty a row.

    Attributes:
      sequences: ``int[S, L]`` (shared) or ``int[B, S, L]`` (per row), each sequence
        right-padded with ``-1``; an all ``-1`` row is padding. A list of lists of
        different lengths is padded for you. The shape is static, the ids are traced.
      include_prompt: static; ``True`` (default) matches against prompt + output.

    Example:
      >>> import jax.numpy as jnp
      >>> p = BadWords([[4], [1, 2]])
      >>> s = p.init(jnp.array([[0, 1]]), jnp.array([2]), 5)
      >>> jnp.isfinite(p.apply(jnp.zeros((1, 5)), s, None))
      Array([[ True,  True, False,  True, False]], dtype=bool)
    """

    sequences: ArrayLike = ((-1,),)
    field_ranks = {"sequences": 2}
    include_prompt: bool = static_field(default=True)

    def __post_init__(self) -> None:
        seqs = self.sequences
        if isinstance(seqs, (list, tuple)):
            seqs = [list(s) for s in seqs]
            width = max([len(s) for s in seqs] + [1])
            seqs = np.asarray([s + [-1] * (width - len(s)) for s in seqs] or [[-1]], np.int32)
        _set(self, "sequences", seqs)
        _ids_field(self, "sequences", (2, 3))
        arr = _val.concrete_value(self.sequences)
        if arr is not None and np.any((arr[..., 1:] >= 0) & (arr[..., :-1] < 0)):
            raise ValueError("BadWords: each sequence must be right-padded with -1 "
                             "(no id after a -1)")
        _set(self, "include_prompt", bool(self.include_prompt))

    def _include_prompt(self) -> bool:
        return self.include_prompt

    def _capacity(self, prompt_width: int, max_new_tokens: int | None) -> int:
        return max(np.shape(self.sequences)[-1] - 1, 1)  # only the last L - 1 tokens matter

    def _check_vocab(self, vocab_size: int) -> None:
        _val.check_token_ids("BadWords", "sequences", self.sequences, vocab_size)

    def apply(self, logits: Array, state: History, key: Array | None) -> Array:
        logits = _check_logits_rows("BadWords", logits, state.count.shape[0])
        _val.check_batch_shape("BadWords", "sequences.shape[:-2]", None, logits.shape[:-1],
                               shape=np.shape(self.sequences)[:-2])
        return _bad_words(logits, state.tokens, state.count, jnp.asarray(self.sequences))


@jax.jit
def _bad_words(logits, tokens, count, sequences):
    b, c = tokens.shape
    s, width = sequences.shape[-2:]
    seqs = jnp.broadcast_to(sequences, (b, s, width)).astype(_I32)  # [B, S, L]
    size = jnp.sum(seqs >= 0, axis=-1)  # [B, S] tokens in each sequence
    last = jnp.take_along_axis(seqs, jnp.maximum(size - 1, 0)[..., None], axis=-1)[..., 0]
    k = jnp.arange(1, width)  # [L-1]: compare the k-th token before the end
    have_at = count[:, None] - k  # [B, L-1]
    have = jnp.take_along_axis(tokens, jnp.clip(have_at, 0, c - 1), axis=1)
    have = jnp.where(have_at >= 0, have, -2)  # before the start: matches nothing
    want_at = size[..., None] - 1 - k  # [B, S, L-1]
    want = jnp.take_along_axis(seqs, jnp.clip(want_at, 0, width - 1), axis=-1)
    matched = jnp.all((want_at < 0) | (have[:, None, :] == want), axis=-1)  # [B, S]
    banned = jnp.where(matched & (size > 0), last, -1)  # [B, S]
    return _filters.ban_tokens(logits, banned)


@processor_dataclass
class MinNewTokens(LogitsProcessor):
    """Bans the stop ids until ``min_new_tokens`` tokens were generated (transformers, vLLM).

    Math: ``x_s = -inf`` for every stop id ``s`` while ``steps < min_new_tokens``;
    ``steps`` (the state, ``int32[B]``) counts ``update`` calls. ``0`` is the identity.

    Attributes:
      min_new_tokens: ``int >= 0``, scalar or one per row (traced).
      stop_ids: ``int[S]`` or ``int[B, S]``, ``-1`` padding: the end-of-sequence and
        stop ids (generation's ``stop_ids``).

    Example:
      >>> import jax.numpy as jnp
      >>> p = MinNewTokens(1, stop_ids=[2])
      >>> s = p.init(jnp.zeros((1, 1), int), jnp.array([1]), 3)
      >>> p.apply(jnp.zeros((1, 3)), s, None)
      Array([[  0.,   0., -inf]], dtype=float32)
      >>> p.apply(jnp.zeros((1, 3)), p.update(s, jnp.array([0]), None), None)
      Array([[0., 0., 0.]], dtype=float32)
    """

    identity: ClassVar[dict[str, Any]] = {"min_new_tokens": 0}  # `prune` drops it
    min_new_tokens: ArrayLike = 0
    stop_ids: ArrayLike = ()
    field_ranks = {"stop_ids": 1}
    stateful: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _int_field(self, "min_new_tokens")
        _ids_field(self, "stop_ids", (1, 2))

    def init(self, prompt_tokens, prompt_lengths, vocab_size, *, max_new_tokens=None) -> Array:
        tokens, _ = _check_prompts("MinNewTokens", prompt_tokens, prompt_lengths)
        _val.check_token_ids("MinNewTokens", "stop_ids", self.stop_ids, vocab_size)
        return jnp.zeros(tokens.shape[:1], _I32)

    def apply(self, logits: Array, state: Array, key: Array | None) -> Array:
        logits = _check_logits_rows("MinNewTokens", logits, state.shape[0])
        _check_values("MinNewTokens", logits.shape[:-1], min_new_tokens=self.min_new_tokens)
        early = state < jnp.asarray(self.min_new_tokens, _I32)  # [B]
        ids = jnp.asarray(self.stop_ids, _I32)
        ids = jnp.broadcast_to(ids, logits.shape[:1] + ids.shape[-1:])
        return _filters.ban_tokens(logits, jnp.where(early[:, None], ids, -1))

    def update(self, state: Array, token: Array, processed_logits: Array) -> Array:
        return state + 1


@processor_dataclass
class DRY(_HistoryProcessor):
    """DRY ("don't repeat yourself") penalty (llama.cpp, koboldcpp).

    Math: let ``L_t`` be the length of the longest suffix of the context (inside the
    window) that also occurs earlier followed by token ``t``, counting no sequence
    breaker. If ``L_t >= allowed_length``::

        x_t -> x_t - multiplier * base ** min(L_t - allowed_length, e_max)

    with ``e_max = floor(88.7228391 / ln(base))`` when ``base > 1.000001`` (llama.cpp's
    overflow clamp). Breaker tokens themselves are never penalised. ``multiplier = 0``
    is the identity. Matching compares shifted copies of the history buffer.

    Attributes:
      multiplier: ``>= 0`` (traced, per row).
      base: ``>= 1`` (traced, per row).
      allowed_length: ``int >= 0`` (traced, per row).
      window: ``int >= 0``, how many of the last tokens of prompt + output are searched
        (``0``: all; llama.cpp's ``dry_penalty_last_n``, where ``-1`` means all).
      sequence_breakers: token ids ``int[K]`` or ``int[B, K]`` (``-1`` padding) that
        stop matching. llama.cpp takes strings and matches multi-token breakers; here
        each breaker is one token id.

    Example:
      >>> import jax.numpy as jnp
      >>> p = DRY(multiplier=1.0, base=2.0, allowed_length=2)
      >>> s = p.init(jnp.array([[1, 2, 3, 4, 1, 2, 3]]), jnp.array([7]), 6, max_new_tokens=1)
      >>> p.apply(jnp.zeros((1, 6)), s, None)  # "1 2 3" repeats: 4 would make it 4 long
      Array([[ 0.,  0.,  0.,  0., -2.,  0.]], dtype=float32)
    """

    identity: ClassVar[dict[str, Any]] = {"multiplier": 0.0}  # `prune` drops it
    multiplier: ArrayLike = 0.0
    base: ArrayLike = 1.75
    allowed_length: ArrayLike = 2
    window: ArrayLike = 0
    sequence_breakers: ArrayLike = ()
    field_ranks = {"sequence_breakers": 1}

    def __post_init__(self) -> None:
        _float_field(self, "multiplier", 0.0, _INF)
        _float_field(self, "base", 1.0, _INF)
        _int_field(self, "allowed_length")
        _int_field(self, "window")
        _ids_field(self, "sequence_breakers", (1, 2))

    def _check_vocab(self, vocab_size: int) -> None:
        _val.check_token_ids("DRY", "sequence_breakers", self.sequence_breakers, vocab_size)

    def apply(self, logits: Array, state: History, key: Array | None) -> Array:
        logits = _check_logits_rows("DRY", logits, state.count.shape[0])
        _check_values("DRY", logits.shape[:-1], multiplier=self.multiplier, base=self.base,
                      allowed_length=self.allowed_length, window=self.window)
        return _dry(logits, state.tokens, state.count, self.multiplier, self.base,
                    self.allowed_length, self.window, jnp.asarray(self.sequence_breakers, _I32))


@jax.jit
def _dry(logits, tokens, count, multiplier, base, allowed_length, window, breakers):
    b, c = tokens.shape
    v = logits.shape[-1]
    mult = _rows(multiplier, b, _F32)
    base = _rows(base, b, _F32)
    allowed = _rows(allowed_length, b, _I32)

    def run(x):
        j = jnp.arange(c)
        start = _window_start(count, window)  # [B]
        in_window = (j >= start[:, None]) & (j < count[:, None])
        breaker = _filters._row_scatter((b, v), breakers, None)  # bool [B, V]
        is_breaker = jnp.take_along_axis(breaker, jnp.clip(tokens, 0, v - 1), axis=1)
        is_breaker &= in_window & (tokens >= 0)
        last_breaker = jnp.max(jnp.where(is_breaker, j, start[:, None] - 1), axis=1)
        rep_limit = count - 1 - last_breaker  # tokens after the last breaker
        clamp = base > 1.000001
        max_exp = jnp.floor(_FLOAT_MAX_LOG / jnp.log(jnp.where(clamp, base, 2.0))).astype(_I32)
        # Beyond allowed + max_exp a longer match no longer changes the penalty.
        cap = jnp.where(clamp, jnp.minimum(rep_limit, allowed + max_exp), rep_limit)
        cap = jnp.where(mult != 0, cap, 0)
        m = _suffix_matches(tokens, count, start, cap)  # [B, C]
        candidate = (j >= start[:, None] + 1) & (j < count[:, None])  # tokens[j] follows a match
        ids = jnp.where(candidate, tokens, v)
        rows = jnp.arange(b)[:, None]
        longest = jnp.full((b, v), -1, _I32).at[rows, ids].max(jnp.where(candidate, m, -1),
                                                               mode="drop")
        hit = (longest >= allowed[:, None]) & ~breaker & (mult[:, None] != 0)
        exponent = longest - allowed[:, None]
        exponent = jnp.where(clamp[:, None], jnp.minimum(exponent, max_exp[:, None]), exponent)
        penalty = mult[:, None] * base[:, None] ** jnp.maximum(exponent, 0).astype(_F32)
        return jnp.where(hit, x - penalty, x)

    x = logits.astype(_F32)
    return _filters._unless_all_disabled(mult == 0, run, x).astype(logits.dtype)


# ----------------------------------------------------------------------------- adaptive, stochastic


@processor_dataclass
class XTC(LogitsProcessor):
    """Exclude Top Choices (llama.cpp).

    Math: with ``q = softmax(x)`` and ``u ~ U[0, 1)`` drawn from the processor's own
    key (one per row), if ``u < probability`` and two or more tokens have
    ``q_i >= threshold``, every one of them except the least likely gets ``-inf``
    (ties with the least likely are kept). ``probability = 0`` is the identity, and so
    is any ``threshold > 0.5``. Never empties a row.

    Attributes:
      probability: in ``[0, 1]`` (traced, per row).
      threshold: in ``[0, 1]`` (traced, per row).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
      >>> out = XTC(1.0, 0.1)(x, jax.random.split(jax.random.key(0), 1))
      >>> jnp.isfinite(out)  # 0.5 and 0.3 removed, 0.15 (least likely above 0.1) kept
      Array([[False, False,  True,  True]], dtype=bool)
    """

    identity: ClassVar[dict[str, Any]] = {"probability": 0.0}  # `prune` drops it
    probability: ArrayLike = 0.0
    threshold: ArrayLike = 0.1
    needs_key: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _float_field(self, "probability", 0.0, 1.0, high_closed=True)
        _float_field(self, "threshold", 0.0, 1.0, high_closed=True)

    def apply(self, logits: Array, state: Any, key: Array | None) -> Array:
        if key is None:
            raise TypeError("XTC is stochastic: it needs one key per row")
        _val.check_logits(logits, "XTC")
        logits = jnp.asarray(logits)
        batch = logits.shape[:-1]
        _check_values("XTC", batch, probability=self.probability, threshold=self.threshold)
        key = _sampling.as_typed_key(key)
        if key.shape not in ((), batch):
            raise ValueError(f"XTC: key must be one key or one per row {batch}, got {key.shape}")
        return _xtc(logits, key, self.probability, self.threshold)


@jax.jit
def _xtc(logits, key, probability, threshold):
    x = logits.astype(_F32)
    u = _sampling._uniform_per_row(key, x.shape[:-1])  # [...]
    cut = jax.nn.logsumexp(x, axis=-1) + jnp.log(jnp.asarray(threshold, _F32))  # q_i >= t
    above = (x >= cut[..., None]) & (x > -jnp.inf)
    least = jnp.min(jnp.where(above, x, jnp.inf), axis=-1)  # [...] least likely above t
    fire = (u < jnp.asarray(probability, _F32)) & (jnp.sum(above, axis=-1) >= 2)
    remove = fire[..., None] & above & (x > least[..., None])
    return jnp.where(remove, -jnp.inf, x).astype(logits.dtype)


@processor_dataclass
class MirostatV2(LogitsProcessor):
    """Mirostat 2.0 (llama.cpp): a truncation adapting to a target surprise ``tau``.

    Math: with ``q = softmax(x)``, keep tokens with ``-log2 q_i <= mu`` (the most likely
    token is always kept). After the draw, ``mu -> mu - eta * (-log2 q'_chosen - tau)``
    where ``q'`` is the distribution actually sampled (``update``'s
    ``processed_logits``: the truncated, renormalised one when mirostat is the chain's
    last processor, as in llama.cpp). ``mu`` starts at ``2 * tau`` and is carried per
    row (the state, ``float32[B]``). ``tau = inf`` is the identity.

    Attributes:
      tau: target surprise in bits, ``>= 0`` (``inf``: disabled); traced, per row.
      eta: learning rate ``>= 0``; traced, per row.

    Example:
      >>> import jax.numpy as jnp
      >>> p = MirostatV2(tau=1.0, eta=0.1)
      >>> mu = p.init(jnp.zeros((1, 1), int), jnp.array([1]), 4)  # 2 * tau = 2 bits
      >>> jnp.isfinite(p.apply(jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]])), mu, None))
      Array([[ True,  True, False, False]], dtype=bool)
    """

    identity: ClassVar[dict[str, Any]] = {"tau": _INF}  # `prune` drops it
    tau: ArrayLike = _INF
    eta: ArrayLike = 0.1
    stateful: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _float_field(self, "tau", 0.0, _INF, high_closed=True)
        _float_field(self, "eta", 0.0, _INF)

    def init(self, prompt_tokens, prompt_lengths, vocab_size, *, max_new_tokens=None) -> Array:
        tokens, _ = _check_prompts("MirostatV2", prompt_tokens, prompt_lengths)
        return jnp.broadcast_to(2.0 * jnp.asarray(self.tau, _F32), tokens.shape[:1])

    def apply(self, logits: Array, state: Array, key: Array | None) -> Array:
        logits = _check_logits_rows("MirostatV2", logits, state.shape[0])
        return _mirostat_apply(logits, state)

    def update(self, state: Array, token: Array, processed_logits: Array) -> Array:
        _check_values("MirostatV2", state.shape, tau=self.tau, eta=self.eta)
        return _mirostat_update(state, jnp.asarray(token), jnp.asarray(processed_logits),
                                self.tau, self.eta)


@jax.jit
def _mirostat_apply(logits, mu):
    x = logits.astype(_F32)
    logq = jax.nn.log_softmax(x, axis=-1)
    keep = (logq >= -mu[:, None] * _LN2) | (x >= jnp.max(x, axis=-1, keepdims=True))
    return jnp.where(keep, x, -jnp.inf).astype(logits.dtype)


@jax.jit
def _mirostat_update(mu, token, processed, tau, eta):
    logq = jax.nn.log_softmax(processed.astype(_F32), axis=-1)
    v = logq.shape[-1]
    picked = jnp.take_along_axis(logq, jnp.clip(token, 0, v - 1)[:, None], axis=-1)[:, 0]
    surprise = -picked / _LN2  # bits
    tau = jnp.asarray(tau, _F32)
    new = mu - jnp.asarray(eta, _F32) * (surprise - tau)
    ok = jnp.isfinite(tau) & (token >= 0) & jnp.isfinite(surprise)
    return jnp.where(ok, new, mu)


@processor_dataclass
class DynamicTemperature(LogitsProcessor):
    """Entropy-scaled temperature (llama.cpp ``temp_ext``, "dynatemp").

    Math: with ``q = softmax(x)``, ``H`` its entropy and ``N`` the number of finite
    logits, ``T' = T_min + (T_max - T_min) * (H / ln N) ** exponent`` where
    ``T_min = max(0, t - range)`` and ``T_max = t + range``; then ``x -> x / T'``
    (``T' = 0``: greedy, as :func:`jaxsample.temperature`). ``range = 0`` is plain
    temperature ``t``, so ``t = 1, range = 0`` is the identity. A row with one
    candidate is left unchanged when ``range > 0`` (llama.cpp).

    Attributes:
      t: base temperature ``>= 0`` (traced, per row).
      range: ``>= 0`` (traced, per row).
      exponent: ``>= 0`` (traced, per row).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.log(jnp.array([[0.25, 0.25, 0.25, 0.25]]))  # H = ln N: T' = T_max = 1.5
      >>> DynamicTemperature(t=1.0, range=0.5)(x)[0, 0] * 1.5 == x[0, 0]
      Array(True, dtype=bool)
    """

    identity: ClassVar[dict[str, Any]] = {"t": 1.0, "range": 0.0}  # `prune` drops it
    t: ArrayLike = 1.0
    range: ArrayLike = 0.0
    exponent: ArrayLike = 1.0

    def __post_init__(self) -> None:
        _float_field(self, "t", 0.0, _INF)
        _float_field(self, "range", 0.0, _INF)
        _float_field(self, "exponent", 0.0, _INF)

    def apply(self, logits: Array, state: Any, key: Array | None) -> Array:
        _val.check_logits(logits, "DynamicTemperature")
        logits = jnp.asarray(logits)
        _check_values("DynamicTemperature", logits.shape[:-1], t=self.t, range=self.range,
                      exponent=self.exponent)
        return _dynamic_temperature(logits, self.t, self.range, self.exponent)


@jax.jit
def _dynamic_temperature(logits, t, delta, exponent):
    x = logits.astype(_F32)
    batch = x.shape[:-1]
    t = jnp.broadcast_to(jnp.asarray(t, _F32), batch)
    delta = jnp.broadcast_to(jnp.asarray(delta, _F32), batch)

    def dynamic(x):
        n = jnp.sum(x > -jnp.inf, axis=-1)  # [...] candidates
        logq = jax.nn.log_softmax(x, axis=-1)
        q = jnp.exp(logq)
        entropy = -jnp.sum(jnp.where(q > 0, q * logq, 0.0), axis=-1)
        normalized = entropy / jnp.log(jnp.maximum(n, 2).astype(_F32))
        t_min = jnp.maximum(t - delta, 0.0)
        t_max = t + delta
        t_dyn = t_min + (t_max - t_min) * normalized ** jnp.asarray(exponent, _F32)
        return jnp.where(delta > 0, jnp.where(n > 1, t_dyn, 1.0), t)

    t_eff = jax.lax.cond(jnp.all(delta == 0), lambda x: t, dynamic, x)
    return _filters.temperature(x, t_eff).astype(logits.dtype)
