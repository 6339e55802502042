"""Loading Hugging Face checkpoints: `load_llama` (models/llama.py) and the config mapping,
file handling and errors of `load_hf` (models/hf.py).

The conformance tests build small random `LlamaForCausalLM`s with transformers, save them
with `save_pretrained` and check that our decoder reproduces torch's logits (skipped
with a reason when torch/transformers are not installed); tests/test_hf_families.py does
the same for every supported family. The other tests write HF-layout checkpoints with our
own safetensors writer and need neither.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import make_hf_llama
from models import checkpoint as ckpt
from models.config import DecoderConfig
from models.decoder import DecoderLM, init_params
from models.hf import load_hf, read_generation_defaults
from models.llama import config_from_hf, is_llama_checkpoint, load_llama

TOL = 1e-4  # fp32 max abs logit difference vs torch

# ------------------------------------------------------------------- torch conformance


def _torch_logits(hf, model, tokens: np.ndarray) -> np.ndarray:
    torch, _ = hf
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("kv_heads,rope_theta", [(2, 10000.0), (4, 500000.0)], ids=["gqa", "mha-theta5e5"])
def test_forward_matches_transformers(hf, tmp_path, kv_heads, rope_theta):
    model = make_hf_llama(hf, kv_heads=kv_heads, rope_theta=rope_theta)
    model.save_pretrained(tmp_path)
    assert is_llama_checkpoint(str(tmp_path))
    lm = load_llama(str(tmp_path))
    c = lm.config
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == \
        (300, 64, 2, 4, kv_heads, 16, 128)
    assert c.rope_theta == rope_theta and c.norm_eps == 1e-5 and c.dtype == "float32"
    assert c.max_seq_len == 128

    rng = np.random.default_rng(0)
    forward = jax.jit(lm.forward)
    for length in (1, 7, 33):
        tokens = rng.integers(0, 300, size=(2, length))
        ours = np.asarray(forward(jnp.asarray(tokens, jnp.int32)))
        theirs = _torch_logits(hf, model, tokens)
        assert ours.shape == theirs.shape == (2, length, 300)
        assert np.abs(theirs).max() > 1.0  # the comparison is not trivially small
        np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0, err_msg=f"length {length}")


def test_cached_decode_matches_transformers(hf, tmp_path):
    model = make_hf_llama(hf, kv_heads=2, seed=1)
    model.save_pretrained(tmp_path)
    lm = load_llama(str(tmp_path))
    tokens = np.random.default_rng(1).integers(0, 300, size=(1, 20))
    theirs = _torch_logits(hf, model, tokens)[0]  # [20, V]

    prompt = 6
    cache = lm.init_cache(1, 32)
    logits, cache = jax.jit(lm.prefill)(jnp.asarray(tokens[:, :prompt], jnp.int32), jnp.array([prompt]), cache)
    np.testing.assert_allclose(np.asarray(logits[0]), theirs[prompt - 1], atol=TOL, rtol=0)
    decode = jax.jit(lm.decode)
    for t in range(prompt, tokens.shape[1]):
        logits, cache = decode(jnp.asarray(tokens[:, t], jnp.int32), jnp.array([t]), cache)
        np.testing.assert_allclose(np.asarray(logits[0]), theirs[t], atol=TOL, rtol=0, err_msg=f"step {t}")


def test_mistral_without_sliding_window_matches_transformers(hf, tmp_path):
    torch, transformers = hf
    cfg = transformers.MistralConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=96, max_position_embeddings=64, sliding_window=None, tie_word_embeddings=True)
    torch.manual_seed(2)
    model = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else
                    torch.randn_like(p) / (p.shape[1] ** 0.5 if "embed" not in name else 1.0))
    model.save_pretrained(tmp_path)
    assert is_llama_checkpoint(str(tmp_path))
    lm = load_llama(str(tmp_path))
    assert (lm.config.n_kv_heads, lm.config.norm_eps) == (1, 1e-6)
    tokens = np.random.default_rng(2).integers(0, 300, size=(2, 12))
    np.testing.assert_allclose(np.asarray(jax.jit(lm.forward)(jnp.asarray(tokens, jnp.int32))),
                               _torch_logits(hf, model, tokens), atol=TOL, rtol=0)


def test_untied_checkpoint_loads_its_lm_head(hf, tmp_path):
    model = make_hf_llama(hf, tie=False)
    model.save_pretrained(tmp_path)
    lm = load_llama(str(tmp_path))
    assert not lm.config.tie_embeddings
    np.testing.assert_array_equal(np.asarray(lm.params["lm_head"]["kernel"]),
                                  model.lm_head.weight.detach().numpy().T)


def test_untied_config_with_identical_lm_head_loads(hf, tmp_path):
    torch, _ = hf
    model = make_hf_llama(hf, tie=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path)
    lm = load_llama(str(tmp_path))
    tokens = np.arange(10)[None] * 7
    np.testing.assert_allclose(np.asarray(jax.jit(lm.forward)(jnp.asarray(tokens, jnp.int32))),
                               _torch_logits(hf, model, tokens), atol=TOL, rtol=0)


# ------------------------------------------------ HF-layout checkpoints without torch


def _hf_config(c: DecoderConfig, **changes):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
           "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
           "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.d_ff,
           "max_position_embeddings": c.max_seq_len, "rope_theta": c.rope_theta, "rms_norm_eps": c.norm_eps,
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
           "tie_word_embeddings": True, "torch_dtype": c.dtype}
    cfg.update(changes)
    return cfg


def _hf_tensors(lm: DecoderLM) -> dict[str, np.ndarray]:
    """Our params -> HF names and [out, in] layout (the inverse of load_llama's mapping)."""
    flat = ckpt.flatten(lm.params)
    out = {"model.embed_tokens.weight": flat["embed.embedding"], "model.norm.weight": flat["final_norm.scale"]}
    hf_name = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for i in range(lm.config.n_layers):
        for ours, theirs in hf_name.items():
            out[f"model.layers.{i}.{theirs}.weight"] = flat[f"layers_{i}.{ours}.kernel"].T.copy()
        out[f"model.layers.{i}.input_layernorm.weight"] = flat[f"layers_{i}.attn_norm.scale"]
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = flat[f"layers_{i}.mlp_norm.scale"]
    return out


@pytest.fixture(scope="module")
def small_lm():
    c = DecoderConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=24,
                      max_seq_len=64, rope_theta=1234.0, norm_eps=1e-6)
    return DecoderLM(jax.jit(lambda k: init_params(c, k))(jax.random.key(3)), c)


