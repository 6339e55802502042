"""Chain presets: every method in the documented default order, and the default orders of
transformers, vLLM and llama.cpp.

A chain's order is data: each preset below is one list of processors. Every stage of a
preset is always present (with its identity value unless given), so one compiled
function serves every setting: changing any value, even from "off" to "on", never
recompiles. Stages whose *shape* is data (``logit_bias``, ``allowed_tokens``,
``bad_words``, the stop ids of ``min_new_tokens``) are present only when given.
``prune=True`` drops stages whose values are concretely the identity (fewer passes over
the vocabulary, for one-off runs such as the CLI; changing a value may then recompile).

Where the order changes results (see ``docs/methods.md``):

* min-p, top-p, typical-p, epsilon/eta and XTC depend on the temperature applied before
  them: transformers and vLLM apply temperature first, llama.cpp last. At T = 0.5 the
  seeds example ("Today's weather is so ___") keeps {nice, hot} with top-p 0.9 after
  temperature, but {nice, hot, cloudy, gloomy} before it.
* vLLM applies min-p *before* top-k/top-p; transformers after them. min-p is relative
  to the largest probability, which truncation never removes, so the kept set is the
  same unless top-k/top-p run later on the min-p-filtered distribution (top-p's mass
  is then renormalised over fewer tokens).
* Penalties come before temperature everywhere. Subtracted penalties (presence,
  frequency, DRY) do not commute with it: ``(x - a) / T != x / T - a``; the repetition
  penalty (a sign-preserving scaling) does. Bans (no-repeat n-gram, bad words,
  min_new_tokens, allow lists) commute with everything before a truncation.
* llama.cpp's mirostat mode replaces the whole chain by ``logit bias -> temperature ->
  mirostat``.

Example:
  >>> import jaxsample as js
  >>> c = js.vllm_chain(temperature=0.7, min_p=0.05, top_p=0.9, repetition_penalty=1.1)
  >>> [type(p).__name__ for p in c.processors]  # doctest: +NORMALIZE_WHITESPACE
  ['RepetitionPenalty', 'PresenceFrequencyPenalty', 'Temperature', 'MinP', 'TopK', 'TopP']
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from jaxsample import _validation as _val
from jaxsample._processors.base import Chain, LogitsProcessor, chain
from jaxsample._processors.builtin import (
    TRUNCATIONS,
    AllowTokens,
    LogitBias,
    MinP,
    SparseLogitBias,
    Temperature,
    TopK,
    TopNSigma,
    TopP,
    TypicalP,
)
from jaxsample._processors.penalties import (
    DRY,
    XTC,
    BadWords,
    DynamicTemperature,
    MinNewTokens,
    MirostatV2,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
)

__all__ = [
    "ORDERS",
    "full_chain",
    "transformers_chain",
    "vllm_chain",
    "llamacpp_chain",
    "preset_chain",
]

ArrayLike = Any
_INF = math.inf

# ----------------------------------------------------------------------------- helpers

def _build(stages: list[LogitsProcessor | None], prune: bool) -> Chain:
    # prune: each processor's own `identity` (for the filters, their row of the filter table)
    stages = [s for s in stages if s is not None and not (prune and s.is_identity())]
    return chain(*stages)


def _bias(logit_bias: Mapping[int, float] | ArrayLike | None) -> LogitsProcessor | None:
    """``{token: bias}`` -> SparseLogitBias; an array ``[V]`` / ``[B, V]`` -> LogitBias."""
    if logit_bias is None:
        return None
    if isinstance(logit_bias, Mapping):
        ids = np.asarray(list(logit_bias.keys()), np.int32)
        values = np.asarray(list(logit_bias.values()), np.float32)
        return SparseLogitBias(ids, values)
    return LogitBias(logit_bias)


def _min_new_tokens(min_new_tokens: ArrayLike, stop_ids: ArrayLike | None) -> MinNewTokens | None:
    if stop_ids is None:
        value = _val.concrete_value(min_new_tokens)
        if value is not None and np.all(value == 0):
            return None
        raise ValueError("min_new_tokens needs stop_ids (the end-of-sequence and stop ids "
                         "it bans until then)")
    return MinNewTokens(min_new_tokens, stop_ids)


def _differs(value: Any, default: Any) -> bool:
    """Whether a keyword value differs from its default (unknown values differ)."""
    if value is default:
        return False
    if isinstance(value, (tuple, list)) and isinstance(default, tuple):
        return tuple(value) != default
    a, d = _val.concrete_value(value), _val.concrete_value(default)
    return a is None or d is None or a.shape != d.shape or not np.all(a == d)


def _optional(cls: type, value: Any, **kwargs: Any) -> LogitsProcessor | None:
    return None if value is None else cls(value, **kwargs)


def _truncations(min_tokens_to_keep: int, **values: ArrayLike) -> list[LogitsProcessor]:
    """The truncation processors of ``values`` (``top_k=...``, ``top_p=...``), in that order."""
    return [TRUNCATIONS[name](value, min_tokens_to_keep=min_tokens_to_keep) for name, value in values.items()]


# ----------------------------------------------------------------------------- presets


def full_chain(
    *,
    logit_bias: Mapping[int, float] | ArrayLike | None = None,
    allowed_tokens: ArrayLike | None = None,
    bad_words: ArrayLike | None = None,
    min_new_tokens: ArrayLike = 0,
    stop_ids: ArrayLike | None = None,
    repetition_penalty: ArrayLike = 1.0,
    presence_penalty: ArrayLike = 0.0,
    frequency_penalty: ArrayLike = 0.0,
    penalty_window: ArrayLike = 0,
    no_repeat_ngram: ArrayLike = 0,
    dry_multiplier: ArrayLike = 0.0,
    dry_base: ArrayLike = 1.75,
    dry_allowed_length: ArrayLike = 2,
    dry_window: ArrayLike = 0,
    dry_sequence_breakers: ArrayLike = (),
    temperature: ArrayLike = 1.0,
    dynatemp_range: ArrayLike = 0.0,
    dynatemp_exponent: ArrayLike = 1.0,
    top_k: ArrayLike = 0,
    top_p: ArrayLike = 1.0,
    min_p: ArrayLike = 0.0,
    typical_p: ArrayLike = 1.0,
    epsilon_cutoff: ArrayLike = 0.0,
    eta_cutoff: ArrayLike = 0.0,
    top_n_sigma: ArrayLike = _INF,
    xtc_probability: ArrayLike = 0.0,
    xtc_threshold: ArrayLike = 0.1,
    mirostat_tau: ArrayLike = _INF,
    mirostat_eta: ArrayLike = 0.1,
    min_tokens_to_keep: int = 1,
    prune: bool = False,
) -> Chain:
    """Every method, in the documented default order (docs/sampling.md).

    Order: logit bias -> allowed tokens -> bad words -> min_new_tokens -> repetition
    penalty -> presence/frequency penalties -> no-repeat n-gram -> DRY -> (dynamic)
    temperature -> top-k -> top-p -> min-p -> typical-p -> epsilon -> eta ->
    top-n-sigma -> XTC -> mirostat -> sample. Temperature first among the filters, as
    in transformers and vLLM. Every value defaults to its identity and may be one value
    per row; see the processors for the parameters.

    Example:
      >>> c = full_chain(temperature=0.8, top_p=0.95, repetition_penalty=1.1, prune=True)
      >>> [type(p).__name__ for p in c.processors]
      ['RepetitionPenalty', 'DynamicTemperature', 'TopP']
    """
    m = _val.check_min_tokens_to_keep("full_chain", min_tokens_to_keep)
    return _build([
        _bias(logit_bias),
        _optional(AllowTokens, allowed_tokens),
        _optional(BadWords, bad_words),
        _min_new_tokens(min_new_tokens, stop_ids),
        RepetitionPenalty(repetition_penalty, penalty_window),
        PresenceFrequencyPenalty(presence_penalty, frequency_penalty, penalty_window),
        NoRepeatNGram(no_repeat_ngram),
        DRY(dry_multiplier, dry_base, dry_allowed_length, dry_window, dry_sequence_breakers),
        DynamicTemperature(temperature, dynatemp_range, dynatemp_exponent),
        *_truncations(m, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                      epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff, top_n_sigma=top_n_sigma),
        XTC(xtc_probability, xtc_threshold),
        MirostatV2(mirostat_tau, mirostat_eta),
    ], prune)


def transformers_chain(
    *,
    logit_bias: Mapping[int, float] | ArrayLike | None = None,
    repetition_penalty: ArrayLike = 1.0,
    no_repeat_ngram: ArrayLike = 0,
    bad_words: ArrayLike | None = None,
    min_new_tokens: ArrayLike = 0,
    stop_ids: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    top_k: ArrayLike = 0,
    top_p: ArrayLike = 1.0,
    min_p: ArrayLike = 0.0,
    typical_p: ArrayLike = 1.0,
    epsilon_cutoff: ArrayLike = 0.0,
    eta_cutoff: ArrayLike = 0.0,
    min_tokens_to_keep: int = 1,
    prune: bool = False,
) -> Chain:
    """transformers' ``generate`` order (``GenerationMixin._get_logits_processor``).

    Order: sequence bias (``logit_bias``) -> repetition penalty -> no-repeat n-gram ->
    bad words -> min_new_tokens -> temperature -> top-k -> top-p -> min-p -> typical-p
    -> epsilon -> eta -> sample. Note transformers' ``GenerationConfig`` defaults
    ``top_k`` to 50; here every value defaults to its identity.

    Example:
      >>> c = transformers_chain(temperature=0.7, top_k=50, top_p=0.9, prune=True)
      >>> [type(p).__name__ for p in c.processors]
      ['Temperature', 'TopK', 'TopP']
    """
    m = _val.check_min_tokens_to_keep("transformers_chain", min_tokens_to_keep)
    return _build([
        _bias(logit_bias),
        RepetitionPenalty(repetition_penalty),
        NoRepeatNGram(no_repeat_ngram),
        _optional(BadWords, bad_words),
        _min_new_tokens(min_new_tokens, stop_ids),
        Temperature(temperature),
        *_truncations(m, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                      epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff),
    ], prune)


def vllm_chain(
    *,
    allowed_tokens: ArrayLike | None = None,
    bad_words: ArrayLike | None = None,
    min_new_tokens: ArrayLike = 0,
    stop_ids: ArrayLike | None = None,
    logit_bias: Mapping[int, float] | ArrayLike | None = None,
    repetition_penalty: ArrayLike = 1.0,
    presence_penalty: ArrayLike = 0.0,
    frequency_penalty: ArrayLike = 0.0,
    temperature: ArrayLike = 1.0,
    min_p: ArrayLike = 0.0,
    top_k: ArrayLike = 0,
    top_p: ArrayLike = 1.0,
    prune: bool = False,
) -> Chain:
    """vLLM's (v1) sampler order.

    Order: allowed token ids -> bad words (matched against the output only) ->
    min_tokens -> logit bias -> repetition penalty (prompt + output) -> frequency and
    presence penalties (output) -> temperature -> min-p -> top-k -> top-p -> sample.

    Example:
      >>> c = vllm_chain(temperature=0.7, min_p=0.1, top_k=20, prune=True)
      >>> [type(p).__name__ for p in c.processors]
      ['Temperature', 'MinP', 'TopK']
    """
    return _build([
        _optional(AllowTokens, allowed_tokens),
        _optional(BadWords, bad_words, include_prompt=False),
        _min_new_tokens(min_new_tokens, stop_ids),
        _bias(logit_bias),
        RepetitionPenalty(repetition_penalty),
        PresenceFrequencyPenalty(presence_penalty, frequency_penalty),
        Temperature(temperature),
        MinP(min_p),
        TopK(top_k),
        TopP(top_p),
    ], prune)


def llamacpp_chain(
    *,
    logit_bias: Mapping[int, float] | ArrayLike | None = None,
    repetition_penalty: ArrayLike = 1.0,
    presence_penalty: ArrayLike = 0.0,
    frequency_penalty: ArrayLike = 0.0,
    penalty_window: ArrayLike = 0,
    dry_multiplier: ArrayLike = 0.0,
    dry_base: ArrayLike = 1.75,
    dry_allowed_length: ArrayLike = 2,
    dry_window: ArrayLike = 0,
    dry_sequence_breakers: ArrayLike = (),
    top_n_sigma: ArrayLike = _INF,
    top_k: ArrayLike = 0,
    typical_p: ArrayLike = 1.0,
    top_p: ArrayLike = 1.0,
    min_p: ArrayLike = 0.0,
    xtc_probability: ArrayLike = 0.0,
    xtc_threshold: ArrayLike = 0.1,
    temperature: ArrayLike = 1.0,
    dynatemp_range: ArrayLike = 0.0,
    dynatemp_exponent: ArrayLike = 1.0,
    mirostat_tau: ArrayLike | None = None,
    mirostat_eta: ArrayLike = 0.1,
    min_tokens_to_keep: int = 1,
    prune: bool = False,
) -> Chain:
    """llama.cpp's default sampler order (``common_params_sampling.samplers``).

    Order: logit bias -> penalties (repeat, frequency, presence; over the last
    ``penalty_window`` tokens of prompt + output) -> DRY -> top-n-sigma -> top-k ->
    typical-p -> top-p -> min-p -> XTC -> temperature (dynamic when
    ``dynatemp_range > 0``) -> sample. Temperature comes *last*.

    With ``mirostat_tau`` given (llama.cpp's ``--mirostat 2``) the chain is
    ``logit bias -> temperature -> mirostat v2``, as in llama.cpp; the other filters
    and penalties do not apply then, so giving them is an error.

    Windows: here ``0`` means the whole history; llama.cpp's ``repeat_last_n`` defaults
    to 64 (0 disables there) and ``dry_penalty_last_n`` to -1 (the whole context).

    Example:
      >>> c = llamacpp_chain(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8, prune=True)
      >>> [type(p).__name__ for p in c.processors]
      ['TopK', 'TopP', 'MinP', 'DynamicTemperature']
    """
    m = _val.check_min_tokens_to_keep("llamacpp_chain", min_tokens_to_keep)
    if mirostat_tau is not None:
        local = dict(locals())
        allowed = {"logit_bias", "temperature", "mirostat_tau", "mirostat_eta", "prune",
                   "min_tokens_to_keep"}
        given = [name for name, param in inspect.signature(llamacpp_chain).parameters.items()
                 if name not in allowed and _differs(local[name], param.default)]
        if given:
            raise ValueError(f"llamacpp_chain: mirostat mode uses only logit_bias, temperature "
                             f"and mirostat_eta (as llama.cpp); got {', '.join(given)}")
        return _build([_bias(logit_bias), Temperature(temperature),
                       MirostatV2(mirostat_tau, mirostat_eta)], prune)
    return _build([
        _bias(logit_bias),
        RepetitionPenalty(repetition_penalty, penalty_window),
        PresenceFrequencyPenalty(presence_penalty, frequency_penalty, penalty_window,
                                 include_prompt=True),
        DRY(dry_multiplier, dry_base, dry_allowed_length, dry_window, dry_sequence_breakers),
        TopNSigma(top_n_sigma, min_tokens_to_keep=m),
        TopK(top_k),
        TypicalP(typical_p, min_tokens_to_keep=m),
        TopP(top_p, min_tokens_to_keep=m),
        MinP(min_p, min_tokens_to_keep=m),
        XTC(xtc_probability, xtc_threshold),
        DynamicTemperature(temperature, dynatemp_range, dynatemp_exponent),
    ], prune)


_BUILDERS: dict[str, tuple[Callable[..., Chain], str]] = {
    "default": (full_chain, "jaxsample's default order"),
    "transformers": (transformers_chain, "transformers"),
    "vllm": (vllm_chain, "vLLM"),
    "llamacpp": (llamacpp_chain, "llama.cpp"),
}

#: The orders :func:`preset_chain` knows.
ORDERS: tuple[str, ...] = tuple(_BUILDERS)


def preset_chain(order: str = "default", **values: Any) -> Chain:
    """The chain of the named order (``"default"``, ``"transformers"``, ``"vllm"``,
    ``"llamacpp"``) built from keyword values.

    Raises:
      ValueError: for an unknown order, or a method that system does not implement
        (e.g. DRY with ``order="vllm"``); use ``order="default"`` for every method.

    Example:
      >>> c = preset_chain("llamacpp", temperature=0.8, top_k=40, prune=True)
      >>> [type(p).__name__ for p in c.processors]
      ['TopK', 'DynamicTemperature']
    """
    if order not in _BUILDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    builder, system = _BUILDERS[order]
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise ValueError(
            f"order {order!r}: {system} has no {', '.join(unknown)}; it takes "
            f"{', '.join(n for n in accepted if n != 'prune')}. Use order='default' for every method."
        )
    return builder(**values)
