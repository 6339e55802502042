"""The built-in processors: filters, biases and masks as pytrees, and :func:`default_chain`.

Each wraps one function of :mod:`jaxsample._filters.filters` (``jaxsample.top_p`` and
friends); its value fields are traced leaves, so changing them never recompiles.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import numpy as np

from jaxsample import _validation as _val
from jaxsample._filters import filters as _filters
from jaxsample._processors.base import (Chain, LogitsProcessor, _leaf, _set, chain, processor_dataclass,
                                        static_field)

__all__ = [
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
    "TRUNCATIONS",
    "default_chain",
]

Array = jax.Array
ArrayLike = Any
State = Any


# ----------------------------------------------------------------------------- filters


@processor_dataclass
class Temperature(LogitsProcessor):
    """:func:`jaxsample.temperature` as a processor (``t = 0``: greedy row).

    Example:
      >>> import jax.numpy as jnp
      >>> Temperature(2.0)(jnp.array([1.0, 2.0]))
      Array([0.5, 1. ], dtype=float32)
    """

    spec: ClassVar[_filters.Filter] = _filters.TABLE["temperature"]
    identity: ClassVar[dict[str, Any]] = {spec.field: spec.identity}
    t: ArrayLike = spec.identity

    def __post_init__(self) -> None:
        _val.check_param("temperature", "t", self.t)  # the value as given, before any cast
        _set(self, "t", _leaf("Temperature", "t", self.t, np.float32))

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        return _filters.temperature(logits, self.t)


class _Truncation(LogitsProcessor):
    """Shared code of the truncation processors: one value field + min_tokens_to_keep,
    described by the filter's row of `jaxsample._filters.filters.TABLE` (``spec``)."""

    spec: ClassVar[_filters.Filter]

    def __post_init__(self) -> None:
        name, field = self.spec.name, self.spec.field
        _val.check_param(name, field, getattr(self, field))  # before any cast
        _set(self, field, _leaf(type(self).__name__, field, getattr(self, field), self.spec.dtype))
        m = _val.check_min_tokens_to_keep(name, self.min_tokens_to_keep)
        _set(self, "min_tokens_to_keep", m)

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        fn = getattr(_filters, self.spec.name)
        return fn(logits, getattr(self, self.spec.field), min_tokens_to_keep=self.min_tokens_to_keep)


def _truncation(cls_name: str, name: str, doc: str) -> type[_Truncation]:
    """The processor class of the truncation ``name``, from its row of the filter table.

    Its fields are the row's value field (``TopK.k``, ``TopP.p``, ...; default: the
    identity) and a static ``min_tokens_to_keep`` (default 1), so ``TopP(0.9)`` and
    ``TopP(p=0.9, min_tokens_to_keep=2)`` build it.
    """
    spec = _filters.TABLE[name]
    body = {
        "__module__": __name__, "__qualname__": cls_name, "__doc__": doc,
        "__annotations__": {spec.field: "ArrayLike", "min_tokens_to_keep": "int"},
        spec.field: spec.identity, "min_tokens_to_keep": static_field(default=1),
        "spec": spec, "identity": {spec.field: spec.identity},
    }
    return processor_dataclass(type(cls_name, (_Truncation,), body))


TopK = _truncation("TopK", "top_k", ":func:`jaxsample.top_k` as a processor (``k = 0`` disables).")
TopP = _truncation("TopP", "top_p", ":func:`jaxsample.top_p` as a processor (``p = 1`` disables).")
MinP = _truncation("MinP", "min_p", ":func:`jaxsample.min_p` as a processor (``p = 0`` disables).")
TypicalP = _truncation("TypicalP", "typical_p",
                       ":func:`jaxsample.typical_p` as a processor (``p = 1`` disables).")
EpsilonCutoff = _truncation("EpsilonCutoff", "epsilon_cutoff",
                            ":func:`jaxsample.epsilon_cutoff` as a processor (``epsilon = 0`` disables).")
EtaCutoff = _truncation("EtaCutoff", "eta_cutoff",
                        ":func:`jaxsample.eta_cutoff` as a processor (``eta = 0`` disables).")
TopNSigma = _truncation("TopNSigma", "top_n_sigma",
                        ":func:`jaxsample.top_n_sigma` as a processor (``n = inf`` disables).")

#: The truncation processors by filter name (``"top_k"`` -> `TopK`), in the table's order.
TRUNCATIONS: dict[str, type[_Truncation]] = {
    cls.spec.name: cls for cls in (TopK, TopP, MinP, TypicalP, EpsilonCutoff, EtaCutoff, TopNSigma)}


# ----------------------------------------------------------------------------- biases, masks


@processor_dataclass
class LogitBias(LogitsProcessor):
    """:func:`jaxsample.logit_bias` as a processor: a dense ``[V]``/``[..., V]`` bias."""

    bias: ArrayLike
    field_ranks = {"bias": 1}

    def __post_init__(self) -> None:
        _val.check_bias("LogitBias", "bias", self.bias)
        _set(self, "bias", _leaf("LogitBias", "bias", self.bias, np.float32))

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        return _filters.logit_bias(logits, self.bias)


@processor_dataclass
class SparseLogitBias(LogitsProcessor):
    """:func:`jaxsample.sparse_logit_bias` as a processor (``-1`` ids are padding)."""

    token_ids: ArrayLike
    values: ArrayLike
    field_ranks = {"token_ids": 1, "values": 1}

    def __post_init__(self) -> None:
        _check_ids("SparseLogitBias", self.token_ids)
        _val.check_bias("SparseLogitBias", "values", self.values)
        _set(self, "token_ids", _leaf("SparseLogitBias", "token_ids", self.token_ids, np.int32))
        _set(self, "values", _leaf("SparseLogitBias", "values", self.values, np.float32))

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        return _filters.sparse_logit_bias(logits, self.token_ids, self.values)


class _TokenList(LogitsProcessor):
    """Shared code of BanTokens and AllowTokens: one ``token_ids`` list (``-1`` is padding),
    checked when built, applied by the filter ``mask``."""

    field_ranks = {"token_ids": 1}
    mask: ClassVar[Any]

    def __post_init__(self) -> None:
        cls = type(self).__name__
        _check_ids(cls, self.token_ids)
        _set(self, "token_ids", _leaf(cls, "token_ids", self.token_ids, np.int32))

    def apply(self, logits: Array, state: State, key: Array | None) -> Array:
        return self.mask(logits, self.token_ids)


@processor_dataclass
class BanTokens(_TokenList):
    """:func:`jaxsample.ban_tokens` as a processor (``-1`` ids are padding)."""

    token_ids: ArrayLike
    mask = staticmethod(_filters.ban_tokens)


@processor_dataclass
class AllowTokens(_TokenList):
    """:func:`jaxsample.allow_tokens` as a processor (``-1`` ids are padding)."""

    token_ids: ArrayLike
    mask = staticmethod(_filters.allow_tokens)


def _check_ids(fn: str, ids: Any) -> None:
    """Token-id checks at construction (the vocabulary size is not known yet)."""
    if _val.concrete_value(ids) is not None:
        _val.check_token_ids(fn, "token_ids", ids, None)


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
    (docs/sampling.md) is: masks and biases -> penalties -> temperature -> top_k -> top_p
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
