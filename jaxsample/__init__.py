"""jaxsample: pure, jitted, per-row token sampling for language models in JAX.

Semantics follow ``docs/sampling.md``: filters are pure ``logits -> logits``
functions with traced (per-row) values, processors are pytrees composed with
:func:`chain`, and :func:`sample` draws with an explicit (per-row) key.

Example:
  >>> import jax, jax.numpy as jnp, jaxsample as js
  >>> logits = jnp.array([[1.2, 2.0, 3.5, 3.0, 1.8, 1.0]])
  >>> c = js.default_chain(temperature=0.7, top_p=0.9)
  >>> token = js.sample(jax.random.key(0), c(logits))
"""

# --- filters: logits[..., V] -> logits[..., V] --------------------------------------
from jaxsample._filters.filters import allow_tokens
from jaxsample._filters.filters import ban_tokens
from jaxsample._filters.filters import epsilon_cutoff
from jaxsample._filters.filters import eta_cutoff
from jaxsample._filters.filters import logit_bias
from jaxsample._filters.filters import min_p
from jaxsample._filters.filters import sparse_logit_bias
from jaxsample._filters.filters import temperature
from jaxsample._filters.filters import top_k
from jaxsample._filters.filters import top_n_sigma
from jaxsample._filters.filters import top_p
from jaxsample._filters.filters import typical_p

# --- sampling and log-probs ----------------------------------------------------------
from jaxsample._filters.sampling import greedy
from jaxsample._filters.sampling import sample
from jaxsample._filters.sampling import token_logprobs
from jaxsample._filters.sampling import entropy

# --- processors (pytrees), composition, one decode step ------------------------------
from jaxsample._processors.builtin import AllowTokens
from jaxsample._processors.builtin import BanTokens
from jaxsample._processors.base import Chain
from jaxsample._processors.builtin import EpsilonCutoff
from jaxsample._processors.builtin import EtaCutoff
from jaxsample._processors.builtin import LogitBias
from jaxsample._processors.base import LogitsProcessor
from jaxsample._processors.builtin import MinP
from jaxsample._processors.builtin import SparseLogitBias
from jaxsample._step.step import StepOutput
from jaxsample._processors.builtin import Temperature
from jaxsample._processors.builtin import TopK
from jaxsample._processors.builtin import TopNSigma
from jaxsample._processors.builtin import TopP
from jaxsample._processors.builtin import TypicalP
from jaxsample._processors.base import chain
from jaxsample._processors.builtin import default_chain
from jaxsample._step.step import sample_step
from jaxsample._processors.base import Stateless
from jaxsample._processors.base import check_processor
from jaxsample._processors.base import processor_dataclass
from jaxsample._processors.base import static_field
from jaxsample._processors.base import stateless

# --- generation ----------------------------------------------------------------------
from jaxsample._decoding.generate import FinishReason
from jaxsample._decoding.generate import GenerateOutput
from jaxsample._decoding.generate import LanguageModel
from jaxsample._decoding.generate import generate
from jaxsample._decoding.generate import GenerateStats
from jaxsample._decoding.generate import StreamChunk
from jaxsample._decoding.stream import generate_stream
from jaxsample._decoding.engine import Completion
from jaxsample._decoding.engine import generate_many
from jaxsample._decoding.engine import generate_many_stream
from jaxsample._decoding.core import MemoryLimitError
from jaxsample._decoding.core import device_memory_bytes

__version__ = "0.1.0"

__all__ = [
    # limits (docs/limits.md)
    "MemoryLimitError",
    "device_memory_bytes",
    # filters
    "allow_tokens",
    "ban_tokens",
    "epsilon_cutoff",
    "eta_cutoff",
    "logit_bias",
    "min_p",
    "sparse_logit_bias",
    "temperature",
    "top_k",
    "top_n_sigma",
    "top_p",
    "typical_p",
    # sampling and log-probs
    "greedy",
    "sample",
    "token_logprobs",
    "entropy",
    # processors, composition, one decode step
    "AllowTokens",
    "BanTokens",
    "Chain",
    "EpsilonCutoff",
    "EtaCutoff",
    "LogitBias",
    "LogitsProcessor",
    "MinP",
    "SparseLogitBias",
    "StepOutput",
    "Temperature",
    "TopK",
    "TopNSigma",
    "TopP",
    "TypicalP",
    "chain",
    "default_chain",
    "sample_step",
    "Stateless",
    "check_processor",
    "processor_dataclass",
    "static_field",
    "stateless",
    # generation
    "FinishReason",
    "GenerateOutput",
    "LanguageModel",
    "generate",
    "GenerateStats",
    "StreamChunk",
    "generate_stream",
    "Completion",
    "generate_many",
    "generate_many_stream",
]

