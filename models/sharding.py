"""Data- and model-parallel placement of `DecoderLM` on a `jax.sharding.Mesh`.

Everything here is JAX's own machinery: a 2-D `Mesh` with a data axis and a model axis,
`PartitionSpec`s for every parameter, `NamedSharding` placement, and
`with_sharding_constraint` hints; XLA's SPMD partitioner (GSPMD) does the rest. The same
code runs on one host or many (after `jax.distributed.initialize()`).

Layout (Megatron style, axes ``("data", "model")``; D = d_model, H/K = query/kv heads,
Dh = head width, F = d_ff, V = vocabulary):

    embed.embedding  [V, D]      P("model", None)   vocab rows split -> logits [B, V] split on V
    q.kernel         [D, H*Dh]   P(None, "model")   heads split (output dim)
    k, v.kernel      [D, K*Dh]   P(None, "model")   kv heads split (output dim)
    o.kernel         [H*Dh, D]   P("model", None)   input dim split: one all-reduce per block
    gate, up.kernel  [D, F]      P(None, "model")   output dim split
    down.kernel      [F, D]      P("model", None)   input dim split: one all-reduce per block
    q, k, v.bias     [H*Dh]      P("model")         like their kernels (Qwen2)
    lm_head.kernel   [D, V]      P(None, "model")   untied output projection, vocab split
    *norm*.scale     [D] / [Dh]  P()                replicated (pre/post norms, q/k norms)
    moe.router       [D, E]      P()                replicated
    moe.gate, up     [E, D, F]   P("model", None, None)  expert parallel: E/m experts a device
    moe.down         [E, F, D]   P("model", None, None)
    KV cache k, v    [B, K, S, Dh]  P("data", "model", None, None)
    activations, prompts, keys      batch on "data"

Divisibility rule (JAX shards only evenly divisible dimensions): a group is split over
the model axis only when its dimension divides evenly, otherwise it is replicated over
that axis, which is always correct, merely less parallel:

* attention (q, k, v, o and the KV cache) is split iff ``n_kv_heads % model_size == 0``
  (then ``n_heads`` divides too); otherwise all of it is replicated, which keeps
  grouped-query attention free of resharding between query and key/value heads;
* gate, up and down are split iff ``d_ff % model_size == 0``;
* MoE experts are expert-parallel iff ``num_experts % model_size == 0``; otherwise each
  expert is split over its hidden width iff ``moe_d_ff % model_size == 0`` (gate/up on F,
  down on F); otherwise replicated. The router and the top-k run replicated (they are
  tiny); GSPMD moves each token's activations to its experts' devices;
* the KV cache of every layer (sliding-window rings included) is split like its heads;
* the embedding is always split: its rows are zero-padded to ``V_pad``, the next multiple
  of ``model_size``, and the padded logits are set to ``-inf`` (never sampled, and
  invisible to every filter and log-prob). The wrapped model's ``vocab_size`` is
  ``V_pad``; ``true_vocab_size`` is the checkpoint's ``V``. Token ids are unchanged.
* the batch must divide by the data-axis size (checked by `jaxsample.sharded_generate`).

Example (8 simulated CPU devices: set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax):

    >>> import jax
    >>> from models import DecoderLM, preset
    >>> from models.sharding import make_mesh, shard_model
    >>> mesh = make_mesh((2, 4))                       # doctest: +SKIP
    >>> lm = DecoderLM.random(preset("tiny"), jax.random.key(0))
    >>> slm = shard_model(lm, mesh)                    # doctest: +SKIP
    >>> slm.vocab_size, slm.true_vocab_size            # doctest: +SKIP
    (260, 259)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsample import place  # noqa: F401  (re-exported: models.sharding.place)
from models.config import DecoderConfig
from models.decoder import DecoderLM, KVCache, init_params

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "make_mesh",
    "as_auto_mesh",
    "padded_vocab_size",
    "param_specs",
    "cache_specs",
    "ShardedDecoderLM",
    "shard_model",
    "place",
]

DATA_AXIS = "data"
MODEL_AXIS = "model"


# ----------------------------------------------------------------------------- meshes


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = (DATA_AXIS, MODEL_AXIS),
              devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh of ``prod(shape)`` devices with *Auto* axes (GSPMD propagation).

    ``jax.make_mesh`` makes Explicit axes by default in recent JAX; the model code here is
    written for GSPMD propagation, so the axes are Auto.

    Args:
      shape: devices per axis, e.g. ``(2, 4)`` for 2-way data and 4-way model parallelism.
      axis_names: one name per axis.
      devices: the devices to use (default: the first ``prod(shape)`` of `jax.devices()`,
        which spans every host after `jax.distributed.initialize()`).

    Returns:
      A `jax.sharding.Mesh`.

    Example:
      >>> dict(make_mesh((1, 1)).shape)
      {'data': 1, 'model': 1}
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"make_mesh: shape {shape} and axis_names {tuple(axis_names)} differ in length")
    n = math.prod(shape)
    if devices is None:
        available = jax.devices()
        if n > len(available):
            raise ValueError(
                f"make_mesh: a {shape} mesh needs {n} devices, {len(available)} are visible (on CPU, "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before importing jax)")
        if n == len(available):  # all devices: let JAX pick a topology-aware order
            auto = (jax.sharding.AxisType.Auto,) * len(shape)
            return jax.make_mesh(shape, tuple(axis_names), axis_types=auto)
        devices = available[:n]
    if len(devices) != n:
        raise ValueError(f"make_mesh: a {shape} mesh needs {n} devices, got {len(devices)}")
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), tuple(axis_names))


def as_auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis Auto (GSPMD propagation)."""
    axis_types = getattr(mesh, "axis_types", None)
    if axis_types is None or all(t == jax.sharding.AxisType.Auto for t in axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names)


