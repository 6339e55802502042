"""Logits processors as pytrees, and their composition (layer 3: processors and chains).

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
mirostat, XTC) override ``init``/``update`` and set ``stateful = True``. Write your own
with the public :func:`processor_dataclass` / :func:`static_field`, or wrap a plain
function with :func:`stateless`; :func:`chain` and generation refuse (with the fix in
the message) a processor that is not a registered pytree (:func:`check_processor`).

``init`` may also take a keyword ``max_new_tokens`` (an int, static): processors that
keep a history buffer of static capacity (prompt + generated tokens) need it, and
:func:`init_state` / :meth:`Chain.init` pass it only to processors whose ``init``
accepts it, so processors written against the three-argument form keep working.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample import _validation as _val
from jaxsample._filters.sampling import as_typed_key, fold_in_rows

__all__ = [
    "take_rows",
    "put_rows",
    "processor_dataclass",
    "static_field",
    "stateless",
    "Stateless",
    "check_processor",
    "LogitsProcessor",
    "Chain",
    "chain",
    "init_state",
]

Array = jax.Array
ArrayLike = Any
State = Any


def static_field(**kwargs: Any) -> Any:
    """A field of a :func:`processor_dataclass` that is static, not a traced leaf.

    Static values (ints that fix a shape, flags, strings, functions) are part of the
    pytree structure: a jitted function compiles once per distinct static value, so use
    it for options, never for values you want to sweep. Takes ``dataclasses.field``'s
    keyword arguments (``default=...``).

    Example:
      >>> import jax
      >>> @processor_dataclass
      ... class Clip(LogitsProcessor):
      ...     bound: float = 10.0                      # a traced leaf
      ...     mode: str = static_field(default="tanh")  # static
      ...     def apply(self, logits, state, key):
      ...         return self.bound * jax.numpy.tanh(logits / self.bound)
      >>> jax.tree.leaves(Clip(5))  # a float32 array, also from an int
      [Array(5., dtype=float32)]
    """
    return dataclasses.field(metadata={"static": True}, **kwargs)


def processor_dataclass(cls: type) -> type:
    """Makes ``cls`` a frozen dataclass and registers it as a pytree: a processor.

    Use it as a class decorator on a :class:`LogitsProcessor` subclass. Fields made
    with :func:`static_field` are static (part of the tree structure, like
    ``register_dataclass``'s ``meta_fields``); every other field is a data leaf, traced
    under ``jit``, so changing its value never recompiles. Numeric leaves given as
    Python numbers, NumPy or JAX values are stored as arrays of one dtype when the
    processor is built: a field declared ``float`` (or with a float default) as
    ``float32``, one declared ``int`` as ``int32``, others by kind (floats ``float32``,
    ints ``int32``). So ``P(1.2)``, ``P(np.float64(1.2))`` and ``P(jnp.float32(1.2))``
    (and ``P(1)`` for a float field) are the same pytree: one compile. A subclass's own
    ``__post_init__`` runs first (validate there), then this normalisation.

    Unlike ``jax.tree_util.register_dataclass``, unflattening does not call
    ``__init__``: JAX rebuilds processors with tracers, sentinels or ``vmap`` axis specs
    as leaves (e.g. ``jax.tree.map(lambda v: 0, chain)`` for ``in_axes``), which must
    not be validated. Validation and canonicalisation (``__post_init__``) run only when
    a processor is constructed by user code (including ``dataclasses.replace``).
    """
    if not isinstance(cls, type):
        raise TypeError(f"processor_dataclass decorates a class, got {type(cls).__name__}")
    own_post_init = cls.__dict__.get("__post_init__")
    inherited = getattr(cls, "__post_init__", None)
    user_post_init = own_post_init or inherited

    def __post_init__(self) -> None:
        if user_post_init is not None:
            user_post_init(self)
        _normalise_leaves(self, data_fields)

    cls.__post_init__ = __post_init__
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    fields = dataclasses.fields(cls)
    meta = tuple(f.name for f in fields if f.metadata.get("static", False))
    data_fields = tuple(f for f in fields if not f.metadata.get("static", False))
    data = tuple(f.name for f in data_fields)
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

def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


_INT32 = np.iinfo(np.int32)


def _is_numbers(value: Any) -> bool:
    """True for a Python/NumPy number or a (nested) list/tuple of only those."""
    if isinstance(value, (list, tuple)):
        return all(_is_numbers(v) for v in value)
    return isinstance(value, (numbers.Number, np.generic)) and not isinstance(value, jax.Array)


def _leaf(fn: str, name: str, value: Any, dtype: Any) -> Any:
    """A numeric processor value as an array of ``dtype`` (``np.float32`` / ``np.int32``).

    Host values (Python numbers, NumPy scalars and arrays, lists of numbers) become JAX
    arrays on the default device (a NumPy leaf would compile apart from a JAX one: jit
    keys its cache on the argument's type and placement), JAX arrays and tracers are
    cast if their dtype differs: a Python float, a NumPy scalar and a JAX scalar give
    the same leaf, so one compile serves all three. Anything else (JAX's placeholders)
    is returned unchanged. Check the value *before* this cast (it would hide e.g.
    ``2.5`` for an int).
    """
    if isinstance(value, jax.Array):  # concrete arrays and tracers
        return value if value.dtype == dtype else value.astype(dtype)
    if not (isinstance(value, np.ndarray) or _is_numbers(value)):
        return value
    arr = np.asarray(value)
    if np.dtype(dtype).kind == "i" and arr.size and arr.dtype.kind in "iuf":
        bad = (arr < _INT32.min) | (arr > _INT32.max)
        if np.any(bad):
            raise ValueError(f"{fn}: {name} must fit in int32, got {arr[bad].flat[0]!r}")
    return jnp.asarray(arr.astype(dtype))


_KINDS = {"f": np.float32, "i": np.int32, "b": np.bool_}
_DECLARED = {float: np.float32, "float": np.float32, int: np.int32, "int": np.int32}


def _declared_dtype(field: dataclasses.Field) -> tuple[Any, bool]:
    """(dtype, explicit): float32 / int32 for a field declared ``float`` / ``int``
    (explicit), or with such a default (inferred); ``(None, False)`` otherwise."""
    if field.type in _DECLARED:
        return _DECLARED[field.type], True
    default = field.default
    if isinstance(default, (float, int)) and not isinstance(default, bool):
        return (np.float32 if isinstance(default, float) else np.int32), False
    return None, False


def _normalise_leaves(obj: Any, fields: tuple[dataclasses.Field, ...]) -> None:
    """Host numeric data fields -> arrays of one dtype (``processor_dataclass``).

    A field declared ``float`` (or with a float default) becomes ``float32`` and one
    declared ``int`` becomes ``int32``, whatever number is passed (``P(2)`` is
    ``P(2.0)``); other numeric values go by kind: floats ``float32``, signed ints
    ``int32``, bools ``bool``. Weakly typed JAX scalars (from Python numbers) follow
    the same rule. A float value is never truncated: in a field declared ``int`` a
    non-integral value raises ``ValueError``, and in a field that only has an int
    default (``scale: Any = 1``) it stays ``float32`` (declare the field ``float`` to
    give every value one dtype, hence one compile). Explicitly typed JAX arrays of
    an undeclared field, unsigned values and non-numeric fields are left as they are.
    """
    cls = type(obj).__name__
    for field in fields:
        value = getattr(obj, field.name)
        declared, explicit = _declared_dtype(field)
        is_array = isinstance(value, jax.Array)
        weak = is_array and getattr(value, "weak_type", False)
        if not (weak or isinstance(value, np.ndarray) or _is_numbers(value) or (is_array and declared)):
            continue
        kind = np.dtype(value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype).kind
        dtype = declared if kind in "biuf" and declared is not None else _KINDS.get(kind)
        if dtype is np.int32 and kind == "f":
            # Never truncate a float: an integral float may become int32; otherwise a field
            # declared ``int`` raises, and one with only an int default stays float32.
            tracer = isinstance(value, jax.core.Tracer)
            host = None if tracer else np.asarray(value, np.float64)
            with np.errstate(invalid="ignore"):
                bad = None if tracer else ~np.isfinite(host) | (host != np.floor(host))
            if explicit and bad is not None and np.any(bad):
                raise ValueError(f"{cls}: {field.name} must be an integer, got {float(host[bad].flat[0])!r}")
            if not explicit and (tracer or np.any(bad)):
                dtype = np.float32
        if dtype is not None:
            _set(obj, field.name, _leaf(cls, field.name, value, dtype))


class LogitsProcessor:
    """Base class of every processor: a pytree with ``init``/``apply``/``update``.

    Subclasses are made with :func:`processor_dataclass` and implement :meth:`apply`.
    Stateful subclasses set ``stateful = True`` and override :meth:`init` and
    :meth:`update`; stochastic ones set ``needs_key = True``.
    """

    stateful: ClassVar[bool] = False
    needs_key: ClassVar[bool] = False
    #: Trailing (non-batch) axes of each data field's per-row form, for :func:`take_rows`:
    #: a field not listed is a value per row (rank 0: a scalar, or ``[B]``); an id list
    #: has rank 1 (``[S]`` shared, ``[B, S]`` per row); ``None``: never per row (tables).
    field_ranks: ClassVar[dict[str, int | None]] = {}
    #: The value of each field that makes the processor the identity (every row as it
    #: is): what ``prune=True`` of the presets drops. ``None``: never the identity.
    #: For the per-row filters it comes from their row of `jaxsample._filters.filters.TABLE`.
    identity: ClassVar[dict[str, Any] | None] = None

    def is_identity(self) -> bool:
        """True when every field of :attr:`identity` holds, concretely, its identity value
        (a traced value is never known to be the identity)."""
        if self.identity is None:
            return False
        for name, identity in self.identity.items():
            value = _val.concrete_value(getattr(self, name))
            if value is None or not np.all(value == identity):
                return False
        return True

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
            key = as_typed_key(key)
        return self.apply(logits, (), key)

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

# ----------------------------------------------------------------------------- checks


def _is_leaf_value(x: Any) -> bool:
    """What may sit at a processor's leaf: numbers, arrays, tracers, shape structs."""
    return isinstance(x, (numbers.Number, np.ndarray, np.generic, jax.Array)) or (
        hasattr(x, "shape") and hasattr(x, "dtype"))


def check_processor(proc: Any, where: str = "processor") -> None:
    """Raises ``TypeError`` (saying how to fix it) if ``proc`` cannot go through ``jit``.

    A processor must be a :class:`LogitsProcessor` registered as a pytree (made with
    :func:`processor_dataclass`, or wrapped with :func:`stateless`), and each of its
    leaves must be numeric (an array or a number): a string, a function or any other
    object in a data field has to be a :func:`static_field`. Nested chains are checked
    through. :func:`chain` and :func:`jaxsample.generate` call it.

    Example:
      >>> class Bare(LogitsProcessor):
      ...     def apply(self, logits, state, key): return logits
      >>> check_processor(Bare())
      Traceback (most recent call last):
      ...
      TypeError: processor Bare is not a registered pytree, so it cannot be passed through jit (generate, a jitted decode step): decorate the class with @jaxsample.processor_dataclass (mark non-numeric fields with jaxsample.static_field()), or wrap a function logits -> logits with jaxsample.stateless(fn)
    """
    if not isinstance(proc, LogitsProcessor):
        raise TypeError(f"{where} must be a LogitsProcessor, got {type(proc).__name__}; wrap a function "
                        f"logits -> logits (or (logits, key) -> logits) with jaxsample.stateless(fn)")
    leaves = jax.tree_util.tree_flatten_with_path(proc)[0]
    for path, leaf in leaves:
        if isinstance(leaf, LogitsProcessor):
            cls = type(leaf).__name__
            inner = f" (at {jax.tree_util.keystr(path)})" if path else ""
            raise TypeError(
                f"{where} {cls}{inner} is not a registered pytree, so it cannot be passed through jit "
                f"(generate, a jitted decode step): decorate the class with @jaxsample.processor_dataclass "
                f"(mark non-numeric fields with jaxsample.static_field()), or wrap a function "
                f"logits -> logits with jaxsample.stateless(fn)")
        if not _is_leaf_value(leaf):
            raise TypeError(
                f"{where} ({type(proc).__name__}): field {jax.tree_util.keystr(path)} holds a "
                f"{type(leaf).__name__} ({leaf!r:.60}), which jit cannot trace: numeric values are "
                f"leaves; declare other fields with jaxsample.static_field()")


# ----------------------------------------------------------------------------- functions


def _takes_key(fn: Callable) -> bool:
    """True when ``fn`` takes two positional arguments (logits, key)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise TypeError(f"stateless: cannot read the signature of {fn!r}; pass takes_key=True/False") from None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if any(p.kind is p.VAR_POSITIONAL for p in params) or len(required) >= 2:
        return True
    if len(positional) >= 1:
        return False
    raise TypeError(f"stateless: {fn!r} must take logits (and optionally a key) positionally")


@processor_dataclass
class Stateless(LogitsProcessor):
    """A function ``logits -> logits`` (or ``(logits, key) -> logits``) as a processor.

    Made by :func:`stateless`. ``fn`` is static: the compiled program depends on the
    function object, and arrays it closes over are baked into the program as
    constants. To sweep a value without recompiling, make it a field of a
    :func:`processor_dataclass` instead.
    """

    fn: Callable = static_field()
    takes_key: bool = static_field(default=False)

    @property
    def needs_key(self) -> bool:  # type: ignore[override]
        return self.takes_key

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        return self.fn(logits, key) if self.takes_key else self.fn(logits)


def stateless(fn: Callable, *, takes_key: bool | None = None) -> Stateless:
    """Wraps a function ``fn(logits) -> logits`` or ``fn(logits, key) -> logits`` as a processor.

    The function gets ``logits[..., V]`` and, when it takes a second argument, one PRNG
    key per row (shape ``logits.shape[:-1]``, derived like every processor's key: see
    :func:`sample_step`). It must keep the shape. Like ``optax.stateless``.

    ``fn`` is *static*: a jitted function (``generate``) compiles once per function
    object, and any array ``fn`` closes over is a constant of that program (changing it
    means a new function, hence a recompile). Values to sweep belong in a
    :func:`processor_dataclass` field.

    Args:
      fn: the function; it must be hashable (functions and lambdas are).
      takes_key: whether ``fn`` takes a key; default: read from its signature (two
        required positional parameters).

    Example:
      >>> import jax.numpy as jnp
      >>> clip = stateless(lambda logits: jnp.clip(logits, -5.0, 5.0))
      >>> chain(clip, Temperature(0.5))(jnp.array([1.0, 9.0]))
      Array([ 2., 10.], dtype=float32)
    """
    if not callable(fn):
        raise TypeError(f"stateless: fn must be callable, got {type(fn).__name__}")
    try:
        hash(fn)
    except TypeError:
        raise TypeError(f"stateless: fn must be hashable (it is static), got {type(fn).__name__}") from None
    return Stateless(fn, _takes_key(fn) if takes_key is None else bool(takes_key))


# ----------------------------------------------------------------------------- chain


@processor_dataclass
class Chain(LogitsProcessor):
    """Processors applied in order; itself a processor (chains nest).

    The state is a tuple with one entry per processor. Processor ``j`` (0-based) gets
    the keys ``fold_in(key, j + 1)`` (row by row), so :func:`sample_step` can keep
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
        for i, proc in enumerate(self.processors):
            check_processor(proc, f"chain: processor {i}")

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return any(p.stateful for p in self.processors)

    @property
    def needs_key(self) -> bool:  # type: ignore[override]
        return any(p.needs_key for p in self.processors)

    def init(self, prompt_tokens, prompt_lengths, vocab_size, *, max_new_tokens=None) -> State:
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
        check_processor(proc, f"chain: argument {i}")
    return Chain(tuple(processors))


# ----------------------------------------------------------------------------- rows


def _row_fields(proc: LogitsProcessor, batch: int) -> list[str]:
    """The data fields of ``proc`` that hold one entry per row of a ``batch``-row call."""
    out = []
    for field in dataclasses.fields(proc):
        if field.metadata.get("static", False):
            continue
        rank = type(proc).field_ranks.get(field.name, 0)
        value = getattr(proc, field.name)
        if rank is None or not hasattr(value, "shape"):
            continue
        if value.ndim == rank + 1 and value.shape[0] == batch:
            out.append(field.name)
    return out


def _map_rows(proc: LogitsProcessor, batch: int, fn: Callable[[str, Any], Any]) -> LogitsProcessor:
    if isinstance(proc, Chain):
        new = object.__new__(Chain)
        _set(new, "processors", tuple(_map_rows(p, batch, fn) for p in proc.processors))
        return new
    if not dataclasses.is_dataclass(proc):
        return proc
    new = object.__new__(type(proc))
    for field in dataclasses.fields(proc):
        _set(new, field.name, getattr(proc, field.name))
    for name in _row_fields(proc, batch):
        _set(new, name, fn(name, getattr(proc, name)))
    return new


def take_rows(proc: LogitsProcessor, index: Array, batch: int) -> LogitsProcessor:
    """``proc`` for rows ``index`` (int ``[G]``) of a ``batch``-row call: every per-row value
    (a data field whose leading axis is the batch, given its ``field_ranks``) is gathered;
    shared values are kept. Chains are taken through; jittable (``index`` may be traced).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsample._processors.builtin import TopP
      >>> take_rows(TopP(jnp.array([0.5, 0.9, 1.0])), jnp.array([2, 0]), 3).p
      Array([1. , 0.5], dtype=float32)
    """
    return _map_rows(proc, batch, lambda name, value: jnp.take(value, index, axis=0))


def put_rows(dst: LogitsProcessor, index: Array, src: LogitsProcessor, batch: int) -> LogitsProcessor:
    """``dst`` (a ``batch``-row processor) with rows ``index`` (``[G]``) of its per-row values
    replaced by ``src``'s (the same processor for ``G`` rows); indices >= batch are dropped."""
    per_row = {}

    def collect(proc, prefix):
        if isinstance(proc, Chain):
            for i, p in enumerate(proc.processors):
                collect(p, prefix + (i,))
        elif dataclasses.is_dataclass(proc):
            per_row[prefix] = proc

    collect(src, ())

    def walk(proc, prefix):
        if isinstance(proc, Chain):
            new = object.__new__(Chain)
            _set(new, "processors", tuple(walk(p, prefix + (i,)) for i, p in enumerate(proc.processors)))
            return new
        if not dataclasses.is_dataclass(proc):
            return proc
        other = per_row[prefix]
        return _map_rows(proc, batch, lambda name, value: value.at[index].set(
            getattr(other, name).astype(value.dtype), mode="drop"))

    return walk(dst, ())
