"""Argument checks shared by the filters, the sampler and the processors.

Every check works on what is known in Python and skips what is not:

* shapes and dtypes are static under ``jit``/``vmap``, so they are always checked;
* numeric *values* are checked only when they are concrete (Python numbers, NumPy
  arrays, concrete ``jax.Array``s). Tracers, ``jax.ShapeDtypeStruct``s and the
  sentinel objects JAX puts into pytrees while unflattening are skipped silently.

Nothing is clamped: an invalid value raises :class:`ValueError` naming the filter,
the parameter and the offending value.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "concrete_value",
    "check_logits",
    "check_range",
    "check_integer",
    "check_min_tokens_to_keep",
    "check_batch_shape",
    "check_token_ids",
    "check_bias",
    "canonical_scalar",
    "check_param",
    "PARAM_RANGES",
]

_INF = math.inf
_INT32_MAX = 2**31 - 1

#: (filter, parameter) -> (low, high, low_closed, high_closed). One table for the
#: filters and the processors, so both reject exactly the same values.
PARAM_RANGES: dict[tuple[str, str], tuple[float, float, bool, bool]] = {
    ("temperature", "t"): (0.0, _INF, True, False),
    ("top_k", "k"): (0.0, _INF, True, False),
    ("top_p", "p"): (0.0, 1.0, False, True),
    ("min_p", "p"): (0.0, 1.0, True, True),
    ("typical_p", "p"): (0.0, 1.0, False, True),
    ("epsilon_cutoff", "epsilon"): (0.0, 1.0, True, False),
    ("eta_cutoff", "eta"): (0.0, 1.0, True, False),
    ("top_n_sigma", "n"): (0.0, _INF, True, True),
}


def concrete_value(x: Any) -> np.ndarray | None:
    """Returns ``x`` as a NumPy array if its value is known in Python, else ``None``.

    Python numbers, (nested) lists and tuples of them, NumPy arrays/scalars and concrete
    ``jax.Array``s are concrete. Tracers and anything else (placeholders,
    ``ShapeDtypeStruct``, ``None``, a list holding a tracer) are not.

    Example:
      >>> concrete_value(0.5)
      array(0.5)
      >>> concrete_value(object()) is None
      True
    """
    if isinstance(x, (numbers.Number, np.ndarray, np.generic)):
        arr = np.asarray(x)
        return arr if arr.dtype.kind in "biuf" else None
    if isinstance(x, (list, tuple)):
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError, jax.errors.TracerArrayConversionError,
                jax.errors.ConcretizationTypeError):
            return None  # ragged, or holds tracers
        return arr if arr.dtype.kind in "biuf" else None
    if isinstance(x, jax.Array):
        try:
            return np.asarray(x)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            return None
    return None


def _describe(arr: np.ndarray, bad: np.ndarray) -> str:
    """Formats an offending value (``arr`` concrete, ``bad`` its offending entries)."""
    if arr.ndim == 0:
        return repr(arr.item())
    return f"{bad.flat[0].item()!r} (in an array of shape {arr.shape})"


def _dtype(value: Any) -> Any:
    """The dtype of an array (also a tracer), or of ``np.asarray(value)`` for numbers and lists."""
    dtype = getattr(value, "dtype", None)
    return np.asarray(value).dtype if dtype is None else dtype


def check_logits(logits: Any, fn: str) -> None:
    """Checks that ``logits`` is a floating array with at least one axis.

    Raises:
      ValueError: when the dtype is not floating or ``logits`` is a scalar.
    """
    dtype = _dtype(logits)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{fn}: logits must have a floating dtype, got logits of dtype {dtype}")
    if np.ndim(logits) < 1:
        raise ValueError(f"{fn}: logits must have a vocabulary axis, got logits of shape ()")


def check_range(
    fn: str,
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_closed: bool,
    high_closed: bool,
) -> None:
    """Checks a concrete ``value`` (scalar or array) lies in the interval; NaN fails.

    The interval is ``[low, high]`` with each end open or closed as requested.

    Example:
      >>> check_range("top_p", "p", 0.9, 0.0, 1.0, low_closed=False, high_closed=True)
      >>> check_range("top_p", "p", 0.0, 0.0, 1.0, low_closed=False, high_closed=True)
      Traceback (most recent call last):
      ...
      ValueError: top_p: p must be in (0, 1], got 0.0
    """
    arr = concrete_value(value)
    if arr is None:
        return
    x = arr.astype(np.float64)
    ok = (x >= low) if low_closed else (x > low)
    ok &= (x <= high) if high_closed else (x < high)
    ok &= ~np.isnan(x)
    if not np.all(ok):
        lo = "[" if low_closed else "("
        hi = "]" if high_closed else ")"

        def fmt(v: float) -> str:
            if math.isinf(v):
                return "inf" if v > 0 else "-inf"
            return f"{v:g}"

        raise ValueError(
            f"{fn}: {name} must be in {lo}{fmt(low)}, {fmt(high)}{hi}, "
            f"got {_describe(arr, arr[~ok])}"
        )


def check_param(fn: str, name: str, value: Any) -> None:
    """Checks a filter parameter against :data:`PARAM_RANGES` (concrete values only).

    Example:
      >>> check_param("top_k", "k", -1)
      Traceback (most recent call last):
      ...
      ValueError: top_k: k must be in [0, inf), got -1
    """
    low, high, low_closed, high_closed = PARAM_RANGES[(fn, name)]
    check_range(fn, name, value, low, high, low_closed=low_closed, high_closed=high_closed)
    if fn == "top_k":
        check_integer(fn, name, value)
        arr = concrete_value(value)
        if arr is not None and np.any(arr > _INT32_MAX):
            raise ValueError(f"{fn}: {name} must be at most 2**31 - 1 (k >= V keeps every token), "
                             f"got {_describe(arr, arr[arr > _INT32_MAX])}")


def check_integer(fn: str, name: str, value: Any) -> None:
    """Checks a concrete ``value`` has only whole numbers (any dtype)."""
    arr = concrete_value(value)
    if arr is None:
        return
    if arr.dtype.kind == "f":
        bad = arr[np.isnan(arr) | (arr != np.round(arr))]
        if bad.size:
            raise ValueError(f"{fn}: {name} must be an integer, got {_describe(arr, bad)}")


def check_int(name: str, value: Any, *, low: int = 1, high: int | None = None, fn: str | None = None,
              expected: str | None = None) -> int:
    """``value`` as a Python int in ``[low, high]``: the check of every static integer
    argument (counts, sizes, widths). Bools, floats, strings and arrays are refused.

    Args:
      name: the parameter, as the error names it.
      value: what was passed.
      low, high: the bounds (``high=None``: none).
      fn: the function, prefixed to the message (``"fn: name must be ..."``).
      expected: the message's wording of the range (default ``"a positive int"`` for
        ``low=1``, ``"an int >= low"`` or ``"an int in [low, high]"``).

    Raises:
      ValueError: ``"<fn>: <name> must be <expected>, got <value!r>"``.
    """
    ok = (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
          and value >= low and (high is None or value <= high))
    if not ok:
        if expected is None:
            expected = (f"an int in [{low}, {high}]" if high is not None
                        else "a positive int" if low == 1 else f"an int >= {low}")
        raise ValueError(f"{fn + ': ' if fn else ''}{name} must be {expected}, got {value!r}")
    return int(value)


def check_min_tokens_to_keep(fn: str, min_tokens_to_keep: Any) -> int:
    """Returns ``min_tokens_to_keep`` as a Python int, checking it is static and >= 1."""
    try:
        m = operator.index(min_tokens_to_keep)
    except TypeError:
        raise ValueError(
            f"{fn}: min_tokens_to_keep must be a Python int (it is static), "
            f"got {min_tokens_to_keep!r}"
        ) from None
    if m < 1:
        raise ValueError(f"{fn}: min_tokens_to_keep must be >= 1, got {m}")
    return m


def check_batch_shape(
    fn: str,
    name: str,
    value: Any,
    batch_shape: tuple[int, ...],
    *,
    shape: tuple[int, ...] | None = None,
) -> None:
    """Checks ``value`` (or a given ``shape``) broadcasts to ``batch_shape``.

    ``batch_shape`` is ``logits.shape[:-1]``: a parameter is a scalar or one value per
    row, and may not add axes. Shapes are static, so this check also runs under ``jit``.
    """
    if shape is None:
        shape = tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))
    shape = tuple(shape)
    try:
        out = np.broadcast_shapes(shape, batch_shape)
    except ValueError:
        out = None
    if out != tuple(batch_shape):
        raise ValueError(
            f"{fn}: {name} must be a scalar or broadcast to logits.shape[:-1] = "
            f"{tuple(batch_shape)} (one value per row), got {name} of shape {shape}"
        )


def check_token_ids(fn: str, name: str, token_ids: Any, vocab_size: int | None) -> None:
    """Checks token ids: integer dtype, and (when concrete) ``-1 <= id < vocab_size``."""
    dtype = _dtype(token_ids)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{fn}: {name} must be an integer array, got {name} of dtype {dtype}")
    if np.ndim(token_ids) < 1:
        raise ValueError(f"{fn}: {name} must have a last axis of ids, got shape ()")
    arr = concrete_value(token_ids)
    if arr is None:
        return
    bad = arr[arr < -1]
    if bad.size:
        raise ValueError(
            f"{fn}: {name} must be >= 0 (or -1 for padding), got {_describe(arr, bad)}"
        )
    if vocab_size is not None:
        bad = arr[arr >= vocab_size]
        if bad.size:
            raise ValueError(
                f"{fn}: {name} must be < vocab size {vocab_size}, got {_describe(arr, bad)}"
            )


def check_bias(fn: str, name: str, value: Any) -> None:
    """Checks concrete bias values: finite or ``-inf`` (a ban); NaN and ``+inf`` fail.

    A ``+inf`` bias would make the row's softmax NaN (no valid token), not force the
    token: use :func:`jaxsample.allow_tokens` to force one.
    """
    arr = concrete_value(value)
    if arr is None:
        return
    x = arr.astype(np.float64)
    bad = np.isnan(x) | (x == _INF)
    if np.any(bad):
        raise ValueError(f"{fn}: {name} must be finite or -inf (use allow_tokens to force a token), "
                         f"got {_describe(arr, arr[bad])}")


def canonical_scalar(value: Any, kind: type) -> Any:
    """Turns a concrete host scalar into a plain Python ``float`` or ``int``.

    Used by the processors so that ``TopP(1)`` and ``TopP(0.9)`` have the same leaf type
    (a weakly typed scalar under ``jit``), so switching between them never recompiles.
    Arrays, jax scalars and tracers are returned unchanged.
    """
    if isinstance(value, (numbers.Number, np.generic)) and not isinstance(value, jax.Array):
        if kind is int:
            return int(value)
        return float(value)
    return value
