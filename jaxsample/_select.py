"""Per-row selection primitives: the thresholds the truncation filters keep above.

Every truncation filter in :mod:`jaxsample._filters` is written as

    threshold = <one of the primitives below>(...)      # [...]
    keep      = score >= threshold[..., None]           # [..., V]

so the filters never depend on *how* a threshold is found. This module is the seam:
the implementations here are plain sort / ``lax.top_k`` based; a sort-free
implementation (radix select on the float bits, bisection on the threshold) can
replace it as long as it returns the same values, which are defined by sets, not by
positions in a sort:

* ``kth_largest(x, k)`` is the largest value ``t`` in the row with
  ``#{i : x_i >= t} >= k``.
* ``mass_threshold(s, w, p)`` is the largest value ``t`` in the row with
  ``sum(w_i : s_i >= t) >= p * sum(w)``.

All functions work on the last axis and broadcast over the leading ones.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["kth_largest", "mass_threshold"]


def kth_largest(x: jax.Array, k) -> jax.Array:
    """The ``k``-th largest value of each row (1-based, duplicates counted).

    Math: ``kth_largest(x, k) = max{t in x : #{i : x_i >= t} >= k}``, with ``k``
    clamped to ``[1, V]``. ``x >= kth_largest(x, k)`` keeps at least ``k`` entries,
    more when there are ties at the boundary.

    Args:
      x: ``[..., V]`` float array (``-inf`` allowed; NaN rows give no guarantee).
      k: a static Python ``int`` (uses ``lax.top_k``) or an integer array
        broadcastable to ``x.shape[:-1]`` (traced; uses a full sort).

    Returns:
      ``[...]`` array of ``x.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> kth_largest(jnp.array([1.0, 3.0, 3.0, 2.0]), 2)
      Array(3., dtype=float32)
      >>> kth_largest(jnp.array([[1.0, 3.0, 3.0, 2.0]]), jnp.array([4]))
      Array([1.], dtype=float32)
    """
    vocab = x.shape[-1]
    try:
        k_static = operator.index(k)
    except TypeError:
        k_static = None
    if k_static is not None:
        k_static = min(max(k_static, 1), vocab)
        values, _ = lax.top_k(x, k_static)  # [..., k]
        return values[..., k_static - 1]
    ascending = jnp.sort(x, axis=-1)  # [..., V]
    k = jnp.clip(jnp.asarray(k).astype(jnp.int32), 1, vocab)  # [...]
    index = jnp.broadcast_to(vocab - k, x.shape[:-1])[..., None]  # [..., 1]
    return jnp.take_along_axis(ascending, index, axis=-1)[..., 0]


def mass_threshold(scores: jax.Array, weights: jax.Array | None, p) -> jax.Array:
    """Largest score whose upper set holds at least a fraction ``p`` of the mass.

    Math: with ``W = sum_i w_i``,
    ``t = max{s in scores : sum(w_i : s_i >= s) >= p * W}`` and ``t = -inf`` where
    ``p >= 1`` (so ``p = 1`` keeps everything even when fp32 rounding makes the
    running mass reach ``W`` early). Equivalently: sort by score descending, let ``m``
    be the first position where the running mass reaches ``p * W``, ``t = s[m]``;
    all ties with ``s[m]`` are inside ``scores >= t``.

    Nucleus (top-p) uses ``scores = logits`` with the default softmax weights; locally
    typical sampling uses ``scores = -|surprisal - entropy|, weights = q``.

    Args:
      scores: ``[..., V]`` float array; higher scores enter the set first.
      weights: ``[..., V]`` non-negative float array (unnormalised is fine), or
        ``None`` for ``exp(scores - max(scores))``, the softmax mass of logits.
      p: fraction in ``(0, 1]``, scalar or broadcastable to ``scores.shape[:-1]``.

    Returns:
      ``[...]`` threshold, same dtype as ``scores``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([3.5, 3.0, 2.0, 1.0])
      >>> w = jnp.array([0.5, 0.3, 0.15, 0.05])
      >>> mass_threshold(s, w, 0.7)
      Array(3., dtype=float32)
      >>> mass_threshold(jnp.log(w), None, 0.9)  # softmax weights: the same masses
      Array(-1.89712, dtype=float32)
    """
    vocab = scores.shape[-1]
    if weights is None:
        # Softmax mass of the scores themselves: one sort, weights from sorted values.
        neg_sorted = jnp.sort(-scores, axis=-1)  # [..., V] scores descending, negated
        w_sorted = jnp.exp(-neg_sorted - jnp.max(scores, axis=-1, keepdims=True))
    else:
        # Sort descending by score, carrying the weights along: [..., V] each.
        neg_sorted, w_sorted = lax.sort((-scores, weights), dimension=-1, num_keys=1)
    cum = jnp.cumsum(w_sorted, axis=-1)  # [..., V]
    p = jnp.asarray(p, dtype=cum.dtype)  # [...] or scalar
    target = p[..., None] * cum[..., -1:]  # [..., 1]
    m = jnp.sum(cum < target, axis=-1, dtype=jnp.int32)  # [...] first position reaching
    m = jnp.minimum(m, vocab - 1)
    t = -jnp.take_along_axis(neg_sorted, m[..., None], axis=-1)[..., 0]  # [...]
    return jnp.where(p >= 1, jnp.array(-jnp.inf, t.dtype), t)
