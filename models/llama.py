"""Load a local Hugging Face Llama-family checkpoint into our `DecoderLM`.

    >>> from models.llama import load_llama
    >>> lm = load_llama("path/to/TinyLlama")        # config.json + *.safetensors
    >>> logits = lm.forward(tokens)                  # [B, T, V]

Reads `config.json` and the weights (`model.safetensors`, or shards listed in
`model.safetensors.index.json`) with our own safetensors reader: no torch needed.

Our decoder is exactly a Llama decoder with a *tied* output projection, so only
checkpoints it can represent exactly are accepted; anything else (an untied `lm_head`,
attention/MLP biases, RoPE scaling, a sliding window, another activation) raises a
`ValueError` naming the offending field, rather than loading a model that silently
computes something else.

Weight layout: Hugging Face `nn.Linear` weights are [out, in]; Flax `Dense` kernels are
[in, out], so projections are transposed. Our RoPE already uses the Hugging Face
rotate-half convention, so q/k need no permutation.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_dtypes
import numpy as np

from models import checkpoint as ckpt
from models.config import DecoderConfig
from models.decoder import DecoderLM, init_params

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Architectures whose math is exactly ours (given the checks below).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")

_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# torch_dtype of the checkpoint -> our dtype. float16 is upcast to float32 (exact):
# the decoder runs in float32 or bfloat16 only.
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}


# ---------------------------------------------------------------------------- config


def read_hf_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ckpt.CheckpointError(f"no {CONFIG_FILE} in {directory!r}") from None
    except json.JSONDecodeError as e:
        raise ckpt.CheckpointError(f"{path}: malformed JSON: {e}") from None


def is_llama_checkpoint(directory: str) -> bool:
    """True if `directory` holds a Hugging Face Llama-family checkpoint (by its config.json).

    Our own checkpoints (config.json with a "model" section) return False.
    """
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") in SUPPORTED_MODEL_TYPES


def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta, checking that no RoPE scaling is used (transformers 4.x and 5.x layouts)."""
    theta = hf.get("rope_theta")
    for field in ("rope_scaling", "rope_parameters"):
        params = hf.get(field)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"unsupported {field}={params!r}: expected null or a dict")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported {field}={params!r}: only unscaled RoPE (rope_type 'default') "
                             "is implemented")
        if "rope_theta" in params:
            if theta is not None and float(theta) != float(params["rope_theta"]):
                raise ValueError(f"conflicting rope_theta={theta!r} and {field}.rope_theta="
                                 f"{params['rope_theta']!r}")
            theta = params["rope_theta"]
    return 10000.0 if theta is None else float(theta)


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> DecoderConfig:
    """Maps a Hugging Face Llama/Mistral config.json dict to a `DecoderConfig`.

    Raises ValueError naming the field and value for anything our decoder can't represent
    exactly. `dtype` (float32/bfloat16) overrides the checkpoint's torch_dtype.
    """
    archs = hf.get("architectures") or []
    if not archs and hf.get("model_type") in SUPPORTED_MODEL_TYPES:
        archs = ["LlamaForCausalLM"]
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad or not archs:
        raise ValueError(f"unsupported architectures={archs!r}: expected one of {list(SUPPORTED_ARCHITECTURES)}")
    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type={model_type!r}: expected one of {list(SUPPORTED_MODEL_TYPES)}")

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act={act!r}: only 'silu' (SwiGLU) is implemented")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            raise ValueError(f"unsupported {field}={hf[field]!r}: our decoder has no biases")
    # MistralConfig's default window is 4096; a window no shorter than the context has no effect.
    window = hf.get("sliding_window", 4096 if model_type == "mistral" else None)
    if window is not None and window < hf.get("max_position_embeddings", 2048):
        raise ValueError(f"unsupported sliding_window={window!r} (< max_position_embeddings="
                         f"{hf.get('max_position_embeddings', 2048)}): our decoder attends to the whole context")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [f for f in required if f not in hf]
    if missing:
        raise ValueError(f"config.json lacks required fields {missing}")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or (hidden // heads)
    if not hf.get("head_dim") and hidden % heads:
        raise ValueError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                         "(and config.json gives no head_dim)")

    if dtype is None:
        torch_dtype = hf.get("torch_dtype", hf.get("dtype")) or "float32"
        if torch_dtype not in _TORCH_DTYPES:
            raise ValueError(f"unsupported torch_dtype={torch_dtype!r}: expected one of {sorted(_TORCH_DTYPES)}")
        dtype = _TORCH_DTYPES[torch_dtype]
    elif dtype not in _NP_DTYPES:
        raise ValueError(f"unsupported dtype={dtype!r}: expected one of {sorted(_NP_DTYPES)}")

    return DecoderConfig(
        vocab_size=hf["vocab_size"], d_model=hidden, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=kv_heads, head_dim=head_dim, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), dtype=dtype)


# ---------------------------------------------------------------------------- weights