# --- penalties and stateful samplers, chain presets -----------------------------------
from jaxsample._processors.base import init_state
from jaxsample._processors.penalties import DRY
from jaxsample._processors.penalties import XTC
from jaxsample._processors.penalties import BadWords
from jaxsample._processors.penalties import DynamicTemperature
from jaxsample._processors.penalties import History
from jaxsample._processors.penalties import MinNewTokens
from jaxsample._processors.penalties import MirostatV2
from jaxsample._processors.penalties import NoRepeatNGram
from jaxsample._processors.penalties import PresenceFrequencyPenalty
from jaxsample._processors.penalties import RepetitionPenalty
from jaxsample._processors.presets import ORDERS
from jaxsample._processors.presets import full_chain
from jaxsample._processors.presets import llamacpp_chain
from jaxsample._processors.presets import preset_chain
from jaxsample._processors.presets import transformers_chain
from jaxsample._processors.presets import vllm_chain

__all__ += [
    "init_state",
    "BadWords",
    "DRY",
    "DynamicTemperature",
    "History",
    "MinNewTokens",
    "MirostatV2",
    "NoRepeatNGram",
    "PresenceFrequencyPenalty",
    "RepetitionPenalty",
    "XTC",
    "ORDERS",
    "full_chain",
    "llamacpp_chain",
    "preset_chain",
    "transformers_chain",
    "vllm_chain",
]

# --- sharding: vocab-sharded sampling and data/model-parallel generation (jax.sharding) ---
from jaxsample._sharding.sharded import ShardedSampler
from jaxsample._selection.select import VocabShard
from jaxsample._filters.gumbel import gumbel_sample
from jaxsample._step.step import gumbel_sample_step
from jaxsample._sharding.sharded import register_vocab_parallel
from jaxsample._sharding.sharded import sharded_generate
from jaxsample._sharding.sharded import place
from jaxsample._sharding.sharded import sharded_sample_step

__all__ += [
    "ShardedSampler",
    "VocabShard",
    "gumbel_sample",
    "gumbel_sample_step",
    "register_vocab_parallel",
    "place",
    "sharded_generate",
    "sharded_sample_step",
]

# --- speculative decoding (exact: the output distribution is generate's) -------------
from jaxsample._decoding.ngram import NGramDraft
from jaxsample._decoding.speculative import MAX_DRAFT_TOKENS
from jaxsample._decoding.speculative import PromptLookup
from jaxsample._decoding.speculative import SpeculativeOutput
from jaxsample._decoding.speculative import SpeculativeStats
from jaxsample._decoding.speculative import speculative_generate

__all__ += [
    "MAX_DRAFT_TOKENS",
    "NGramDraft",
    "PromptLookup",
    "SpeculativeOutput",
    "SpeculativeStats",
    "speculative_generate",
]

# --- beam search (deterministic, transformers' semantics) -----------------------------
from jaxsample._decoding.beam import BeamSearchOutput
from jaxsample._decoding.beam import beam_search

__all__ += [
    "BeamSearchOutput",
    "beam_search",
]

# --- constrained decoding: regex / JSON schema / choices as token masks (pip install '.[structured]') ---
from jaxsample._constraints.host import HostJSONSchema
from jaxsample._constraints.structured import Choice
from jaxsample._constraints.structured import Constraint
from jaxsample._constraints.structured import JSONSchema
from jaxsample._constraints.structured import Regex
from jaxsample._constraints.structured import stack_constraints
from jaxsample._constraints.structured import token_bytes

__all__ += [
    "Choice",
    "HostJSONSchema",
    "Constraint",
    "JSONSchema",
    "Regex",
    "stack_constraints",
    "token_bytes",
]

# --- the GPU kernel switch (docs/kernels.md) ------------------------------------------
from jaxsample._selection.switch import KernelError
from jaxsample._selection.switch import use_kernels

__all__ += [
    "KernelError",
    "use_kernels",
]

# --- files written whole or not at all (NGramDraft.save; models/checkpoint.py) ----------
from jaxsample._files import atomic_file

__all__ += [
    "atomic_file",
]