def _write(directory, config: dict, tensors: dict, shards: int = 1):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        ckpt.save_safetensors(os.path.join(directory, "model.safetensors"), tensors)
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        ckpt.save_safetensors(os.path.join(directory, file), part)
        weight_map.update({n: file for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip_hf_layout(tmp_path, small_lm, shards):
    _write(tmp_path, _hf_config(small_lm.config), _hf_tensors(small_lm), shards=shards)
    lm = load_llama(str(tmp_path))
    assert lm.config == small_lm.config
    for a, b in zip(jax.tree.leaves(lm.params), jax.tree.leaves(small_lm.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(lm.params) == jax.tree.structure(small_lm.params)


@pytest.mark.parametrize("stale_in", [0, 2])
def test_index_is_authoritative_over_stale_copies_in_any_shard(tmp_path, small_lm, stale_in):
    """A tensor the index assigns to one shard but also present (stale) in another loads from
    the index's shard whatever the shards' order."""
    tensors = _hf_tensors(small_lm)
    _write(tmp_path, _hf_config(small_lm.config), tensors, shards=3)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    name = next(n for n, f in sorted(index.items()) if f != f"model-{stale_in + 1:05d}-of-00003.safetensors")
    stale_file = tmp_path / f"model-{stale_in + 1:05d}-of-00003.safetensors"
    part, _ = ckpt.load_safetensors(str(stale_file))
    part[name] = np.zeros_like(np.asarray(tensors[name]))
    ckpt.save_safetensors(str(stale_file), part)
    lm = load_llama(str(tmp_path))
    for a, b in zip(jax.tree.leaves(lm.params), jax.tree.leaves(small_lm.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dtype_override_and_bf16(tmp_path, small_lm):
    _write(tmp_path, _hf_config(small_lm.config), _hf_tensors(small_lm))
    lm = load_llama(str(tmp_path), dtype="bfloat16")
    assert lm.config.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(lm.params))
    with pytest.raises(ValueError, match="dtype='float64'"):
        load_llama(str(tmp_path), dtype="float64")


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["GPTNeoXForCausalLM"]}, "architectures=.*GPTNeoXForCausalLM"),
    ({"architectures": ["LlamaForCausalLM", "MistralForCausalLM"]}, "architectures="),
    ({"model_type": "qwen2"}, "model_type='qwen2' for LlamaForCausalLM"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config=.*gptq"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling=.*llama3.*low_freq_factor"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling=.*dynamic"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters=.*yarn"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}, "conflicting rope_theta"),
    ({"sliding_window": 0}, "sliding_window=0"),
    ({"sliding_window": 8, "layer_types": ["full_attention", "local", "full_attention"]}, "layer_types="),
    ({"torch_dtype": "int8"}, "torch_dtype='int8'"),
    ({"num_key_value_heads": 3}, "n_kv_heads=3"),
    ({"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_act": "relu"}, "hidden_act='relu'"),
    ({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_activation": "gelu"},
     "hidden_activation='gelu'"),
])
def test_unsupported_configs_raise(small_lm, change, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(_hf_config(small_lm.config, **change))


def test_load_llama_refuses_other_families(tmp_path, small_lm):
    _write(tmp_path, _hf_config(small_lm.config, architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
           _hf_tensors(small_lm))
    with pytest.raises(ValueError, match="model_type='qwen2'.*load_hf"):
        load_llama(str(tmp_path))


def test_family_configs():
    base = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
            "intermediate_size": 64}
    c = config_from_hf({**base, "architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    assert (c.sliding_window, c.sliding_window_layers, c.tie_embeddings) == (4096, None, False)  # class defaults
    c = config_from_hf({**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 64})
    assert (c.qkv_bias, c.sliding_window) == (True, None)  # use_sliding_window defaults to False
    c = config_from_hf({**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 64,
                        "use_sliding_window": True, "max_window_layers": 2})
    assert (c.sliding_window, c.sliding_window_layers) == (64, (2, 3))
    c = config_from_hf({**base, "architectures": ["GemmaForCausalLM"], "hidden_act": "gelu"})  # legacy value
    assert (c.head_dim, c.activation, c.norm_plus_one, c.embed_scale, c.tie_embeddings) == \
        (256, "gelu_tanh", True, True, True)
    c = config_from_hf({**base, "architectures": ["Gemma2ForCausalLM"], "query_pre_attn_scalar": 64})
    assert (c.sliding_window, c.sliding_window_layers, c.attn_softcap, c.final_softcap) == (4096, (0, 2), 50.0, 30.0)
    assert c.attn_scale == 64 ** -0.5 and c.post_norms
    c = config_from_hf({**base, "architectures": ["LlamaForCausalLM"],
                        "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert c.rope_scaling.rope_type == "linear" and c.rope_scaling.factor == 2.0
    assert type(c).from_dict(json.loads(c.to_json())) == c  # nested RopeScaling survives JSON


def test_config_variants():
    base = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 100,
            "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
            "sliding_window": None}
    c = config_from_hf(base)  # defaults: kv heads = heads, head_dim = hidden / heads, fp32
    assert config_from_hf({**base, "sliding_window": 4096, "max_position_embeddings": 4096}).n_layers == 1
    assert (c.n_kv_heads, c.head_dim, c.rope_theta, c.dtype) == (4, 8, 10000.0, "float32")
    c = config_from_hf({**base, "dtype": "bfloat16", "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert (c.dtype, c.rope_theta) == ("bfloat16", 5e5)  # transformers 5.x layout
    assert config_from_hf({**base, "torch_dtype": "float16"}).dtype == "float32"  # exact upcast


def test_bad_tensors_raise(tmp_path, small_lm):
    cfg, tensors = _hf_config(small_lm.config), _hf_tensors(small_lm)
    _write(tmp_path / "missing", cfg, {k: v for k, v in tensors.items() if "layers.2.mlp.up" not in k})
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['model.layers.2.mlp.up_proj.weight'\]"):
        load_llama(str(tmp_path / "missing"))
    bad = dict(tensors)
    bad["model.layers.1.self_attn.k_proj.weight"] = bad["model.layers.1.self_attn.k_proj.weight"].T.copy()
    _write(tmp_path / "shape", cfg, bad)
    with pytest.raises(ckpt.CheckpointError, match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(16, 8\)"):
        load_llama(str(tmp_path / "shape"))
    _write(tmp_path / "extra", cfg, {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(16, np.float32)})
    with pytest.raises(ckpt.CheckpointError, match="unexpected.*q_proj.bias"):
        load_llama(str(tmp_path / "extra"))
    _write(tmp_path / "untied", {**cfg, "tie_word_embeddings": False}, tensors)
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['lm_head.weight'\]"):
        load_llama(str(tmp_path / "untied"))
    bad = {**tensors, "model.norm.weight": tensors["model.norm.weight"].astype(np.int32)}
    _write(tmp_path / "int", cfg, bad)
    with pytest.raises(ckpt.CheckpointError, match="'model.norm.weight' has non-float dtype I32"):
        load_hf(str(tmp_path / "int"))


def test_bad_files_raise(tmp_path, small_lm):
    cfg, tensors = _hf_config(small_lm.config), _hf_tensors(small_lm)
    _write(tmp_path / "shard", cfg, tensors, shards=3)
    os.remove(tmp_path / "shard" / "model-00002-of-00003.safetensors")
    with pytest.raises(ckpt.CheckpointError, match=r"shard files listed in the index are missing: "
                                                   r"\['model-00002-of-00003.safetensors'\]"):
        load_hf(str(tmp_path / "shard"))

    _write(tmp_path / "trunc", cfg, tensors, shards=3)
    file = tmp_path / "trunc" / "model-00003-of-00003.safetensors"
    file.write_bytes(file.read_bytes()[:-12])
    with pytest.raises(ckpt.CheckpointError, match=r"model-00003-of-00003.safetensors: truncated: tensor '.*' ends at"):
        load_hf(str(tmp_path / "trunc"))
    file.write_bytes(b"\x00" * 5)
    with pytest.raises(ckpt.CheckpointError, match=r"truncated safetensors file \(5 bytes\)"):
        load_hf(str(tmp_path / "trunc"))

    _write(tmp_path / "index", cfg, tensors, shards=3)
    index = json.loads((tmp_path / "index" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00003.safetensors"
    (tmp_path / "index" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ckpt.CheckpointError, match=r"in the index but not in their shard: \['model.layers.9"):
        load_hf(str(tmp_path / "index"))

    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf(str(tmp_path / "none"))
    (tmp_path / "none" / "config.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="config.json: malformed JSON"):
        load_hf(str(tmp_path / "none"))


def test_generation_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [128001, 128008, 128009, 128001], "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    d = read_generation_defaults(str(tmp_path))
    assert d.eos_ids == (128001, 128008, 128009, 7)
    assert (d.temperature, d.top_p, d.top_k) == (0.6, 0.9, None)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "top_k": 20}))
    d = read_generation_defaults(str(tmp_path))
    assert (d.eos_ids, d.temperature, d.top_k) == ((7,), 0.0, 20)  # do_sample false: greedy, as transformers
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="eos_token_id='x'"):
        read_generation_defaults(str(tmp_path))


def test_is_llama_checkpoint(tmp_path, small_lm):
    assert not is_llama_checkpoint(str(tmp_path))  # no config.json
    ckpt.save_model(str(tmp_path / "ours"), small_lm)
    assert not is_llama_checkpoint(str(tmp_path / "ours"))
    _write(tmp_path / "hf", _hf_config(small_lm.config), _hf_tensors(small_lm))
    assert is_llama_checkpoint(str(tmp_path / "hf"))


def test_family_switches_round_trip_through_our_checkpoints(tmp_path):
    """A config with every family switch on saves and loads with our own format (nested
    RopeScaling, tuple of sliding layers) and computes the same logits."""
    from models.config import RopeScaling

    c = DecoderConfig(vocab_size=37, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=6, d_ff=24,
                      max_seq_len=32, tie_embeddings=False, qkv_bias=True, activation="gelu_tanh",
                      norm_plus_one=True, embed_scale=True, post_norms=True, attn_scale=0.3, attn_softcap=5.0,
                      final_softcap=4.0, sliding_window=3, sliding_window_layers=(0, 2),
                      rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 16))
    lm = DecoderLM.random(c, jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(lm.params)) == c.num_params()
    ckpt.save_model(str(tmp_path / "m"), lm)
    back = ckpt.load_model(str(tmp_path / "m"))
    assert back.config == c
    tokens = jnp.asarray(np.arange(20)[None] % 37, jnp.int32)
    logits = np.asarray(lm.forward(tokens))
    np.testing.assert_array_equal(np.asarray(back.forward(tokens)), logits)
    assert np.abs(logits).max() <= 4.0  # final soft-cap
    with pytest.raises(ValueError, match=r"sliding_window_layers must be .* \[0, 3\), got \(5,\)"):
        c.replace(sliding_window_layers=(5,))
    with pytest.raises(ValueError, match="activation must be one of"):
        c.replace(activation="relu")


@pytest.mark.parametrize("change", [dict(tie_embeddings=False), dict(qkv_bias=True), dict(post_norms=True)])
def test_sharding_places_every_parameter(small_lm, change):
    """Untied heads, biases and post-norms (refused before issue 22) all get a PartitionSpec."""
    from models.decoder import init_params
    from models.sharding import make_mesh, param_specs

    config = small_lm.config.replace(**change)
    specs = param_specs(config, make_mesh((1, 1)))
    template = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    assert jax.tree.structure(template) == jax.tree.structure(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
