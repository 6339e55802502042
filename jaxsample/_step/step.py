"""One decode step: process, draw, update the state, report log-probs (layer 4).

:func:`sample_step` is the step every decode loop calls (through its ``sample_fn``);
on a GPU it dispatches a :func:`jaxsample.default_chain` to the fused step
(:mod:`jaxsample._step.fused`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxsample._filters import sampling as _sampling
from jaxsample._filters.gumbel import gumbel_sample
from jaxsample._filters.sampling import fold_in_rows
from jaxsample._processors.base import Chain, LogitsProcessor
from jaxsample._selection import select as _select
from jaxsample._step import fused as _fused

__all__ = ["StepOutput", "sample_step", "gumbel_sample_step", "process_and_draw", "step_output"]

Array = jax.Array
ArrayLike = Any
State = Any


class StepOutput(NamedTuple):
    """Per-row log-probabilities of the drawn token (float32, shape of the token).

    Attributes:
      token_logprob_raw: ``log_softmax(model logits)[token]``.
      token_logprob_processed: ``log_softmax(processed logits)[token]``, the
        distribution the token was actually drawn from.
      processed_logits: the processed logits ``[..., V]`` the token was drawn from
        (:func:`sample_step` sets it; under ``jit`` it costs nothing when unused);
        ``None`` from a step function that does not provide them.
    """

    token_logprob_raw: Array
    token_logprob_processed: Array
    processed_logits: Array | None = None


def _state_or_init(chain: LogitsProcessor, state: State, vocab_size: int) -> State:
    """``state``, or the (empty) state of a stateless ``chain`` when ``state`` is None/()."""
    empty = isinstance(state, tuple) and not state and isinstance(chain, Chain) and chain.processors
    if state is not None and not empty:
        return state
    if chain.stateful:
        procs = chain.processors if isinstance(chain, Chain) else (chain,)
        name = next(type(p).__name__ for p in procs if p.stateful)
        raise ValueError(
            f"sample_step: the chain is stateful ({name} keeps state): pass "
            f"state=chain.init(prompt_tokens, prompt_lengths, V, max_new_tokens=N) and the state "
            f"each step returns; only a stateless chain may pass state=None")
    return chain.init(None, None, vocab_size)


def sample_step(
    chain: LogitsProcessor, logits: Array, state: State, key: ArrayLike
) -> tuple[Array, State, StepOutput]:
    """One decode step: process, draw, update the state, report log-probs.

    Keys, row by row: processor ``j`` of the chain (0-based) gets
    ``fold_in(key, j + 1)`` (a nested chain passes its key on the same way), and the
    token is drawn by ``sample(fold_in(key, 0), processed_logits)``.
    :func:`jaxsample.generate` passes ``key = fold_in(keys[b], i)`` for row ``b``'s
    generated index ``i``, so a row's tokens depend only on its own key and step, never
    on its batch-mates.

    Args:
      chain: a :class:`Chain` (or any :class:`LogitsProcessor`).
      logits: ``[B, V]`` (or any ``[..., V]``) model logits.
      state: the processor state (``chain.init(...)``); ``None`` (or ``()``) for a
        stateless chain, which then needs no ``init``.
      key: one key per row, shape ``logits.shape[:-1]`` (or a single key).

    Returns:
      ``(token int32[...], new_state, StepOutput)``; ``token`` is ``-1`` for a row with
      no finite (or a NaN) processed logit.

    On a GPU (the backend's selection plan is the Pallas kernel plan), a chain with
    the structure of :func:`default_chain` (``min_tokens_to_keep = 1``) runs as one
    fused step (`jaxsample._fused`): the same keys, draw and log-probs in a few
    kernels. Two documented differences there: the temperature is applied as
    ``x * (1 / T)`` (within one ulp of ``x / T``), and a row whose model logits hold a
    NaN or ``+inf`` gives ``-1`` whatever the filters.

    Example:
      >>> import jax, jax.numpy as jnp, jaxsample as js
      >>> c = js.default_chain(top_k=1)
      >>> logits = jnp.array([[0.0, 2.0, 1.0]])
      >>> keys = jax.random.split(jax.random.key(0), 1)
      >>> token, state, out = js.sample_step(c, logits, None, keys)  # stateless: no init
      >>> token
      Array([1], dtype=int32)
    """
    key = _sampling.as_typed_key(key)
    state = _state_or_init(chain, state, logits.shape[-1])
    plan = _select.default_plan(vocab=logits.shape[-1])
    logits = jnp.asarray(logits)
    if plan.engine == "kernel" and _fused.fusable(chain, logits.dtype):  # GPU: a few kernels
        token, raw, processed_lp, processed = _fused.fused_default_step(
            chain, logits, key, interpret=plan.interpret)
        return token, chain.update(state, token, processed), StepOutput(raw, processed_lp, processed)
    return process_and_draw(chain, logits, state, key, _sampling.sample)


def process_and_draw(chain: LogitsProcessor, logits: Array, state: State, key: Array, draw: Callable, *,
                     stream: int = 0) -> tuple[Array, State, StepOutput]:
    """The one sampling step: ``chain.apply`` (processor ``j`` gets ``fold_in(key, j + 1)``),
    ``draw(fold_in(key, stream), processed)``, ``chain.update``, and the two log-probs.

    :func:`sample_step` (``draw = sample``), :func:`gumbel_sample_step` (``draw =
    gumbel_sample``) and the speculative draft's draw (``stream = DRAFT_STREAM``) are this
    function; ``key`` holds typed keys, one per row.
    """
    processed = chain.apply(logits, state, key)  # [..., V]
    token = draw(fold_in_rows(key, stream), processed)  # [...]
    return token, chain.update(state, token, processed), step_output(logits, processed, token)


def step_output(logits: Array, processed: Array, token: Array) -> StepOutput:
    """The log-probs of ``token`` under the model's and the processed logits (one computation
    for every step function): ``log_softmax(x)[token]``, NaN for ``token = -1``."""
    return StepOutput(token_logprob_raw=_sampling.token_logprobs(logits, token),
                      token_logprob_processed=_sampling.token_logprobs(processed, token),
                      processed_logits=processed)


def gumbel_sample_step(chain: LogitsProcessor, logits: Array, state: State,
                       key: ArrayLike) -> tuple[Array, State, StepOutput]:
    """`jaxsample.sample_step` with the counter-based Gumbel draw (`gumbel_sample`).

    The single-device reference of `ShardedSampler`: same arguments, same keys
    (processors get ``fold_in(key, i + 1)``, the draw ``fold_in(key, 0)``), and for the
    same keys the same tokens as a sharded step.

    Example:
      >>> import jax, jax.numpy as jnp, jaxsample as js
      >>> c = js.default_chain(top_k=1)
      >>> keys = jax.random.split(jax.random.key(0), 1)
      >>> gumbel_sample_step(c, jnp.array([[0.0, 2.0, 1.0]]), c.init(None, None, 3), keys)[0]
      Array([1], dtype=int32)
    """
    return process_and_draw(chain, logits, state, _sampling.as_typed_key(key), gumbel_sample)
