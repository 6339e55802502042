"""Logits processors as pytrees, their composition, and one decode step.

A processor is a frozen dataclass registered as a pytree (:func:`processor_dataclass`):
its numeric values (``p``, ``k``, ``t``, token ids, biases) are *data* leaves and
everything else (such as ``min_tokens_to_keep``) is static. A jitted function that takes a processor or a
:class:`Chain` as an argument therefore traces the values and keys its cache on the
structure only, so changing a value (even from "disabled" to "enabled") never
recompiles.

Protocol (used batched by generation: logits ``[B, V]``, state leaves with a leading
``B``, keys of shape ``[B]``)::

    state  = proc.init(prompt_tokens, prompt_lengths, vocab_size)
    logits = proc.apply(logits, state, key)          # key: one key per row
    state  = proc.update(state, token, processed_logits)

Stateless processors ignore ``state`` (``()``) and ``key``; stateful ones (penalties,
mirostat, XTC) override ``init``/``update`` and set ``stateful = True``.

``init`` may also take a keyword ``max_new_tokens`` (an int, static): processors that
keep a history buffer of static capacity (prompt + generated tokens) need it, and
:func:`init_state` / :meth:`Chain.init` pass it only to processors whose ``init``
accepts it, so processors written against the three-argument form keep working.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np

from jaxsample import _filters
from jaxsample import _sampling
from jaxsample import _validation as _val

__all__ = [
    "LogitsProcessor",
    "Temperature",
    "TopK",
    "TopP",
    "MinP",
    "TypicalP",
    "EpsilonCutoff",
    "EtaCutoff",
    "TopNSigma",
    "LogitBias",
    "SparseLogitBias",
    "BanTokens",
    "AllowTokens",
    "Chain",
    "chain",
    "default_chain",
    "StepOutput",
    "sample_step",
    "fold_in_rows",
    "init_state",
]

Array = jax.Array
ArrayLike = Any
State = Any


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is static (part of the pytree structure, not a leaf)."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def processor_dataclass(cls: type) -> type:
    """Makes ``cls`` a frozen dataclass and registers it as a pytree.

    Fields made with :func:`static_field` are static (part of the tree structure, like
    ``register_dataclass``'s ``meta_fields``); every other field is a data leaf.

    Unlike ``jax.tree_util.register_dataclass``, unflattening does not call
    ``__init__``: JAX rebuilds processors with tracers, sentinels or ``vmap`` axis specs
    as leaves (e.g. ``jax.tree.map(lambda v: 0, chain)`` for ``in_axes``), which must
    not be validated. Validation and canonicalisation (``__post_init__``) run only when
    a processor is constructed by user code (including ``dataclasses.replace``).
    """
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    fields = dataclasses.fields(cls)
    meta = tuple(f.name for f in fields if f.metadata.get("static", False))
    data = tuple(f.name for f in fields if not f.metadata.get("static", False))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in data)

    def flatten_with_keys(obj):
        children = tuple((k, getattr(obj, n)) for k, n in zip(keys, data))
        return children, tuple(getattr(obj, n) for n in meta)

    def flatten(obj):
        return tuple(getattr(obj, n) for n in data), tuple(getattr(obj, n) for n in meta)

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for name, value in zip(meta, aux):
            object.__setattr__(obj, name, value)
        for name, value in zip(data, children):
            object.__setattr__(obj, name, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


def fold_in_rows(key: ArrayLike, data: int) -> Array:
    """``jax.random.fold_in`` applied to every key of a key array (any shape).

    Returns a typed key array of the same shape; raw ``uint32`` keys are wrapped first.

    Example:
      >>> import jax
      >>> fold_in_rows(jax.random.split(jax.random.key(0), 3), 1).shape
      (3,)
    """
    key = _sampling.as_typed_key(key)
    if key.shape == ():
        return jax.random.fold_in(key, data)
    flat = key.reshape(-1)
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(flat).reshape(key.shape)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _host_array(value: Any, dtype: Any) -> Any:
    """Lists and tuples of numbers become NumPy arrays (one leaf, not one per item)."""
    if isinstance(value, (list, tuple)):
        return np.asarray(value, dtype=dtype)
    return value


class LogitsProcessor:
    """Base class of every processor: a pytree with ``init``/``apply``/``update``.

    Subclasses are made with :func:`processor_dataclass` and implement :meth:`apply`.
    Stateful subclasses set ``stateful = True`` and override :meth:`init` and
    :meth:`update`; stochastic ones set ``needs_key = True``.
    """

    stateful: ClassVar[bool] = False
    needs_key: ClassVar[bool] = False

    def init(
        self,
        prompt_tokens: Array,
        prompt_lengths: Array,
        vocab_size: int,
        *,
        max_new_tokens: int | None = None,
    ) -> State:
        """Initial state from the prompts ``int32[B, P]`` and lengths ``int32[B]``.

        ``max_new_tokens`` (static) sizes history buffers (generation passes it). The
        default (stateless) is ``()``.
        """
        del prompt_tokens, prompt_lengths, vocab_size, max_new_tokens
        return ()

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        """Processes ``logits[..., V]``; ``key`` has one key per row (``logits.shape[:-1]``)."""
        raise NotImplementedError

    def update(self, state: State, token: Array, processed_logits: Array) -> State:
        """Next state after ``token`` (``int32[B]``) was drawn from ``processed_logits``."""
        del token, processed_logits
        return state

    def __call__(self, logits: ArrayLike, key: ArrayLike | None = None) -> Array:
        """Stateless use: ``proc(logits)``; a stateful processor raises ``TypeError``."""
        if self.stateful:
            raise TypeError(
                f"{type(self).__name__} is stateful: call init/apply/update "
                f"(or sample_step) instead of calling it on logits directly"
            )
        if self.needs_key and key is None:
            raise TypeError(f"{type(self).__name__} is stochastic: pass key=...")
        if key is not None:
            key = _sampling.as_typed_key(key)
        return self.apply(logits, (), key)


# ----------------------------------------------------------------------------- filters


@processor_dataclass
class Temperature(LogitsProcessor):
    """:func:`jaxsample.temperature` as a processor (``t = 0``: greedy row).

    Example:
      >>> import jax.numpy as jnp
      >>> Temperature(2.0)(jnp.array([1.0, 2.0]))
      Array([0.5, 1. ], dtype=float32)
    """

    t: ArrayLike = 1.0

    def __post_init__(self) -> None:
        _val.check_param("temperature", "t", self.t)  # the value as given, before any cast
        t = _host_array(self.t, np.float32)
        _set(self, "t", _val.canonical_scalar(t, float))

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        return _filters.temperature(logits, self.t)


class _Truncation(LogitsProcessor):
    """Shared code of the truncation processors: one value field + min_tokens_to_keep."""

    _filter: ClassVar[str]  # name of the function in _filters
    _field: ClassVar[str]  # name of the value field (= the filter's parameter)
    _kind: ClassVar[type] = float

    def __post_init__(self) -> None:
        dtype = np.int32 if self._kind is int else np.float32
        _val.check_param(self._filter, self._field, getattr(self, self._field))  # before any cast
        value = _host_array(getattr(self, self._field), dtype)
        _set(self, self._field, _val.canonical_scalar(value, self._kind))
        m = _val.check_min_tokens_to_keep(self._filter, self.min_tokens_to_keep)
        _set(self, "min_tokens_to_keep", m)

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        fn = getattr(_filters, self._filter)
        return fn(logits, getattr(self, self._field), min_tokens_to_keep=self.min_tokens_to_keep)


@processor_dataclass
class TopK(_Truncation):
    """:func:`jaxsample.top_k` as a processor (``k = 0`` disables)."""

    _filter = "top_k"
    _field = "k"
    _kind = int
    k: ArrayLike = 0
    min_tokens_to_keep: int = static_field(default=1)


@processor_dataclass
class TopP(_Truncation):
    """:func:`jaxsample.top_p` as a processor (``p = 1`` disables)."""

    _filter = "top_p"
    _field = "p"
    p: ArrayLike = 1.0
    min_tokens_to_keep: int = static_field(default=1)


@processor_dataclass
class MinP(_Truncation):
    """:func:`jaxsample.min_p` as a processor (``p = 0`` disables)."""

    _filter = "min_p"
    _field = "p"
    p: ArrayLike = 0.0
    min_tokens_to_keep: int = static_field(default=1)


@processor_dataclass
class TypicalP(_Truncation):
    """:func:`jaxsample.typical_p` as a processor (``p = 1`` disables)."""

    _filter = "typical_p"
    _field = "p"
    p: ArrayLike = 1.0
    min_tokens_to_keep: int = static_field(default=1)


@processor_dataclass
class EpsilonCutoff(_Truncation):
    """:func:`jaxsample.epsilon_cutoff` as a processor (``epsilon = 0`` disables)."""

    _filter = "epsilon_cutoff"
    _field = "epsilon"
    epsilon: ArrayLike = 0.0
    min_tokens_to_keep: int = static_field(default=1)


@processor_dataclass
class EtaCutoff(_Truncation):
    """:func:`jaxsample.eta_cutoff` as a processor (``eta = 0`` disables)."""

    _filter = "eta_cutoff"
    _field = "eta"
    eta: ArrayLike = 0.0
    min_tokens_to_keep: int = static_field(default=1)


@processor_dataclass
class TopNSigma(_Truncation):
    """:func:`jaxsample.top_n_sigma` as a processor (``n = inf`` disables)."""

    _filter = "top_n_sigma"
    _field = "n"
    n: ArrayLike = float("inf")
    min_tokens_to_keep: int = static_field(default=1)


# ----------------------------------------------------------------------------- biases, masks


@processor_dataclass
class LogitBias(LogitsProcessor):
    """:func:`jaxsample.logit_bias` as a processor: a dense ``[V]``/``[..., V]`` bias."""

    bias: ArrayLike

    def __post_init__(self) -> None:
        _val.check_bias("LogitBias", "bias", self.bias)
        _set(self, "bias", _host_array(self.bias, np.float32))

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        return _filters.logit_bias(logits, self.bias)


@processor_dataclass
class SparseLogitBias(LogitsProcessor):
    """:func:`jaxsample.sparse_logit_bias` as a processor (``-1`` ids are padding)."""

    token_ids: ArrayLike
    values: ArrayLike

    def __post_init__(self) -> None:
        _check_ids("SparseLogitBias", self.token_ids)
        _val.check_bias("SparseLogitBias", "values", self.values)
        _set(self, "token_ids", _host_array(self.token_ids, np.int32))
        _set(self, "values", _host_array(self.values, np.float32))

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        return _filters.sparse_logit_bias(logits, self.token_ids, self.values)


@processor_dataclass
class BanTokens(LogitsProcessor):
    """:func:`jaxsample.ban_tokens` as a processor (``-1`` ids are padding)."""

    token_ids: ArrayLike

    def __post_init__(self) -> None:
        _check_ids("BanTokens", self.token_ids)
        _set(self, "token_ids", _host_array(self.token_ids, np.int32))

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        return _filters.ban_tokens(logits, self.token_ids)


@processor_dataclass
class AllowTokens(LogitsProcessor):
    """:func:`jaxsample.allow_tokens` as a processor (``-1`` ids are padding)."""

    token_ids: ArrayLike

    def __post_init__(self) -> None:
        _check_ids("AllowTokens", self.token_ids)
        _set(self, "token_ids", _host_array(self.token_ids, np.int32))

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        return _filters.allow_tokens(logits, self.token_ids)


@functools.lru_cache(maxsize=None)
def _init_takes_max_new_tokens(cls: type) -> bool:
    params = inspect.signature(cls.init).parameters.values()
    return any(p.name == "max_new_tokens" or p.kind is p.VAR_KEYWORD for p in params)


def init_state(
    proc: LogitsProcessor,
    prompt_tokens: Array,
    prompt_lengths: Array,
    vocab_size: int,
    *,
    max_new_tokens: int | None = None,
) -> State:
    """``proc.init(...)``, passing ``max_new_tokens`` only if ``proc.init`` accepts it.

    Processors written before the keyword existed (``init(prompt_tokens,
    prompt_lengths, vocab_size)``) are called with the three arguments.

    Example:
      >>> init_state(Temperature(0.5), None, None, 8, max_new_tokens=4)
      ()
    """
    if max_new_tokens is None or not _init_takes_max_new_tokens(type(proc)):
        return proc.init(prompt_tokens, prompt_lengths, vocab_size)
    return proc.init(prompt_tokens, prompt_lengths, vocab_size, max_new_tokens=max_new_tokens)


def _check_ids(fn: str, ids: Any) -> None:
    """Token-id checks at construction (the vocabulary size is not known yet)."""
    if _val.concrete_value(ids) is not None:
        _val.check_token_ids(fn, "token_ids", ids, None)


# ----------------------------------------------------------------------------- chain


@processor_dataclass
class Chain(LogitsProcessor):
    """Processors applied in order; itself a processor (chains nest).

    The state is a tuple with one entry per processor. Processor ``i`` gets the keys
    ``fold_in(key, i + 1)`` (row by row), so :func:`sample_step` can keep
    ``fold_in(key, 0)`` for the draw itself.

    Example:
      >>> import jax.numpy as jnp
      >>> c = chain(Temperature(0.5), TopK(1))
      >>> c(jnp.array([1.0, 2.0, 0.0]))
      Array([-inf,   4., -inf], dtype=float32)
    """

    processors: tuple = ()

    def __post_init__(self) -> None:
        if isinstance(self.processors, list):
            _set(self, "processors", tuple(self.processors))

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return any(p.stateful for p in self.processors)

    @property
    def needs_key(self) -> bool:  # type: ignore[override]
        return any(p.needs_key for p in self.processors)

    def init(
        self,
        prompt_tokens: Array,
        prompt_lengths: Array,
        vocab_size: int,
        *,
        max_new_tokens: int | None = None,
    ) -> State:
        return tuple(
            init_state(p, prompt_tokens, prompt_lengths, vocab_size, max_new_tokens=max_new_tokens)
            for p in self.processors
        )

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        state = self._check_state(state)
        for i, (proc, proc_state) in enumerate(zip(self.processors, state)):
            proc_key = None if key is None else fold_in_rows(key, i + 1)
            logits = proc.apply(logits, proc_state, proc_key)
        return logits

    def update(self, state: State, token: Array, processed_logits: Array) -> State:
        state = self._check_state(state)
        return tuple(
            proc.update(proc_state, token, processed_logits)
            for proc, proc_state in zip(self.processors, state)
        )

    def __call__(self, logits: ArrayLike, key: ArrayLike | None = None) -> Array:
        """Stateless use: applies every processor in order (``TypeError`` if stateful)."""
        for i, proc in enumerate(self.processors):
            if proc.stateful:
                raise TypeError(
                    f"Chain: processor {i} ({type(proc).__name__}) is stateful: use "
                    f"chain.init/apply/update or sample_step instead of calling the chain"
                )
        for i, proc in enumerate(self.processors):
            proc_key = None if key is None else fold_in_rows(key, i + 1)
            logits = proc(logits, proc_key)
        return logits

    def _check_state(self, state: State) -> tuple:
        if not isinstance(state, tuple) or len(state) != len(self.processors):
            raise ValueError(
                f"Chain: state must be a tuple with one entry per processor "
                f"({len(self.processors)}), as returned by init; got {type(state).__name__}"
                + (f" of length {len(state)}" if isinstance(state, tuple) else "")
            )
        return state


def chain(*processors: LogitsProcessor) -> Chain:
    """Composes processors, applied in the order given.

    Example:
      >>> import jax.numpy as jnp
      >>> chain(TopK(2), Temperature(2.0))(jnp.array([1.0, 2.0, 4.0]))
      Array([-inf,   1.,   2.], dtype=float32)
    """
    for i, proc in enumerate(processors):
        if not isinstance(proc, LogitsProcessor):
            raise TypeError(
                f"chain: argument {i} must be a LogitsProcessor, got {type(proc).__name__}"
            )
    return Chain(tuple(processors))


def default_chain(
    *,
    temperature: ArrayLike = 1.0,
    top_k: ArrayLike = 0,
    top_p: ArrayLike = 1.0,
    min_p: ArrayLike = 0.0,
    min_tokens_to_keep: int = 1,
) -> Chain:
    """The documented default order: ``temperature -> top_k -> top_p -> min_p``.

    This is the order of transformers and vLLM. The full documented order
    (SAMPLING.md) is: masks and biases -> penalties -> temperature -> top_k -> top_p
    -> min_p (and the other truncations) -> sample; masks, biases and penalties, when
    wanted, go in front, e.g. ``chain(BanTokens(ids), default_chain(top_p=0.9))``
    (chains nest). Every stage is always present, with its disabled value by default,
    so a jitted function compiled for one setting serves every setting (each value may
    also be one per row). llama.cpp's order (temperature last) is one line too:
    ``chain(TopK(k), TopP(p), MinP(m), Temperature(t))``.

    Example:
      >>> c = default_chain(temperature=0.7, top_p=0.9)
      >>> [type(p).__name__ for p in c.processors]
      ['Temperature', 'TopK', 'TopP', 'MinP']
    """
    m = _val.check_min_tokens_to_keep("default_chain", min_tokens_to_keep)
    return chain(
        Temperature(temperature),
        TopK(top_k, min_tokens_to_keep=m),
        TopP(top_p, min_tokens_to_keep=m),
        MinP(min_p, min_tokens_to_keep=m),
    )


# ----------------------------------------------------------------------------- one step


class StepOutput(NamedTuple):
    """Per-row log-probabilities of the drawn token (float32, shape of the token).

    Attributes:
      token_logprob_raw: ``log_softmax(model logits)[token]``.
      token_logprob_processed: ``log_softmax(processed logits)[token]``, the
        distribution the token was actually drawn from.
    """

    token_logprob_raw: Array
    token_logprob_processed: Array


def sample_step(
    chain: LogitsProcessor, logits: Array, state: State, key: ArrayLike
) -> tuple[Array, State, StepOutput]:
    """One decode step: process, draw, update the state, report log-probs.

    Keys: the processors get ``fold_in(key, i + 1)`` (inside :class:`Chain`) and the
    draw uses ``fold_in(key, 0)``, row by row. Generation passes
    ``key = fold_in(row_key, step)`` per row, so a row's tokens depend only on its own
    key and step, never on its batch-mates.

    Args:
      chain: a :class:`Chain` (or any :class:`LogitsProcessor`).
      logits: ``[B, V]`` (or any ``[..., V]``) model logits.
      state: the processor state (``chain.init(...)``; ``()`` entries when stateless).
      key: one key per row, shape ``logits.shape[:-1]`` (or a single key).

    Returns:
      ``(token int32[...], new_state, StepOutput)``; ``token`` is ``-1`` for a row with
      no finite (or a NaN) processed logit.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> c = default_chain(top_k=1)
      >>> logits = jnp.array([[0.0, 2.0, 1.0]])
      >>> keys = jax.random.split(jax.random.key(0), 1)
      >>> token, state, out = sample_step(c, logits, c.init(None, None, 3), keys)
      >>> token
      Array([1], dtype=int32)
    """
    key = _sampling.as_typed_key(key)
    processed = chain.apply(logits, state, key)  # [..., V]
    token = _sampling.sample(fold_in_rows(key, 0), processed)  # [...]
    new_state = chain.update(state, token, processed)
    out = StepOutput(
        token_logprob_raw=_sampling.token_logprobs(logits, token),
        token_logprob_processed=_sampling.token_logprobs(processed, token),
    )
    return token, new_state, out