def read_hf_weights(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint: single `model.safetensors` or shards from the index file."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ckpt.CheckpointError(f"{index_path}: malformed index ({e!r})") from None
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise ckpt.CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory!r} "
                                   "(only safetensors checkpoints are supported)")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        arrays, _ = ckpt.load_safetensors(os.path.join(directory, file))
        for name, arr in arrays.items():
            if name in tensors:
                raise ckpt.CheckpointError(f"{directory}: tensor {name!r} appears in more than one shard")
            tensors[name] = arr
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ckpt.CheckpointError(f"{index_path}: tensors listed in the index but not in the shards: "
                                       f"{absent[:5]}")
    return tensors


def _expected_hf_shapes(c: DecoderConfig) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """HF tensor name -> (HF shape, our flat name, transpose?)."""
    d, hd = c.d_model, c.head_dim
    out = {"model.embed_tokens.weight": ((c.vocab_size, d), "embed.embedding", False),
           "model.norm.weight": ((d,), "final_norm.scale", False)}
    for i in range(c.n_layers):
        p, q = f"model.layers.{i}.", f"layers_{i}."
        out.update({
            p + "self_attn.q_proj.weight": ((c.n_heads * hd, d), q + "q.kernel", True),
            p + "self_attn.k_proj.weight": ((c.n_kv_heads * hd, d), q + "k.kernel", True),
            p + "self_attn.v_proj.weight": ((c.n_kv_heads * hd, d), q + "v.kernel", True),
            p + "self_attn.o_proj.weight": ((d, c.n_heads * hd), q + "o.kernel", True),
            p + "mlp.gate_proj.weight": ((c.d_ff, d), q + "gate.kernel", True),
            p + "mlp.up_proj.weight": ((c.d_ff, d), q + "up.kernel", True),
            p + "mlp.down_proj.weight": ((d, c.d_ff), q + "down.kernel", True),
            p + "input_layernorm.weight": ((d,), q + "attn_norm.scale", False),
            p + "post_attention_layernorm.weight": ((d,), q + "mlp_norm.scale", False),
        })
    return out


def convert_hf_weights(tensors: dict[str, np.ndarray], hf: dict[str, Any], config: DecoderConfig,
                       what: str = "checkpoint") -> dict:
    """HF tensors -> our parameter pytree (validated against `init_params`'s shapes and dtypes)."""
    tensors = dict(tensors)
    # Bare LlamaModel checkpoints have no "model." prefix.
    if "model.embed_tokens.weight" not in tensors and "embed_tokens.weight" in tensors:
        tensors = {(n if n == "lm_head.weight" else "model." + n): a for n, a in tensors.items()}
    # Old checkpoints may carry RoPE's inverse frequencies as a buffer: recomputed, ignore.
    tensors = {n: a for n, a in tensors.items() if not n.endswith("rotary_emb.inv_freq")}

    lm_head = tensors.pop("lm_head.weight", None)
    embed = tensors.get("model.embed_tokens.weight")
    tied = hf.get("tie_word_embeddings", False)  # LlamaConfig's default
    if not tied:
        if lm_head is None:
            raise ValueError("tie_word_embeddings=False but the checkpoint has no lm_head.weight; "
                             "our decoder only supports a tied output projection")
        if embed is None or lm_head.shape != embed.shape or not np.array_equal(lm_head, embed):
            raise ValueError("tie_word_embeddings=False and lm_head.weight differs from "
                             "model.embed_tokens.weight: untied output projections are not supported "
                             "(our decoder computes logits = hidden @ embedding.T)")

    expected = _expected_hf_shapes(config)
    missing = sorted(set(expected) - set(tensors), key=_natural)
    unexpected = sorted(set(tensors) - set(expected), key=_natural)
    if missing or unexpected:
        raise ckpt.CheckpointError(f"{what}: tensor names do not match a {config.n_layers}-layer Llama: "
                                   f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                   f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    target = _NP_DTYPES[config.dtype]
    flat = {}
    for name, (shape, ours, transpose) in expected.items():
        arr = tensors[name]
        if tuple(arr.shape) != shape:
            raise ckpt.CheckpointError(f"{what}: tensor {name!r} has shape {tuple(arr.shape)}, "
                                       f"expected {shape} from config.json")
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.dtype(ml_dtypes.bfloat16):
            raise ckpt.CheckpointError(f"{what}: tensor {name!r} has non-float dtype {arr.dtype}")
        if transpose:
            arr = arr.T
        flat[ours] = np.ascontiguousarray(arr.astype(target))
    template = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return ckpt.unflatten_like(template, flat, what)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def load_llama(directory: str, dtype: str | None = None) -> DecoderLM:
    """Loads a local Hugging Face Llama/Mistral checkpoint directory as a `DecoderLM`.

    Args:
      directory: holds config.json and model.safetensors (or shards + index).
      dtype: "float32" or "bfloat16"; default: the checkpoint's torch_dtype
        (float16 checkpoints load as float32).
    Raises:
      ValueError: the config describes a model our decoder cannot represent exactly
        (untied lm_head, biases, RoPE scaling, sliding window, non-SiLU activation, ...).
      CheckpointError (a ValueError): files missing/truncated, tensor names or shapes wrong.
    """
    hf = read_hf_config(directory)
    config = config_from_hf(hf, dtype)
    tensors = read_hf_weights(directory)
    params = convert_hf_weights(tensors, hf, config, what=directory)
    return DecoderLM(params=params, config=config)
