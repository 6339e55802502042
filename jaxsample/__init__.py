"""jaxsample: pure, jitted, per-row token sampling for language models in JAX.

Semantics follow ``shared/SAMPLING.md``: filters are pure ``logits -> logits``
functions with traced (per-row) values, processors are pytrees composed with
:func:`chain`, and :func:`sample` draws with an explicit (per-row) key.

Example:
  >>> import jax, jax.numpy as jnp, jaxsample as js
  >>> logits = jnp.array([[1.2, 2.0, 3.5, 3.0, 1.8, 1.0]])
  >>> c = js.default_chain(temperature=0.7, top_p=0.9)
  >>> token = js.sample(jax.random.key(0), c(logits))
"""

# --- filters: logits[..., V] -> logits[..., V] --------------------------------------
from jaxsample._filters import allow_tokens
from jaxsample._filters import ban_tokens
from jaxsample._filters import epsilon_cutoff
from jaxsample._filters import eta_cutoff
from jaxsample._filters import logit_bias
from jaxsample._filters import min_p
from jaxsample._filters import sparse_logit_bias
from jaxsample._filters import temperature
from jaxsample._filters import top_k
from jaxsample._filters import top_n_sigma
from jaxsample._filters import top_p
from jaxsample._filters import typical_p

# --- sampling and log-probs ----------------------------------------------------------
from jaxsample._sampling import greedy
from jaxsample._sampling import sample
from jaxsample._sampling import token_logprobs
from jaxsample._sampling import entropy

# --- processors (pytrees), composition, one decode step ------------------------------
from jaxsample._chain import AllowTokens
from jaxsample._chain import BanTokens
from jaxsample._chain import Chain
from jaxsample._chain import EpsilonCutoff
from jaxsample._chain import EtaCutoff
from jaxsample._chain import LogitBias
from jaxsample._chain import LogitsProcessor
from jaxsample._chain import MinP
from jaxsample._chain import SparseLogitBias
from jaxsample._chain import StepOutput
from jaxsample._chain import Temperature
from jaxsample._chain import TopK
from jaxsample._chain import TopNSigma
from jaxsample._chain import TopP
from jaxsample._chain import TypicalP
from jaxsample._chain import chain
from jaxsample._chain import default_chain
from jaxsample._chain import sample_step
from jaxsample._chain import Stateless
from jaxsample._chain import check_processor
from jaxsample._chain import processor_dataclass
from jaxsample._chain import static_field
from jaxsample._chain import stateless

# --- generation ----------------------------------------------------------------------
from jaxsample._generate import FinishReason
from jaxsample._generate import GenerateOutput
from jaxsample._generate import LanguageModel
from jaxsample._generate import generate
from jaxsample._generate import GenerateStats
from jaxsample._generate import StreamChunk
from jaxsample._generate import generate_stream

__version__ = "0.1.0"

__all__ = [
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
]

# --- penalties and stateful samplers, chain presets -----------------------------------
from jaxsample._chain import init_state
from jaxsample._penalties import DRY
from jaxsample._penalties import XTC
from jaxsample._penalties import BadWords
from jaxsample._penalties import DynamicTemperature
from jaxsample._penalties import History
from jaxsample._penalties import MinNewTokens
from jaxsample._penalties import MirostatV2
from jaxsample._penalties import NoRepeatNGram
from jaxsample._penalties import PresenceFrequencyPenalty
from jaxsample._penalties import RepetitionPenalty
from jaxsample._presets import ORDERS
from jaxsample._presets import full_chain
from jaxsample._presets import llamacpp_chain
from jaxsample._presets import preset_chain
from jaxsample._presets import transformers_chain
from jaxsample._presets import vllm_chain

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
from jaxsample._sharded import ShardedSampler
from jaxsample._sharded import VocabShard
from jaxsample._sharded import gumbel_sample
from jaxsample._sharded import gumbel_sample_step
from jaxsample._sharded import register_vocab_parallel
from jaxsample._sharded import sharded_generate
from jaxsample._sharded import sharded_sample_step

__all__ += [
    "ShardedSampler",
    "VocabShard",
    "gumbel_sample",
    "gumbel_sample_step",
    "register_vocab_parallel",
    "sharded_generate",
    "sharded_sample_step",
]

# --- speculative decoding (exact: the output distribution is generate's) -------------
from jaxsample._ngram import NGramDraft
from jaxsample._speculative import PromptLookup
from jaxsample._speculative import SpeculativeOutput
from jaxsample._speculative import SpeculativeStats
from jaxsample._speculative import speculative_generate

__all__ += [
    "NGramDraft",
    "PromptLookup",
    "SpeculativeOutput",
    "SpeculativeStats",
    "speculative_generate",
]

# --- beam search (deterministic, transformers' semantics) -----------------------------
from jaxsample._beam import BeamSearchOutput
from jaxsample._beam import beam_search

__all__ += [
    "BeamSearchOutput",
    "beam_search",
]

# --- constrained decoding: regex / JSON schema / choices as token masks (pip install '.[structured]') ---
from jaxsample._structured import Choice
from jaxsample._structured import Constraint
from jaxsample._structured import JSONSchema
from jaxsample._structured import Regex
from jaxsample._structured import stack_constraints
from jaxsample._structured import token_bytes

__all__ += [
    "Choice",
    "Constraint",
    "JSONSchema",
    "Regex",
    "stack_constraints",
    "token_bytes",
]
