"""Logit filters: pure functions ``logits[..., V] -> logits[..., V]``.

Conventions (the contract is ``docs/sampling.md``):

* Same shape and dtype out as in; only the last axis is touched, so every filter works
  on one row, on a batch, under ``jit``, ``vmap`` and ``lax.scan``. Work is done in
  float32 (bf16 input is upcast exactly) and the result is cast back to the input dtype.
* A removed token gets ``-inf``; a kept token keeps its logit *unchanged* (bit for bit).
* Every numeric parameter is a Python number or an array broadcastable to
  ``logits.shape[:-1]`` (one value per row). Values are traced: they are never used in
  Python control flow, so changing one never recompiles.
* Every truncation is "find a per-row threshold, keep ``score >= threshold``", with the
  thresholds found by :mod:`jaxsample._select` without sorting the vocabulary (radix
  select on the float bits: scatter histograms and a ``lax.top_k`` candidate window on
  CPU, a Pallas counting kernel on GPU). Each filter's body (``*_rows``) takes a
  `VocabShard`, so the same code runs on whole rows and, inside `shard_map`, on
  vocab-sharded ones (`jaxsample.ShardedSampler`). Ties at a
  boundary are therefore always kept, and the kept set is the one a sort would give.
* Work that every row has disabled (top-k with ``k = 0``, top-p with ``p = 1``, ...,
  the greedy branch of :func:`temperature`) is skipped behind a batch-wide
  ``lax.cond``, so a chain that always carries every stage pays only for what it uses.
* A truncation never empties a row: the ``min_tokens_to_keep`` highest-logit tokens (and
  any ties with the last of them) always survive; for :func:`typical_p` the most
  *typical* ones (transformers' order). Only explicit masks
  (:func:`ban_tokens`, :func:`allow_tokens`, a ``-inf`` bias) can empty a row; a row
  with no finite logit stays that way through every filter (all ``-inf``) and
  :func:`jaxsample.sample` returns ``-1`` for it.
* NaN: filters give no guarantee on a row that contains a NaN logit (other rows are
  unaffected); :func:`jaxsample.sample` and :func:`jaxsample.greedy` return ``-1`` for
  such a row. ``+inf`` logits are not supported and are treated the same way.
* Invalid values known in Python raise ``ValueError`` naming the filter, the
  parameter and the value; nothing is silently clamped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample._selection import select as _select
from jaxsample import _validation as _val
from jaxsample._selection.select import VocabShard

__all__ = [
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_n_sigma",
    "logit_bias",
    "sparse_logit_bias",
    "ban_tokens",
    "allow_tokens",
]

Array = jax.Array
ArrayLike = Any

_F32 = jnp.float32


# ----------------------------------------------------------------------------- helpers


def _start(fn: str, logits: ArrayLike, **params: Any) -> tuple[Array, tuple[int, ...]]:
    """Validates logits and the per-row parameter shapes; returns (logits, batch shape)."""
    _val.check_logits(logits, fn)
    logits = jnp.asarray(logits)
    batch_shape = logits.shape[:-1]
    for name, value in params.items():
        _val.check_batch_shape(fn, name, value, batch_shape)
    return logits, batch_shape


def _apply_truncation(fn: str, logits: ArrayLike, value: ArrayLike, min_tokens_to_keep: int) -> Array:
    """The public truncation ``fn`` (its row of :data:`TABLE`): validates the logits, the
    value and ``min_tokens_to_keep``, then runs the jitted `_truncation_on_rows`."""
    field = TABLE[fn].field
    logits, _ = _start(fn, logits, **{field: value})
    _val.check_param(fn, field, value)
    m = _val.check_min_tokens_to_keep(fn, min_tokens_to_keep)
    return _truncation_on_rows(logits, value, fn=fn, min_tokens_to_keep=m)  # value traced: no recompiles


@functools.partial(jax.jit, static_argnames=("fn", "min_tokens_to_keep"))
def _truncation_on_rows(logits: Array, value: ArrayLike, fn: str, min_tokens_to_keep: int) -> Array:
    """The per-row body of truncation ``fn`` on whole rows, skipped when its ``off`` test
    holds for every row (filters without one always run)."""
    spec = TABLE[fn]
    body = lambda x: spec.rows(x, value, min_tokens_to_keep, _whole(x))  # noqa: E731
    if spec.off is None:
        return body(logits)
    return _unless_all_disabled(spec.disabled(value, logits.shape[-1]), body, logits)


def _per_row(value: ArrayLike, dtype=_F32) -> Array:
    """A scalar or ``[...]`` parameter as ``[..., 1]``, to broadcast against ``[..., V]``."""
    return jnp.asarray(value, dtype=dtype)[..., None]


def _keep(logits: Array, keep: Array) -> Array:
    """Kept tokens unchanged, removed ones ``-inf``; dtype preserved."""
    return jnp.where(keep, logits, jnp.array(-jnp.inf, logits.dtype))


def _select_input(logits: Array, x: Array) -> Array:
    """What the selection runs on: 16-bit logits as they are (their 16-bit keys need
    one radix pass, and their float32 values are exact), anything else as float32."""
    return logits if jnp.dtype(logits.dtype).itemsize == 2 else x


def _whole(logits: Array) -> VocabShard:
    return VocabShard.whole(logits.shape[-1])


def _unless_all_disabled(disabled: Array, fn, logits: Array) -> Array:
    """``fn(logits)``, skipped (identity) when every row has the disabled value.

    A batch-wide predicate: a chain that always carries e.g. a top-k stage pays for its
    selection only when some row enables it. (Under ``vmap`` the ``cond`` becomes a
    select and both branches run, which is still correct.)
    """
    return jax.lax.cond(jnp.all(disabled), lambda x: x, fn, logits)


def _truncate(logits: Array, threshold: Array, min_tokens_to_keep: int, shard: VocabShard,
              row_max: Array | None = None) -> Array:
    """Keeps ``x >= threshold`` (a ``[...]`` logit threshold) plus the top-m tokens.

    ``x >= t or x >= top_m`` is ``x >= min(t, top_m)``: still one threshold per row.
    ``row_max`` (``[...]``) is ``shard.max(x)`` when the caller has it already.
    """
    x = logits.astype(_F32)
    if min_tokens_to_keep == 1 and row_max is not None:
        top = row_max
    else:
        top = shard.top_value(_select_input(logits, x), min_tokens_to_keep).astype(_F32)
    threshold = jnp.minimum(threshold, top)
    return _keep(logits, x >= threshold[..., None])


# ----------------------------------------------------------------------------- row bodies
#
# Each filter's computation on rows ``[..., V_local]`` of a vocabulary that may be split
# over devices: every reduction over the vocabulary goes through ``shard`` (identity on
# one device, a collective inside `shard_map`). The public filters below run them on
# whole rows; `jaxsample.ShardedSampler` runs the very same bodies on vocab shards.


def temperature_rows(logits: Array, t: Array, shard: VocabShard) -> Array:
    """:func:`temperature` without the disabled-row shortcut for greedy rows."""
    x = logits.astype(_F32)  # [..., V]
    t = _per_row(t)  # [..., 1]
    is_greedy = t == 0
    scaled = x / jnp.where(is_greedy, 1.0, t)

    def with_greedy_rows(scaled):
        top = shard.argmax(x)  # [...], lowest index on ties
        greedy = jnp.where(shard.ids() == top[..., None], x, -jnp.inf)
        return jnp.where(is_greedy, greedy, scaled)

    # The arg-max pass only when some row is greedy (a batch-wide predicate).
    out = jax.lax.cond(jnp.any(is_greedy), with_greedy_rows, lambda s: s, scaled)
    return out.astype(logits.dtype)


def top_k_rows(logits: Array, k: Array, min_tokens_to_keep: int, shard: VocabShard) -> Array:
    vocab = shard.vocab_size
    k = jnp.asarray(k).astype(jnp.int32)  # [...] or scalar
    off = (k <= 0) | (k >= vocab)
    k_eff = jnp.where(off, vocab, jnp.maximum(k, min_tokens_to_keep))
    x = logits.astype(_F32)
    threshold = _select.kth_largest(_select_input(logits, x), k_eff, shard=shard)
    return _keep(logits, x >= threshold.astype(_F32)[..., None])


def top_p_rows(logits: Array, p: Array, min_tokens_to_keep: int, shard: VocabShard) -> Array:
    x = logits.astype(_F32)
    # [...] logit threshold, softmax weights
    threshold = _select.mass_threshold(_select_input(logits, x), None, p, shard=shard)
    return _truncate(logits, threshold.astype(_F32), min_tokens_to_keep, shard)


def min_p_rows(logits: Array, p: Array, min_tokens_to_keep: int, shard: VocabShard) -> Array:
    x = logits.astype(_F32)
    row_max = shard.max(x)
    threshold = row_max + jnp.log(jnp.asarray(p, _F32))  # [...]
    return _truncate(logits, threshold, min_tokens_to_keep, shard, row_max)


def typical_p_rows(logits: Array, p: Array, min_tokens_to_keep: int, shard: VocabShard) -> Array:
    x = logits.astype(_F32)
    logq = shard.log_softmax(x)  # [..., V]
    q = jnp.exp(logq)
    entropy = shard.entropy(logq)  # [...]
    score = -jnp.abs(-logq - entropy[..., None])  # [..., V], higher = more typical
    threshold = _select.mass_threshold(score, q, p, shard=shard)  # [...] in score space
    if min_tokens_to_keep > 1:  # the m most *typical* tokens (transformers)
        threshold = jnp.minimum(threshold, shard.top_value(score, min_tokens_to_keep))
    return _keep(logits, score >= threshold[..., None])


def epsilon_cutoff_rows(logits: Array, epsilon: Array, min_tokens_to_keep: int,
                        shard: VocabShard) -> Array:
    x = logits.astype(_F32)
    threshold = shard.logsumexp(x) + jnp.log(jnp.asarray(epsilon, _F32))
    return _truncate(logits, threshold, min_tokens_to_keep, shard)


def eta_cutoff_rows(logits: Array, eta: Array, min_tokens_to_keep: int, shard: VocabShard) -> Array:
    x = logits.astype(_F32)
    entropy = shard.entropy(shard.log_softmax(x))  # [...]
    log_eta = jnp.log(jnp.asarray(eta, _F32))
    log_cutoff = jnp.minimum(log_eta, 0.5 * log_eta - entropy)  # ln min(eta, sqrt(eta) e^-H)
    threshold = shard.logsumexp(x) + log_cutoff
    return _truncate(logits, threshold, min_tokens_to_keep, shard)


def top_n_sigma_rows(logits: Array, n: Array, min_tokens_to_keep: int, shard: VocabShard) -> Array:
    x = logits.astype(_F32)
    finite = jnp.isfinite(x)
    count = jnp.maximum(shard.sum(finite.astype(_F32)), 1.0)[..., None]  # [..., 1]
    mean = shard.sum(jnp.where(finite, x, 0.0))[..., None] / count
    var = shard.sum(jnp.where(finite, jnp.square(x - mean), 0.0)) / count[..., 0]
    n = jnp.asarray(n, _F32)
    row_max = shard.max(x)
    # n = inf with std = 0 would give max - nan: the identity is explicit instead.
    threshold = jnp.where(jnp.isinf(n), -jnp.inf, row_max - n * jnp.sqrt(var))
    return _truncate(logits, threshold, min_tokens_to_keep, shard, row_max)


# ----------------------------------------------------------------------------- temperature


def temperature(logits: ArrayLike, t: ArrayLike) -> Array:
    """Divides logits by a per-row temperature; ``t = 0`` means greedy for that row.

    Math: ``out = logits / t`` for ``t > 0``. For ``t = 0`` only the arg-max token
    survives (lowest index on an exact tie) with its logit unchanged; every other token
    gets ``-inf``. ``t = 1`` is the identity. A batch can mix greedy and sampled rows.

    Args:
      logits: ``[..., V]`` floating array.
      t: temperature ``>= 0`` (finite), scalar or broadcastable to ``logits.shape[:-1]``.

    Returns:
      ``[..., V]`` array of ``logits.dtype``.

    Raises:
      ValueError: for a concrete negative, infinite or NaN ``t``.

    Example:
      >>> import jax.numpy as jnp
      >>> temperature(jnp.array([[1.0, 2.0], [1.0, 2.0]]), jnp.array([2.0, 0.0]))
      Array([[ 0.5,  1. ],
             [-inf,  2. ]], dtype=float32)
    """
    logits, _ = _start("temperature", logits, t=t)
    _val.check_param("temperature", "t", t)
    return _temperature(logits, t)


@jax.jit
def _temperature(logits: Array, t: ArrayLike) -> Array:
    return temperature_rows(logits, t, _whole(logits))


# ----------------------------------------------------------------------------- truncations


def top_k(logits: ArrayLike, k: ArrayLike, *, min_tokens_to_keep: int = 1) -> Array:
    """Keeps the tokens whose logit is at least the ``k``-th largest (ties kept).

    Math: ``keep_i = x_i >= x_(k)`` where ``x_(k)`` is the k-th largest logit of the row
    (transformers, vLLM). ``k = 0`` or ``k >= V`` is the identity (not greedy);
    ``k = 1`` keeps the arg-max (and exact ties with it). ``k`` is raised to
    ``min_tokens_to_keep`` when enabled.

    Args:
      logits: ``[..., V]`` floating array.
      k: integer ``>= 0``, scalar or broadcastable to ``logits.shape[:-1]``. A static
        Python int or a traced array (any value per row, no static cap); neither sorts
        the vocabulary (``lax.top_k`` for a small static k, a candidate window, radix
        select).
      min_tokens_to_keep: static int ``>= 1``.

    Returns:
      ``[..., V]`` array of ``logits.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> top_k(jnp.array([1.0, 3.0, 2.0, 3.0]), 1)
      Array([-inf,   3., -inf,   3.], dtype=float32)
    """
    return _apply_truncation("top_k", logits, k, min_tokens_to_keep)


def top_p(logits: ArrayLike, p: ArrayLike, *, min_tokens_to_keep: int = 1) -> Array:
    """Nucleus filtering: the smallest high-probability set with mass ``>= p``.

    Math: ``q = softmax(x)``; sort ``q`` descending; ``m`` = first position where the
    running mass reaches ``p``; keep every token with ``q_i >= q_(m)`` (ties kept).
    ``p = 1`` is the identity (transformers, vLLM).

    Args:
      logits: ``[..., V]`` floating array.
      p: mass in ``(0, 1]``, scalar or broadcastable to ``logits.shape[:-1]``.
      min_tokens_to_keep: static int ``>= 1``.

    Returns:
      ``[..., V]`` array of ``logits.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
      >>> jnp.isfinite(top_p(x, 0.7))
      Array([ True,  True, False, False], dtype=bool)
    """
    return _apply_truncation("top_p", logits, p, min_tokens_to_keep)


def min_p(logits: ArrayLike, p: ArrayLike, *, min_tokens_to_keep: int = 1) -> Array:
    """Keeps tokens at least ``p`` times as likely as the most likely one.

    Math: ``keep_i = q_i >= p * max(q)``, i.e. ``x_i >= max(x) + ln p`` (vLLM,
    llama.cpp). Not ``x_i >= p * max(x)``, which is wrong for negative logits.
    ``p = 0`` is the identity; ``p = 1`` keeps the arg-max and its ties.

    Args:
      logits: ``[..., V]`` floating array.
      p: ratio in ``[0, 1]``, scalar or broadcastable to ``logits.shape[:-1]``.
      min_tokens_to_keep: static int ``>= 1``.

    Returns:
      ``[..., V]`` array of ``logits.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
      >>> jnp.isfinite(min_p(x, 0.25))
      Array([ True,  True,  True, False], dtype=bool)
    """
    return _apply_truncation("min_p", logits, p, min_tokens_to_keep)


def typical_p(logits: ArrayLike, p: ArrayLike, *, min_tokens_to_keep: int = 1) -> Array:
    """Locally typical filtering: the tokens whose surprisal is closest to the entropy.

    Math: ``q = softmax(x)``, ``H = -sum q_i ln q_i``, ``score_i = |-ln q_i - H|``;
    keep the smallest set of lowest-score tokens whose mass reaches ``p`` (ties in
    score kept), as in transformers' ``TypicalLogitsWarper``. ``min_tokens_to_keep``
    counts in the same order: the ``m`` most *typical* tokens (lowest score, ties kept)
    always survive; the arg-max is not forced in (docs/sampling.md). ``p = 1`` is the
    identity.

    Args:
      logits: ``[..., V]`` floating array.
      p: mass in ``(0, 1]``, scalar or broadcastable to ``logits.shape[:-1]``.
      min_tokens_to_keep: static int ``>= 1``.

    Returns:
      ``[..., V]`` array of ``logits.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1]))
      >>> jnp.isfinite(typical_p(x, 0.5))  # the typical set {0.3, 0.2}
      Array([False,  True,  True, False], dtype=bool)
    """
    return _apply_truncation("typical_p", logits, p, min_tokens_to_keep)


def epsilon_cutoff(
    logits: ArrayLike, epsilon: ArrayLike, *, min_tokens_to_keep: int = 1
) -> Array:
    """Keeps tokens with probability at least ``epsilon`` (transformers).

    Math: ``keep_i = q_i >= epsilon``, i.e. ``x_i >= logsumexp(x) + ln epsilon``.
    ``epsilon = 0`` is the identity.

    Args:
      logits: ``[..., V]`` floating array.
      epsilon: probability in ``[0, 1)``, scalar or broadcastable to
        ``logits.shape[:-1]``.
      min_tokens_to_keep: static int ``>= 1``.

    Returns:
      ``[..., V]`` array of ``logits.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
      >>> jnp.isfinite(epsilon_cutoff(x, 0.1))
      Array([ True,  True,  True, False], dtype=bool)
    """
    return _apply_truncation("epsilon_cutoff", logits, epsilon, min_tokens_to_keep)


def eta_cutoff(logits: ArrayLike, eta: ArrayLike, *, min_tokens_to_keep: int = 1) -> Array:
    """Entropy-dependent probability cutoff (transformers).

    Math: ``cutoff = min(eta, sqrt(eta) * exp(-H))`` with ``H`` the entropy of
    ``q = softmax(x)``; ``keep_i = q_i >= cutoff``. ``eta = 0`` is the identity.

    Args:
      logits: ``[..., V]`` floating array.
      eta: in ``[0, 1)``, scalar or broadcastable to ``logits.shape[:-1]``.
      min_tokens_to_keep: static int ``>= 1``.

    Returns:
      ``[..., V]`` array of ``logits.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
      >>> jnp.isfinite(eta_cutoff(x, 0.3))  # cutoff = sqrt(0.3) * exp(-H) = 0.175
      Array([ True,  True, False, False], dtype=bool)
    """
    return _apply_truncation("eta_cutoff", logits, eta, min_tokens_to_keep)


def top_n_sigma(logits: ArrayLike, n: ArrayLike, *, min_tokens_to_keep: int = 1) -> Array:
    """Keeps logits within ``n`` standard deviations of the maximum (llama.cpp).

    Math: ``keep_i = x_i >= max(x) - n * std(x)``, mean and (population) std over the
    finite logits of the row. ``n = +inf`` is the identity; ``n = 0`` keeps the arg-max
    and its ties.

    Args:
      logits: ``[..., V]`` floating array.
      n: ``>= 0`` (``+inf`` allowed), scalar or broadcastable to ``logits.shape[:-1]``.
      min_tokens_to_keep: static int ``>= 1``.

    Returns:
      ``[..., V]`` array of ``logits.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> jnp.isfinite(top_n_sigma(jnp.array([0.0, 1.0, 2.0, 3.0]), 1.0))
      Array([False, False,  True,  True], dtype=bool)
    """
    return _apply_truncation("top_n_sigma", logits, n, min_tokens_to_keep)


# ----------------------------------------------------------------------------- biases, masks


def logit_bias(logits: ArrayLike, bias: ArrayLike) -> Array:
    """Adds a dense bias: ``out = logits + bias`` (computed in float32).

    Args:
      logits: ``[..., V]`` floating array.
      bias: ``[V]`` or ``[..., V]`` floating array broadcastable to ``logits.shape``.
        ``-inf`` entries ban tokens (and may empty a row).

    Returns:
      ``[..., V]`` array of ``logits.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> logit_bias(jnp.zeros(3), jnp.array([1.0, 0.0, -jnp.inf]))
      Array([  1.,   0., -inf], dtype=float32)
    """
    _val.check_logits(logits, "logit_bias")
    logits = jnp.asarray(logits)
    shape = tuple(np.shape(bias))
    try:
        ok = len(shape) >= 1 and np.broadcast_shapes(shape, logits.shape) == logits.shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"logit_bias: bias must be [V] or [..., V] broadcastable to logits.shape = "
            f"{logits.shape}, got bias of shape {shape}"
        )
    _val.check_bias("logit_bias", "bias", bias)
    return _logit_bias(logits, jnp.asarray(bias))


@jax.jit
def _logit_bias(logits: Array, bias: ArrayLike) -> Array:
    out = logits.astype(_F32) + jnp.asarray(bias).astype(_F32)
    return out.astype(logits.dtype)


def _check_ids(fn: str, logits: Array, token_ids: ArrayLike) -> None:
    """Token ids: integer, in ``[-1, V)`` when concrete, leading axes fit the batch."""
    _val.check_token_ids(fn, "token_ids", token_ids, logits.shape[-1])
    _val.check_batch_shape(
        fn, "token_ids.shape[:-1]", None, logits.shape[:-1], shape=np.shape(token_ids)[:-1]
    )


def _row_scatter(
    shape: tuple[int, ...], token_ids: Array, values: Array | None
) -> Array:
    """Scatters per-row ``values`` at ``token_ids`` (``-1`` = padding) into ``shape``.

    With ``values`` returns a float32 ``[..., V]`` of summed values; with ``None`` a bool
    ``[..., V]`` that is True at the listed ids. Out-of-range ids are dropped.
    """
    batch_shape, vocab = shape[:-1], shape[-1]
    n = token_ids.shape[-1]
    full = batch_shape + (n,)
    rows = int(np.prod(batch_shape, dtype=np.int64))
    ids = jnp.broadcast_to(token_ids, full).reshape(rows, n).astype(jnp.int32)  # [B, N]
    ids = jnp.where(ids < 0, vocab, ids)  # padding -> out of range -> dropped
    row_index = jnp.arange(rows)[:, None]  # [B, 1]
    if values is not None:
        vals = jnp.broadcast_to(values, full).reshape(rows, n).astype(_F32)
        out = jnp.zeros((rows, vocab), _F32).at[row_index, ids].add(vals, mode="drop")
    else:
        out = jnp.zeros((rows, vocab), bool).at[row_index, ids].set(True, mode="drop")
    return out.reshape(shape)


@jax.jit
def _sparse_logit_bias(logits: Array, token_ids: Array, values: Array) -> Array:
    delta = _row_scatter(logits.shape, token_ids, values)
    return (logits.astype(_F32) + delta).astype(logits.dtype)


@functools.partial(jax.jit, static_argnames="allow")
def _mask_tokens(logits: Array, token_ids: Array, allow: bool) -> Array:
    listed = _row_scatter(logits.shape, token_ids, None)
    return _keep(logits, listed if allow else ~listed)


def sparse_logit_bias(logits: ArrayLike, token_ids: ArrayLike, values: ArrayLike) -> Array:
    """Adds ``values`` at ``token_ids`` per row; ``-1`` ids are padding.

    Math: ``out[..., v] = logits[..., v] + sum_{j : ids[..., j] = v} values[..., j]``
    (repeated ids add up).

    Args:
      logits: ``[..., V]`` floating array.
      token_ids: ``[N]`` or ``[..., N]`` integer array (leading axes broadcastable to
        ``logits.shape[:-1]``), ids in ``[0, V)`` or ``-1`` for padding.
      values: floating array broadcastable to ``token_ids``' ``[..., N]``.

    Returns:
      ``[..., V]`` array of ``logits.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> sparse_logit_bias(jnp.zeros(4), jnp.array([2, -1]), jnp.array([5.0, 9.0]))
      Array([0., 0., 5., 0.], dtype=float32)
    """
    _val.check_logits(logits, "sparse_logit_bias")
    logits = jnp.asarray(logits)
    ids_shape = tuple(np.shape(token_ids))
    full = logits.shape[:-1] + ids_shape[-1:]
    try:
        ok = np.broadcast_shapes(tuple(np.shape(values)), full) == full
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"sparse_logit_bias: values must broadcast to token_ids' shape {full}, "
            f"got values of shape {tuple(np.shape(values))}"
        )
    _check_ids("sparse_logit_bias", logits, token_ids)
    _val.check_bias("sparse_logit_bias", "values", values)
    return _sparse_logit_bias(logits, jnp.asarray(token_ids), jnp.asarray(values))


def ban_tokens(logits: ArrayLike, token_ids: ArrayLike) -> Array:
    """Sets the listed tokens to ``-inf``; ``-1`` ids are padding. May empty a row.

    Args:
      logits: ``[..., V]`` floating array.
      token_ids: ``[N]`` or ``[..., N]`` integer array, ids in ``[0, V)`` or ``-1``.

    Returns:
      ``[..., V]`` array of ``logits.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> ban_tokens(jnp.zeros(4), jnp.array([1, -1, 3]))
      Array([  0., -inf,   0., -inf], dtype=float32)
    """
    _val.check_logits(logits, "ban_tokens")
    logits = jnp.asarray(logits)
    _check_ids("ban_tokens", logits, token_ids)
    return _mask_tokens(logits, jnp.asarray(token_ids), allow=False)


def allow_tokens(logits: ArrayLike, token_ids: ArrayLike) -> Array:
    """Sets every token *not* listed to ``-inf``; ``-1`` ids are padding.

    A row whose list is all padding is emptied (every logit ``-inf``).

    Args:
      logits: ``[..., V]`` floating array.
      token_ids: ``[N]`` or ``[..., N]`` integer array, ids in ``[0, V)`` or ``-1``.

    Returns:
      ``[..., V]`` array of ``logits.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> allow_tokens(jnp.zeros(4), jnp.array([1, -1, 3]))
      Array([-inf,   0., -inf,   0.], dtype=float32)
    """
    _val.check_logits(logits, "allow_tokens")
    logits = jnp.asarray(logits)
    _check_ids("allow_tokens", logits, token_ids)
    return _mask_tokens(logits, jnp.asarray(token_ids), allow=True)


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Filter:
    """One row of :data:`TABLE`: what every layer needs to know about a per-row filter.

    Read by the filters' batch-wide shortcut (above), the processors of
    :mod:`jaxsample._processors.builtin` (their value field and its default), the chain
    presets (``prune``), the vocab-parallel rules of :mod:`jaxsample._sharding` and the
    command line (``scripts/_cli.py``, through the processors' ``spec``).

    Attributes:
      name: the filter (``jaxsample.<name>``) and its keyword in the presets.
      field: the processor's value field.
      identity: the value that leaves every row as it is (the default: "off").
      dtype: the value's dtype (int32 counts, float32 otherwise).
      rows: the per-row body ``rows(logits, values, min_tokens_to_keep, shard)`` (whole
        rows or a vocab shard alike); ``None`` for temperature (its body takes no
        ``min_tokens_to_keep``).
      off: ``off(values, vocab) -> bool [...]``, the rows the filter leaves as they are;
        when every row of a batch is off, the filter is skipped (one batch-wide
        ``lax.cond``). ``None``: never skipped (a cheap filter: one or two reductions).
      flag: the command-line flag.
      help: what the flag's help says after the identity (e.g. ``"0 disables"``).
    """

    name: str
    field: str
    identity: float | int
    dtype: Any
    rows: Callable | None
    off: Callable[[Any, int], Any] | None
    flag: str
    help: str

    def disabled(self, values: Any, vocab: int) -> Array:
        """``off(values, vocab)`` (all False where the filter has no ``off`` test)."""
        values = jnp.asarray(values)
        return jnp.zeros(values.shape, bool) if self.off is None else self.off(values, vocab)

    def enabled(self, values: Any, vocab: int) -> Array:
        """The rows the filter changes (the negation of :meth:`disabled`)."""
        return ~self.disabled(values, vocab)


def _filter(name, field, identity, rows, off, help, dtype=np.float32):
    return Filter(name, field, identity, dtype, rows, off, "--" + name.replace("_", "-"), help)


#: The per-row filters, in the default order of a chain.
TABLE: dict[str, Filter] = {f.name: f for f in (
    _filter("temperature", "t", 1.0, None, None, "1 is the identity, 0 greedy"),
    _filter("top_k", "k", 0, top_k_rows, lambda k, vocab: (k <= 0) | (k >= vocab), "0 disables",
            dtype=np.int32),
    _filter("top_p", "p", 1.0, top_p_rows, lambda p, vocab: p >= 1, "1 disables"),
    _filter("min_p", "p", 0.0, min_p_rows, lambda p, vocab: p <= 0, "0 disables"),
    _filter("typical_p", "p", 1.0, typical_p_rows, lambda p, vocab: p >= 1, "1 disables"),
    _filter("epsilon_cutoff", "epsilon", 0.0, epsilon_cutoff_rows, None, "0 disables"),
    _filter("eta_cutoff", "eta", 0.0, eta_cutoff_rows, None, "0 disables"),
    _filter("top_n_sigma", "n", float("inf"), top_n_sigma_rows, None, "inf disables"),
)}
