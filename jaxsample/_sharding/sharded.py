"""Sampling on vocabulary-sharded logits, and data/model-parallel generation on a mesh.

When the embedding matrix ``[V, D]`` is split over a mesh axis (tensor parallelism), the
model's logits ``[B, V]`` come out split over the vocabulary. Everything here works on
those local slices with `jax.shard_map` and collective reductions over that axis, and
never gathers the ``[B, V]`` logits onto one device:

* row max / sum / log-sum-exp: local reduction, then ``lax.pmax`` / ``lax.psum``;
* every filter is `jaxsample._filters`' own body (``top_p_rows``, ...) run on the local
  slice with a `VocabShard` whose reductions are collectives: one implementation for
  one device and for shards;
* top-k: the exact k-th largest logit, found by the radix search of
  `jaxsample._select` whose per-candidate counts are ``psum``-ed (4 bits a pass, 8
  passes for float32, ``[B, 15]`` numbers per collective; the Pallas counting kernel on
  GPU, the XLA compare engine elsewhere), so a traced per-row ``k`` needs no static cap;
* top-p / typical-p: the same radix search over masses (``psum`` of the probability
  above each candidate threshold); min-p, epsilon, eta, top-n-sigma: thresholds from
  ``pmax`` / ``psum`` statistics (max, log-sum-exp, entropy, mean and variance);
* the draw: Gumbel-max (equivalently, an exponential race) with *counter-based* noise:
  token ``i`` of a row gets noise from a hash of (the row's key, the global token id
  ``i``), then a global arg-max (``pmax`` of the score, ``pmin`` of the index). The
  noise of a token does not depend on which device holds it, so the token drawn does
  not depend on the number of shards.

Every set is defined as in ``docs/sampling.md`` (thresholds, ties kept, at least
``min_tokens_to_keep`` tokens), so the sharded filters keep the same tokens as
`jaxsample.top_k`, `jaxsample.top_p`, ... One caveat for the mass-based filters
(top-p, typical-p): the running mass is a float32 sum whose order differs from the
single-device sort, so a token whose cumulative mass lies within float32 rounding of the
target (relative ~1e-6) may be decided differently. Counts (top-k) and max-based
thresholds (min-p) are exact.

Same tokens as one device. `gumbel_sample` is the single-device form of the sharded
draw (the same noise, token for token), and `gumbel_sample_step` is
`jaxsample.sample_step` with that draw. For the same keys, a sharded run and a
single-device run with `gumbel_sample_step` draw the same tokens; log-probs agree to
float32 rounding of the sharded reductions (|difference| <= 1e-4 in the tests, typically
~1e-6). `jaxsample.sample` (a two-stage inverse CDF) is exact in distribution
too but consumes randomness differently, so its tokens differ from the Gumbel draw's.

The counter-based noise is defined in :mod:`jaxsample._filters.gumbel`.

Example (8 simulated CPU devices; set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax)::

    import jax, jax.numpy as jnp, jaxsample as js
    from models import DecoderLM, preset
    from models.sharding import make_mesh, shard_model

    mesh = make_mesh((2, 4))                                   # ("data", "model")
    lm = shard_model(DecoderLM.random(preset("tiny"), jax.random.key(0)), mesh)
    keys = jax.random.split(jax.random.key(1), 8)
    out = js.sharded_generate(lm, jnp.full((8, 4), 72), jnp.full((8,), 4), keys,
                              max_new_tokens=16, sampler=js.default_chain(top_p=0.9))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsample._decoding import core as _core
from jaxsample._decoding.generate import generate
from jaxsample._filters import filters as _filters
from jaxsample._filters import sampling as _sampling
from jaxsample._filters.sampling import fold_in_rows
from jaxsample._filters.gumbel import _check_key, _draw, _keep, _row_seeds
from jaxsample._processors import builtin as _builtin
from jaxsample._processors.base import Chain, LogitsProcessor
from jaxsample._selection.select import VocabShard
from jaxsample._step.step import StepOutput

__all__ = [
    "VocabShard",
    "ShardedSampler",
    "sharded_sample_step",
    "sharded_generate",
    "register_vocab_parallel",
]

Array = jax.Array
ArrayLike = Any
State = Any

_F32 = jnp.float32
_U32 = jnp.uint32
_NEG_INF = -jnp.inf

# ----------------------------------------------------------------------------- local ops


def _draw_and_logprobs(seeds: Array, processed: Array, raw: Array, shard: VocabShard):
    """Draws from ``processed`` and reports both log-probs, in three collectives in all.

    The draw (`_draw`: ``pmax``, ``pmin``), then one ``psum`` of the stacked normalisers
    and picked logits. A log-prob is ``(x_t - max) - ln sum exp(x - max)``, the
    arithmetic of ``jax.nn.log_softmax``.

    Returns:
      ``(token int32[b], logprob_raw f32[b], logprob_processed f32[b])``; ``token = -1``
      and NaN log-probs for an invalid row.
    """
    token, valid, (top, top_raw) = _draw(seeds, processed, shard, raw=raw)
    x, x_raw = processed.astype(_F32), raw.astype(_F32)
    here = shard.ids()[None, :] == token[:, None]  # [b, V_local]
    shift, shift_raw = lax.stop_gradient(top)[:, None], lax.stop_gradient(top_raw)[:, None]
    local = jnp.stack([jnp.sum(jnp.exp(x_raw - shift_raw), -1), jnp.sum(jnp.exp(x - shift), -1),
                       jnp.sum(jnp.where(here, x_raw, 0.0), -1), jnp.sum(jnp.where(here, x, 0.0), -1)])
    norm_raw, norm, picked_raw, picked = shard._psum(local)  # [b] each
    nan = _F32(np.nan)
    lp_raw = jnp.where(valid, (picked_raw - top_raw) - jnp.log(norm_raw), nan)
    lp = jnp.where(valid, (picked - top) - jnp.log(norm), nan)
    return token, lp_raw, lp


def _logprob(logits: Array, token: Array, shard: VocabShard) -> Array:
    """``log_softmax(logits)[token]``; NaN for a token outside ``[0, V)``."""
    logp = shard.log_softmax(logits.astype(_F32))  # [b, V_local]
    here = shard.ids()[None, :] == token[:, None]
    picked = shard.sum(jnp.where(here, logp, 0.0))
    in_range = (token >= 0) & (token < shard.vocab_size)
    return jnp.where(in_range, picked, _F32(np.nan))


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class _Rule:
    params: Callable[[Any, int, int], dict]
    apply: Callable[[Any, dict, Array, VocabShard], Array]


_RULES: dict[type, _Rule] = {}

#: How each array returned by a rule's ``params`` is laid out on the mesh.
ROW, REPLICATED, VOCAB, ROW_VOCAB = "row", "replicated", "vocab", "row_vocab"


def register_vocab_parallel(processor_type: type, *, params: Callable, apply: Callable) -> None:
    """Registers the vocab-parallel implementation of a (stateless) processor type.

    Args:
      processor_type: a `jaxsample.LogitsProcessor` subclass.
      params: ``params(proc, batch_size, vocab_size) -> {name: (array, layout)}``: the
        processor's values as arrays with a canonical shape, and how each is laid out:
        ``"row"`` (``[B, ...]``, split like the batch), ``"replicated"``, ``"vocab"``
        (``[V]``, split like the vocabulary) or ``"row_vocab"`` (``[B, V]``).
      apply: ``apply(proc, local_params, logits, shard) -> logits``: the filter on the
        local slice ``logits[b, V_local]`` (any float dtype; return the same dtype),
        with ``local_params`` the local blocks of the arrays above and ``shard`` a
        `VocabShard` for reductions over the whole vocabulary. ``proc`` may only be used
        for its static fields (its array fields are not available inside `shard_map`).

    Example:
      >>> import jax.numpy as jnp, jaxsample as js
      >>> rule = lambda proc, p, logits, shard: logits   # an identity processor
      >>> register_vocab_parallel(js.LogitsProcessor, params=lambda *a: {}, apply=rule)
      >>> _ = _RULES.pop(js.LogitsProcessor)
    """
    _RULES[processor_type] = _Rule(params=params, apply=apply)


def _rows(value: ArrayLike, batch: int, dtype: Any) -> Array:
    return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))


def _per_row_rule(field: str, dtype: Any, enabled: Callable | None = None) -> Callable:
    """``params`` of a processor with one per-row value; ``enabled(values, vocab)`` (optional)
    adds a batch-wide flag ``"on"`` (replicated) to skip the filter when no row uses it."""

    def params(proc, batch, vocab):
        values = _rows(getattr(proc, field), batch, dtype)
        out = {field: (values, ROW)}
        if enabled is not None:
            out["on"] = (jnp.any(enabled(values, vocab)), REPLICATED)
        return out

    return params


def _apply_temperature(proc, p, logits, shard):
    return _filters.temperature_rows(logits, p["t"], shard)


def _shared_rule(body: Callable, field: str, gated: bool) -> Callable:
    """The vocab-parallel rule of a truncation: `jaxsample._filters`' own body on the
    local slice, behind the batch-wide ``"on"`` flag when the filter has one."""

    def apply(proc, p, logits, shard):
        def run():
            return body(logits, p[field], proc.min_tokens_to_keep, shard)

        return lax.cond(p["on"], run, lambda: logits) if gated else run()

    return apply


def _bias_params(proc, batch, vocab):
    bias = jnp.asarray(proc.bias, _F32)
    if bias.ndim == 1:
        return {"bias": (bias, VOCAB)}
    return {"bias": (jnp.broadcast_to(bias.reshape(-1, vocab), (batch, vocab)), ROW_VOCAB)}


def _apply_bias(proc, p, logits, shard):
    bias = p["bias"]
    bias = bias[None, :] if bias.ndim == 1 else bias
    return (logits.astype(_F32) + bias).astype(logits.dtype)


def _ids_params(proc, batch, vocab, with_values=False):
    ids = jnp.asarray(proc.token_ids, jnp.int32)
    out = {}
    if ids.ndim == 1:
        out["ids"] = (ids, REPLICATED)
        full = ids.shape
    else:
        full = (batch, ids.shape[-1])
        out["ids"] = (jnp.broadcast_to(ids.reshape(-1, ids.shape[-1]), full), ROW)
    if with_values:
        values = jnp.broadcast_to(jnp.asarray(proc.values, _F32),
                                  (ids.shape if ids.ndim == 1 else (batch,) + ids.shape[-1:]))
        values = values.reshape(full)
        out["values"] = (values, REPLICATED if ids.ndim == 1 else ROW)
    return out


def _local_scatter(p, rows: int, shard: VocabShard, values: bool) -> Array:
    """Scatters the listed ids that fall in this shard: float ``[b, V_local]`` sums or bool."""
    ids = p["ids"]
    n = ids.shape[-1]
    ids = jnp.broadcast_to(ids, (rows, n))
    local = ids - shard.offset
    local = jnp.where((ids >= 0) & (local >= 0) & (local < shard.local_size), local, shard.local_size)
    row = jnp.arange(rows)[:, None]
    if values:
        vals = jnp.broadcast_to(p["values"], (rows, n))
        return jnp.zeros((rows, shard.local_size), _F32).at[row, local].add(vals, mode="drop")
    return jnp.zeros((rows, shard.local_size), bool).at[row, local].set(True, mode="drop")


def _apply_sparse_bias(proc, p, logits, shard):
    delta = _local_scatter(p, logits.shape[0], shard, values=True)
    return (logits.astype(_F32) + delta).astype(logits.dtype)


def _apply_ban(proc, p, logits, shard):
    return _keep(logits, ~_local_scatter(p, logits.shape[0], shard, values=False))


def _apply_allow(proc, p, logits, shard):
    return _keep(logits, _local_scatter(p, logits.shape[0], shard, values=False))


# The per-row filters: their rows of the filter table (value field, dtype, "enabled"
# test, per-row body), through the processors that carry them.
for _type in (_builtin.Temperature, _builtin.TopK, _builtin.TopP, _builtin.MinP, _builtin.TypicalP,
              _builtin.EpsilonCutoff, _builtin.EtaCutoff, _builtin.TopNSigma):
    _spec = _type.spec
    _gated = _spec.off is not None
    register_vocab_parallel(
        _type, params=_per_row_rule(_spec.field, _spec.dtype, _spec.enabled if _gated else None),
        apply=_apply_temperature if _spec.rows is None else _shared_rule(_spec.rows, _spec.field, _gated))
register_vocab_parallel(_builtin.LogitBias, params=_bias_params, apply=_apply_bias)
register_vocab_parallel(_builtin.SparseLogitBias, params=functools.partial(_ids_params, with_values=True),
                        apply=_apply_sparse_bias)
register_vocab_parallel(_builtin.BanTokens, params=_ids_params, apply=_apply_ban)
register_vocab_parallel(_builtin.AllowTokens, params=_ids_params, apply=_apply_allow)
del _type, _spec, _gated


def _flatten(proc: LogitsProcessor) -> list[LogitsProcessor]:
    """The processors of a (nested) chain in application order."""
    if isinstance(proc, Chain):
        return [leaf for child in proc.processors for leaf in _flatten(child)]
    return [proc]


def _rules_for(proc: LogitsProcessor) -> list[tuple[LogitsProcessor, _Rule]]:
    out = []
    for leaf in _flatten(proc):
        rule = next((_RULES[t] for t in type(leaf).__mro__ if t in _RULES), None)
        if rule is None or leaf.stateful or leaf.needs_key:
            what = ("is stateful" if leaf.stateful else "needs a key" if leaf.needs_key
                    else "has no vocab-parallel implementation")
            raise NotImplementedError(
                f"sharded sampling: {type(leaf).__name__} {what}; supported processors: "
                f"{sorted(t.__name__ for t in _RULES)} (add one with "
                f"jaxsample.register_vocab_parallel)")
        out.append((leaf, rule))
    return out


# ----------------------------------------------------------------------------- single device


# ----------------------------------------------------------------------------- sharded


def _shard_map(f: Callable, mesh: Mesh, in_specs: Any, out_specs: Any,
               check_vma: bool = True) -> Callable:
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=check_vma)
    from jax.experimental.shard_map import shard_map  # jax < 0.6

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


@dataclasses.dataclass(frozen=True)
class ShardedSampler:
    """Sampling on logits ``[B, V]`` split as ``P(batch_axis, vocab_axis)`` over a mesh.

    Calling it is a drop-in for `jaxsample.sample_step` (same arguments and results),
    so the decode loop can use it as its per-step sampler. Each method runs one
    `jax.shard_map` whose only cross-device traffic is reductions of per-row numbers
    (``[b]`` or ``[b, 15]``): no array of size V is ever communicated. It is hashable
    (a valid static argument of `jax.jit`).

    Requirements: ``V`` divisible by the size of ``vocab_axis`` (`models.sharding` pads
    the vocabulary to ensure it) and ``B`` by the size of ``batch_axis``. Supported
    processors: every stateless one of `jaxsample` (temperature, top-k/p, min-p,
    typical-p, epsilon, eta, top-n-sigma, biases, bans, allow lists) and any registered
    with `register_vocab_parallel`.

    Attributes:
      mesh: the device mesh.
      vocab_axis: the mesh axis the vocabulary is split over.
      batch_axis: the mesh axis the batch is split over, or None (replicated batch).
      method: the selection method of the threshold searches (`VocabShard.method`):
        ``"auto"`` (the backend's sharded plan: the Pallas kernel on GPU, the XLA
        compare engine elsewhere) or a `jaxsample._select.Plan`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxsample as js
      >>> from models.sharding import make_mesh
      >>> sampler = ShardedSampler(make_mesh((1, 1)))
      >>> keys = jax.random.split(jax.random.key(0), 2)
      >>> logits = jnp.array([[0.0, 2.0, 1.0, 0.5], [3.0, 0.0, 0.0, 0.0]])
      >>> c = js.default_chain(top_k=1)
      >>> sampler(c, logits, c.init(None, None, 4), keys)[0]
      Array([1, 0], dtype=int32)
    """

    mesh: Mesh
    vocab_axis: str = "model"
    batch_axis: str | None = "data"
    method: Any = "auto"

    def __post_init__(self) -> None:
        for name in (self.vocab_axis, self.batch_axis):
            if name is not None and name not in self.mesh.shape:
                raise ValueError(f"ShardedSampler: the mesh has no axis {name!r}; its axes are "
                                 f"{tuple(self.mesh.axis_names)}")
        if self.vocab_axis == self.batch_axis:
            raise ValueError("ShardedSampler: vocab_axis and batch_axis must differ")

    # -- layout
    def _spec(self, layout: str) -> P:
        return {ROW: P(self.batch_axis), REPLICATED: P(), VOCAB: P(self.vocab_axis),
                ROW_VOCAB: P(self.batch_axis, self.vocab_axis)}[layout]

    @property
    def logits_sharding(self) -> NamedSharding:
        """Where the logits ``[B, V]`` are expected: ``P(batch_axis, vocab_axis)``."""
        return NamedSharding(self.mesh, P(self.batch_axis, self.vocab_axis))

    def constrain_rows(self, x: Array) -> Array:
        """``x`` (leading axis B) constrained to ``P(batch_axis)``: the decode loop pins its
        per-row carry and output buffers with it (`jaxsample.sharded_generate`)."""
        spec = P(self.batch_axis, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def _sizes(self, logits: Array) -> tuple[int, int, int]:
        if logits.ndim != 2:
            raise ValueError(f"ShardedSampler: logits must be [B, V], got shape {logits.shape}")
        batch, vocab = logits.shape
        nv = self.mesh.shape[self.vocab_axis]
        nb = 1 if self.batch_axis is None else self.mesh.shape[self.batch_axis]
        if vocab % nv:
            raise ValueError(f"ShardedSampler: V = {vocab} is not divisible by the {nv} devices of "
                             f"axis {self.vocab_axis!r} (pad the vocabulary: models.sharding.shard_model)")
        if batch % nb:
            raise ValueError(f"ShardedSampler: B = {batch} is not divisible by the {nb} devices of "
                             f"axis {self.batch_axis!r}")
        return batch, vocab, vocab // nv

    @property
    def _check_vma(self) -> bool:
        # Pallas' interpreter does not mark the constants of a kernel body as varying
        # over the manual axes (jax 0.10): interpreted kernels run without the check.
        return not getattr(self.method, "interpret", False)

    def _shard(self, vocab: int, local: int) -> VocabShard:
        return VocabShard.inside(vocab, local, self.vocab_axis, self.method)

    def _prepare(self, processor: LogitsProcessor, batch: int, vocab: int):
        rules = _rules_for(processor)
        arrays, specs = [], []
        for proc, rule in rules:
            params = rule.params(proc, batch, vocab)
            arrays.append({k: v for k, (v, _) in params.items()})
            specs.append({k: self._spec(layout) for k, (_, layout) in params.items()})
        return rules, arrays, specs

    @staticmethod
    def _apply_local(rules, arrays, logits, shard):
        for (proc, rule), params in zip(rules, arrays):
            logits = rule.apply(proc, params, logits, shard)
        return logits

    # -- public entry points (jitted with the sampler static: inlined inside a jit)
    def apply(self, processor: LogitsProcessor, logits: Array) -> Array:
        """Applies a (stateless) processor or chain to sharded logits: ``[B, V] -> [B, V]``.

        Equals ``processor(logits)`` on one device (see the module docstring for the
        float32 caveat of mass-based filters). The result keeps the input's layout.
        """
        return _apply_jit(self, processor, logits)

    def sample(self, key: ArrayLike, logits: Array) -> Array:
        """`gumbel_sample` on sharded logits: the same token for the same key, ``int32[B]``."""
        return _sample_jit(self, _sampling.as_typed_key(key), logits)

    def token_logprobs(self, logits: Array, tokens: ArrayLike) -> Array:
        """``log_softmax(logits)[token]`` per row (float32 ``[B]``; NaN for ``-1``)."""
        return _logprobs_jit(self, logits, jnp.asarray(tokens, jnp.int32))

    def top_logprobs(self, logits: Array, k: int) -> tuple[Array, Array]:
        """The ``k`` most likely tokens per row: ``(ids int32[B, k], log-probs float32[B, k])``.

        Distributed top-k: each device takes its local ``lax.top_k`` candidates, the
        ``[B, k]`` candidates of all shards are gathered (``k`` per shard, never ``V``)
        and merged with one more ``lax.top_k``. Same order as
        ``lax.top_k(log_softmax(logits), k)`` (on ties, the lower id first).
        """
        return _top_logprobs_jit(self, logits, int(k))

    def __call__(self, chain: LogitsProcessor, logits: Array, state: State,
                 key: ArrayLike) -> tuple[Array, State, StepOutput]:
        """One decode step on sharded logits; the contract of `jaxsample.sample_step`.

        Processors, the Gumbel draw (keys ``fold_in(key, 0)``, as `gumbel_sample_step`)
        and both log-probs run in one `shard_map`.

        Returns:
          ``(token int32[B], new_state, StepOutput)``; ``-1`` for an invalid row.
        """
        return _step_jit(self, chain, logits, state, _sampling.as_typed_key(key))

    def _apply(self, processor: LogitsProcessor, logits: Array) -> Array:
        batch, vocab, local = self._sizes(logits)
        rules, arrays, specs = self._prepare(processor, batch, vocab)

        def body(logits, arrays):
            return self._apply_local(rules, arrays, logits, self._shard(vocab, local))

        row_vocab = self._spec(ROW_VOCAB)
        return _shard_map(body, self.mesh, (row_vocab, specs), row_vocab,
                          check_vma=self._check_vma)(logits, arrays)

    def _sample(self, key: Array, logits: Array) -> Array:
        batch, vocab, local = self._sizes(logits)
        key = _check_key("ShardedSampler.sample", key, (batch,))
        seeds = _row_seeds(key, (batch,))  # [B, 2]

        def body(logits, seeds):
            return _draw(seeds, logits, self._shard(vocab, local))[0]

        return _shard_map(body, self.mesh, (self._spec(ROW_VOCAB), self._spec(ROW)),
                          self._spec(ROW))(logits, seeds)

    def _token_logprobs(self, logits: Array, tokens: Array) -> Array:
        _, vocab, local = self._sizes(logits)

        def body(logits, tokens):
            return _logprob(logits, tokens, self._shard(vocab, local))

        return _shard_map(body, self.mesh, (self._spec(ROW_VOCAB), self._spec(ROW)),
                          self._spec(ROW))(logits, tokens)

    def _top_logprobs(self, logits: Array, k: int) -> tuple[Array, Array]:
        _, vocab, local = self._sizes(logits)
        if not 1 <= k <= vocab:
            raise ValueError(f"ShardedSampler.top_logprobs: k must be in [1, V = {vocab}], got {k}")
        k_local = min(k, local)

        def body(logits):
            shard = self._shard(vocab, local)
            values, index = lax.top_k(shard.log_softmax(logits.astype(_F32)), k_local)  # [b, k_local]
            ids = shard.offset + index.astype(jnp.int32)
            # Gather the candidates (a psum of per-shard slots: [b, m * k_local] numbers), in
            # shard = id order, so the merge breaks ties by the lower id as one lax.top_k does.
            m = vocab // local
            slot = jax.nn.one_hot(lax.axis_index(self.vocab_axis), m, dtype=jnp.int32)  # [m]
            values = lax.psum(jnp.where(slot[None, :, None] == 1, values[:, None, :], 0.0),
                              self.vocab_axis).reshape(values.shape[0], m * k_local)
            ids = lax.psum(slot[None, :, None] * ids[:, None, :], self.vocab_axis).reshape(values.shape)
            top, position = lax.top_k(values, k)  # [b, k]
            return jnp.take_along_axis(ids, position, axis=1), top

        rows = P(self.batch_axis, None)
        return _shard_map(body, self.mesh, self._spec(ROW_VOCAB), (rows, rows))(logits)

    def _step(self, chain: LogitsProcessor, logits: Array, state: State,
              key: Array) -> tuple[Array, State, StepOutput]:
        batch, vocab, local = self._sizes(logits)
        key = _check_key("ShardedSampler", key, (batch,))
        seeds = _row_seeds(fold_in_rows(key, 0), (batch,))  # [B, 2]
        rules, arrays, specs = self._prepare(chain, batch, vocab)

        def body(logits, arrays, seeds):
            shard = self._shard(vocab, local)
            processed = self._apply_local(rules, arrays, logits, shard)
            token, raw, proc_lp = _draw_and_logprobs(seeds, processed, logits, shard)
            return processed, token, raw, proc_lp

        row, row_vocab = self._spec(ROW), self._spec(ROW_VOCAB)
        step = _shard_map(body, self.mesh, (row_vocab, specs, row), (row_vocab, row, row, row),
                          check_vma=self._check_vma)
        processed, token, raw, proc_lp = step(logits, arrays, seeds)
        new_state = chain.update(state, token, processed)
        return token, new_state, StepOutput(token_logprob_raw=raw, token_logprob_processed=proc_lp,
                                            processed_logits=processed)


_apply_jit = jax.jit(ShardedSampler._apply, static_argnums=0)
_sample_jit = jax.jit(ShardedSampler._sample, static_argnums=0)
_logprobs_jit = jax.jit(ShardedSampler._token_logprobs, static_argnums=0)
_top_logprobs_jit = jax.jit(ShardedSampler._top_logprobs, static_argnums=(0, 2))
_step_jit = jax.jit(ShardedSampler._step, static_argnums=0)


def sharded_sample_step(chain: LogitsProcessor, logits: Array, state: State, key: ArrayLike,
                        mesh: Mesh, *, vocab_axis: str = "model",
                        batch_axis: str | None = "data") -> tuple[Array, State, StepOutput]:
    """`jaxsample.sample_step` on logits split over ``vocab_axis`` (see `ShardedSampler`).

    Example:
      >>> import jax, jax.numpy as jnp, jaxsample as js
      >>> from models.sharding import make_mesh
      >>> c = js.default_chain(top_k=1)
      >>> keys = jax.random.split(jax.random.key(0), 1)
      >>> logits = jnp.array([[0.0, 2.0, 1.0, 0.5]])
      >>> sharded_sample_step(c, logits, c.init(None, None, 4), keys, make_mesh((1, 1)))[0]
      Array([1], dtype=int32)
    """
    return ShardedSampler(mesh, vocab_axis, batch_axis)(chain, logits, state, key)


# ----------------------------------------------------------------------------- generation


def place(x: ArrayLike, sharding: NamedSharding) -> Array:
    """A host array (same value on every process) as a global array with ``sharding``.

    Works on one host and on many: each process fills only its addressable shards, from
    its own copy of ``x`` (`jax.make_array_from_callback`). An array that already has
    this sharding is returned as is.
    """
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable and sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _host_value(x: ArrayLike) -> np.ndarray | None:
    """``x`` as a NumPy array when this process can see all of it, else None."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def sharded_generate(model: Any, prompt_tokens: ArrayLike, prompt_lengths: ArrayLike, keys: ArrayLike, *,
                     max_new_tokens: int, sampler: Chain | None = None, stop_ids: Sequence[int] = (),
                     pad_id: int = 0, cache_size: int | None = None, mesh: Mesh | None = None,
                     vocab_axis: str = "model", batch_axis: str | None = "data", **outputs):
    """`jaxsample.generate` on a device mesh: data- and model-parallel, vocab-sharded sampling.

    The prompts, lengths and keys are split over ``batch_axis``; the model (e.g.
    `models.sharding.shard_model`) holds its weights split over ``vocab_axis`` and
    returns logits ``[B, V]`` split as ``P(batch_axis, vocab_axis)``; each step samples
    with `ShardedSampler` on those slices. The loop is `jaxsample.generate`'s own
    (prefill, then a jitted `lax.scan`), partitioned by XLA (GSPMD).

    For the same keys, the tokens equal a single-device ``generate`` run with
    `gumbel_sample_step` as its per-step sampler; greedy rows equal plain
    `jaxsample.generate`. Log-probs agree to float32 rounding (<= 1e-4).

    On many hosts: call `jax.distributed.initialize()` first and pass the same host
    (NumPy) arrays on every process; each process places only its own shards. The
    outputs are global arrays (`jax.experimental.multihost_utils.process_allgather`
    brings them to every host).

    Args:
      model: a `LanguageModel` whose logits are split over ``vocab_axis`` (V divisible
        by its size), e.g. `models.sharding.shard_model`'s result, whose ``mesh`` is
        the default mesh.
      prompt_tokens, prompt_lengths, keys, max_new_tokens, sampler, stop_ids, pad_id,
        cache_size: as `jaxsample.generate` (B divisible by the ``batch_axis`` size).
      mesh: the mesh (default: ``model.mesh``).
      vocab_axis: the model-parallel axis name.
      batch_axis: the data-parallel axis name, or None.
      **outputs: `jaxsample.generate`'s ``n``, ``top_logprobs`` (computed as a distributed
        top-k, `ShardedSampler.top_logprobs`) and ``prompt_logprobs``.

    Returns:
      A `jaxsample.GenerateOutput` whose arrays are split over ``batch_axis``.
    """
    mesh = getattr(model, "mesh", None) if mesh is None else mesh
    if mesh is None:
        raise ValueError("sharded_generate: pass mesh=... (the model has no .mesh)")
    sample_fn = ShardedSampler(mesh, vocab_axis, batch_axis)
    shape = np.shape(prompt_tokens)
    if len(shape) != 2:
        raise ValueError(f"sharded_generate: prompt_tokens must have shape [B, P], got {shape}")
    nb = 1 if batch_axis is None else mesh.shape[batch_axis]
    if shape[0] % nb:
        raise ValueError(f"sharded_generate: the batch B = {shape[0]} must be divisible by the "
                         f"{nb} devices of axis {batch_axis!r}")
    host_tokens, host_lengths = _host_value(prompt_tokens), _host_value(prompt_lengths)
    if host_tokens is not None and host_lengths is not None:  # on the host, before placing (global arrays may not be readable here)
        p = shape[1]
        _core.check_prompts(host_tokens, host_lengths, max_new_tokens,
                            p + max_new_tokens if cache_size is None else cache_size,
                            model.vocab_size, tuple(int(s) for s in stop_ids))
    rows = NamedSharding(mesh, P(batch_axis))
    tokens = place(prompt_tokens, NamedSharding(mesh, P(batch_axis, None)))
    lengths = place(prompt_lengths, rows)
    keys = _sampling.as_typed_key(keys)
    if rows.is_fully_addressable:
        keys = jax.device_put(keys, rows)
    else:  # many hosts: place the raw key data, then wrap it again
        data = place(jax.random.key_data(keys), NamedSharding(mesh, P(batch_axis, None)))
        keys = jax.random.wrap_key_data(data, impl=jax.random.key_impl(keys))
    return generate(model, tokens, lengths, keys, max_new_tokens=max_new_tokens, sampler=sampler,
                    stop_ids=stop_ids, pad_id=pad_id, cache_size=cache_size, sample_fn=sample_fn, **outputs)