def _axis_size(mesh: Mesh, axis: str | None) -> int:
    if axis is None:
        return 1
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.axis_names)}")
    return mesh.shape[axis]


def padded_vocab_size(vocab_size: int, model_size: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``model_size``.

    Example:
      >>> padded_vocab_size(259, 8)
      264
    """
    return -(-vocab_size // model_size) * model_size


# ----------------------------------------------------------------------------- specs


def param_specs(config: DecoderConfig, mesh: Mesh, *, data_axis: str | None = DATA_AXIS,
                model_axis: str | None = MODEL_AXIS) -> dict:
    """`PartitionSpec`s for every parameter of a `DecoderLM` with this config.

    Weights are replicated over the data axis; the model-axis layout and the divisibility
    rule are in the module docstring. The embedding spec assumes the vocabulary was
    padded to a multiple of the model-axis size (`shard_model` does this).

    Args:
      config: the model config.
      mesh: the mesh (only its axis sizes are read).
      data_axis: name of the data axis (unused by weights; checked to exist).
      model_axis: name of the model axis, or None to replicate every weight.

    Returns:
      A dict with the structure of ``DecoderLM.params`` whose leaves are `PartitionSpec`s.
    """
    _axis_size(mesh, data_axis)
    m = _axis_size(mesh, model_axis)
    heads = model_axis if config.n_kv_heads % m == 0 else None
    ff = model_axis if config.d_ff % m == 0 else None
    # MoE experts: expert-parallel (each device holds E/m whole experts) when E divides,
    # else tensor-parallel inside every expert over its hidden width, else replicated.
    if config.num_experts and config.num_experts % m == 0:
        expert_in = expert_out = P(model_axis, None, None)
    elif config.num_experts and config.moe_d_ff % m == 0:
        expert_in, expert_out = P(None, None, model_axis), P(None, model_axis, None)
    else:
        expert_in = expert_out = P(None, None, None)
    rules = {
        ("q", "kernel"): P(None, heads), ("k", "kernel"): P(None, heads), ("v", "kernel"): P(None, heads),
        ("q", "bias"): P(heads), ("k", "bias"): P(heads), ("v", "bias"): P(heads),
        ("o", "kernel"): P(heads, None),
        ("gate", "kernel"): P(None, ff), ("up", "kernel"): P(None, ff), ("down", "kernel"): P(ff, None),
        ("router", "kernel"): P(None, None),
        ("moe", "gate"): expert_in, ("moe", "up"): expert_in, ("moe", "down"): expert_out,
        ("embed", "embedding"): P(model_axis, None), ("lm_head", "kernel"): P(None, model_axis),
    }
    template = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))

    def spec(path, leaf):
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        if keys[-1] == "scale":  # every RMSNorm (pre, post, q/k norms): replicated
            return P()
        try:
            return rules[keys[-2:]]
        except KeyError:
            raise ValueError(f"param_specs: no placement for parameter {'/'.join(keys)}") from None
    return jax.tree_util.tree_map_with_path(spec, template)


def cache_specs(config: DecoderConfig, mesh: Mesh, *, data_axis: str | None = DATA_AXIS,
                model_axis: str | None = MODEL_AXIS) -> KVCache:
    """`PartitionSpec`s of the KV cache: batch on the data axis, kv heads on the model axis.

    Returns:
      A `KVCache` of `PartitionSpec`s for the per-layer ``[B, K, S, Dh]`` arrays.
    """
    _axis_size(mesh, data_axis)
    m = _axis_size(mesh, model_axis)
    kv_heads = model_axis if config.n_kv_heads % m == 0 else None
    spec = P(data_axis, kv_heads, None, None)
    layers = tuple(spec for _ in range(config.n_layers))
    return KVCache(k=layers, v=layers)


# ----------------------------------------------------------------------------- the model


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShardedDecoderLM:
    """A `DecoderLM` whose parameters live on a mesh; the `jaxsample.generate` protocol.

    `init_cache`, `prefill` and `decode` call the wrapped model unchanged and add
    `with_sharding_constraint` hints (cache: batch on data, kv heads on model; logits:
    ``[B, V_pad]`` with batch on data and vocabulary on model) so that GSPMD keeps that
    layout through the jitted decode loop. Padded vocabulary entries get ``-inf``.

    Attributes:
      lm: the wrapped `DecoderLM` (padded embedding, parameters placed on ``mesh``).
      mesh: the mesh (static).
      true_vocab_size: the checkpoint's vocabulary size V (static).
      data_axis, model_axis: the mesh axis names (static).
    """

    lm: DecoderLM
    mesh: Mesh = dataclasses.field(metadata=dict(static=True))
    true_vocab_size: int = dataclasses.field(metadata=dict(static=True))
    data_axis: str | None = dataclasses.field(default=DATA_AXIS, metadata=dict(static=True))
    model_axis: str | None = dataclasses.field(default=MODEL_AXIS, metadata=dict(static=True))

    @property
    def config(self) -> DecoderConfig:
        return self.lm.config

    @property
    def vocab_size(self) -> int:
        """Width of the logits, ``V_pad`` (ids ``>= true_vocab_size`` are always ``-inf``)."""
        return self.lm.config.vocab_size

    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def _constrain_cache(self, cache: KVCache) -> KVCache:
        specs = cache_specs(self.config, self.mesh, data_axis=self.data_axis, model_axis=self.model_axis)
        return jax.tree.map(lambda s, x: jax.lax.with_sharding_constraint(x, self._sharding(s)),
                            specs, cache, is_leaf=lambda s: isinstance(s, P))

    def _logits(self, logits: jax.Array) -> jax.Array:
        """Masks the padded vocabulary and pins the [B, V_pad] layout (data, model)."""
        if self.vocab_size != self.true_vocab_size:
            ids = jnp.arange(self.vocab_size)
            logits = jnp.where(ids < self.true_vocab_size, logits, -jnp.inf)
        return jax.lax.with_sharding_constraint(logits, self._sharding(P(self.data_axis, self.model_axis)))

    def _rows(self, x: jax.Array) -> jax.Array:
        spec = P(self.data_axis, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(x, self._sharding(spec))

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self._constrain_cache(self.lm.init_cache(batch_size, max_len))

    def _per_row(self, method, *args):
        """``method(*args, cache)`` of the wrapped model, vmapped over the batch.

        Each row runs as a batch of one (``[1, ...]``), so every op, including the KV-cache
        scatter, carries an explicit batch dimension that GSPMD splits over the data axis
        with no cross-row communication (a plain batched scatter would be all-gathered).
        The per-row computation is the same, so the numbers are too.
        """
        def one_row(*row_args):
            out, cache = method(*jax.tree.map(lambda a: a[None], row_args))
            return out[0], jax.tree.map(lambda c: c[0], cache)

        return jax.vmap(one_row)(*args)

    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache):
        """Right-padded prompts [B, P] -> (logits [B, V_pad] at each last real token, cache)."""
        cache = self._constrain_cache(cache)
        logits, cache = self._per_row(self.lm.prefill, self._rows(tokens), self._rows(lengths), cache)
        return self._logits(logits), self._constrain_cache(cache)

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache):
        """One token per row [B] at positions [B] -> (logits [B, V_pad], cache)."""
        cache = self._constrain_cache(cache)
        logits, cache = self._per_row(self.lm.decode, self._rows(tokens), self._rows(positions), cache)
        return self._logits(logits), self._constrain_cache(cache)

    def forward(self, tokens: jax.Array) -> jax.Array:
        """Full forward pass int32 [B, T] -> float32 logits [B, T, V_pad] (padding ``-inf``)."""
        logits = self.lm.forward(self._rows(tokens))
        if self.vocab_size != self.true_vocab_size:
            logits = jnp.where(jnp.arange(self.vocab_size) < self.true_vocab_size, logits, -jnp.inf)
        return logits


def shard_model(lm: DecoderLM, mesh: Mesh, *, data_axis: str | None = DATA_AXIS,
                model_axis: str | None = MODEL_AXIS) -> ShardedDecoderLM:
    """Places a `DecoderLM` on a mesh: the data- and model-parallel layout of this module.

    The embedding is zero-padded to a multiple of the model-axis size (see the module
    docstring); every parameter is then put on the mesh with its `NamedSharding` (on many
    hosts each process must hold the same parameters, e.g. loaded from one checkpoint).

    Args:
      lm: the model (parameters anywhere: host, one device, or already sharded).
      mesh: a mesh with axes ``data_axis`` and ``model_axis`` (Explicit axes are
        converted to Auto ones, see `as_auto_mesh`).
      data_axis: the batch axis name (None: no data parallelism).
      model_axis: the tensor-parallel axis name (None: weights replicated).

    Returns:
      A `ShardedDecoderLM` for `jaxsample.generate` / `jaxsample.sharded_generate`.

    Example:
      >>> import jax
      >>> from models import DecoderLM, preset
      >>> slm = shard_model(DecoderLM.random(preset("tiny"), jax.random.key(0)), make_mesh((1, 1)))
      >>> slm.vocab_size
      259
    """
    mesh = as_auto_mesh(mesh)
    config = lm.config
    m = _axis_size(mesh, model_axis)
    v_pad = padded_vocab_size(config.vocab_size, m)
    params = dict(lm.params)
    if v_pad != config.vocab_size:
        embedding = params["embed"]["embedding"]  # [V, D]
        pad = jnp.zeros((v_pad - config.vocab_size, embedding.shape[1]), embedding.dtype)
        params["embed"] = {**params["embed"], "embedding": jnp.concatenate([embedding, pad])}
        if "lm_head" in params:  # untied: the output projection's columns padded the same way
            kernel = params["lm_head"]["kernel"]  # [D, V]
            pad = jnp.zeros((kernel.shape[0], v_pad - config.vocab_size), kernel.dtype)
            params["lm_head"] = {**params["lm_head"], "kernel": jnp.concatenate([kernel, pad], axis=1)}
        config = config.replace(vocab_size=v_pad)
    if config.moe_impl == "auto":  # the rows are vmapped (see _per_row): no ragged_dot there
        config = config.replace(moe_impl="auto_dense")
    specs = param_specs(config, mesh, data_axis=data_axis, model_axis=model_axis)
    params = jax.tree.map(lambda s, x: place(x, NamedSharding(mesh, s)), specs, params,
                          is_leaf=lambda s: isinstance(s, P))
    return ShardedDecoderLM(lm=DecoderLM(params=params, config=config), mesh=mesh,
                            true_vocab_size=lm.config.vocab_size, data_axis=data_axis,
                            model_axis=model_axis)
