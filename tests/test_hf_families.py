"""`models.load_hf` against transformers, one small random-weight model per family.

Each case builds a tiny model with transformers (GQA where the family has it, a vocabulary
of 301: not a multiple of 128), saves it with `save_pretrained` (one case sharded), loads
it with `load_hf`, and checks (1) float32 logits within 1e-4 of torch's on a ragged batch,
both the full forward and the prefill of right-padded prompts, and (2) 32 greedy tokens
equal to transformers' greedy `generate` (our KV-cache decode path). Skipped with a
reason when torch/transformers are not installed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from models import load_hf

TOL = 1e-4
V = 301  # not a multiple of 128
LENGTHS = (19, 7, 1)  # ragged batch (longer than every sliding window below)
NEW_TOKENS = 32

_COMMON = dict(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=80, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)

# id -> (transformers class names, config overrides, save_pretrained kwargs, expected config fields)
CASES = {
    "llama-tied-llama3-sharded": (
        ("LlamaConfig", "LlamaForCausalLM"),
        dict(tie_word_embeddings=True, rope_theta=10000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}),
        dict(max_shard_size="40KB"),
        dict(tie_embeddings=True, head_dim=12)),
    "llama-untied-linear": (
        ("LlamaConfig", "LlamaForCausalLM"),
        dict(tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 3.0}),
        {}, dict(tie_embeddings=False)),
    "mistral-window5": (
        ("MistralConfig", "MistralForCausalLM"),
        dict(tie_word_embeddings=False, sliding_window=5, num_key_value_heads=1),
        {}, dict(sliding_window=5, sliding_window_layers=None, n_kv_heads=1)),
    "qwen2-tied-bias": (
        ("Qwen2Config", "Qwen2ForCausalLM"),
        dict(tie_word_embeddings=True),
        {}, dict(qkv_bias=True, tie_embeddings=True, sliding_window=None)),
    "qwen2-untied-bias": (
        ("Qwen2Config", "Qwen2ForCausalLM"),
        dict(tie_word_embeddings=False),
        {}, dict(qkv_bias=True, tie_embeddings=False)),
    "gemma-headdim20": (
        ("GemmaConfig", "GemmaForCausalLM"),
        dict(head_dim=20, num_key_value_heads=1),
        {}, dict(head_dim=20, norm_plus_one=True, embed_scale=True, activation="gelu_tanh")),
    "gemma2-window6": (
        ("Gemma2Config", "Gemma2ForCausalLM"),
        dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
             final_logit_softcapping=5.0),
        {}, dict(post_norms=True, sliding_window=6, sliding_window_layers=(0,), attn_softcap=4.0,
                 final_softcap=5.0)),
    # ---- issue 22: the families of 2026
    "qwen3-untied-window6": (
        ("Qwen3Config", "Qwen3ForCausalLM"),
        dict(head_dim=16, tie_word_embeddings=False, use_sliding_window=True, sliding_window=6, max_window_layers=1),
        {}, dict(qk_norm="head", head_dim=16, sliding_window=6, sliding_window_layers=(1,), tie_embeddings=False)),
    "qwen3-tied": (
        ("Qwen3Config", "Qwen3ForCausalLM"), dict(tie_word_embeddings=True),
        {}, dict(qk_norm="head", tie_embeddings=True, sliding_window=None)),
    "olmo2": (
        ("Olmo2Config", "Olmo2ForCausalLM"), dict(tie_word_embeddings=False),
        {}, dict(qk_norm="full", pre_norms=False, post_norms=True)),
    "smollm3-nope-window6": (
        ("SmolLM3Config", "SmolLM3ForCausalLM"),
        dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=6),
        {}, dict(no_rope_layers=(1,), sliding_window=6, sliding_window_layers=(1,), tie_embeddings=True)),
    "phi3-partial-longrope": (
        ("Phi3Config", "Phi3ForCausalLM"),
        dict(hidden_size=64, partial_rotary_factor=0.75, original_max_position_embeddings=16,
             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                              "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                              "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}),
        {}, dict(rotary_dim=12, head_dim=16)),
    "phi3-window6": (
        ("Phi3Config", "Phi3ForCausalLM"), dict(sliding_window=6),
        {}, dict(sliding_window=6, sliding_window_layers=None, rotary_dim=None)),
    "gemma3-window6-linear": (
        ("Gemma3TextConfig", "Gemma3ForCausalLM"),
        dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"],
             rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}),
        {}, dict(qk_norm="head", post_norms=True, sliding_window=6, sliding_window_layers=(0,),
                 local_rope_theta=500.0, rope_theta=100000.0, attn_softcap=None, final_softcap=None)),
    "qwen3moe-norm-mlp-only": (
        ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[1]),
        {}, dict(num_experts=8, experts_per_token=2, moe_d_ff=24, norm_topk_prob=True, moe_layers=(0,))),
    "qwen3moe-step2": (
        ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
        dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=False,
             decoder_sparse_step=2),
        {}, dict(num_experts=6, experts_per_token=3, norm_topk_prob=False, moe_layers=(1,))),
    "mixtral-window6": (
        ("MixtralConfig", "MixtralForCausalLM"),
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6),
        {}, dict(num_experts=4, experts_per_token=2, moe_d_ff=80, norm_topk_prob=True, moe_layers=None,
                 sliding_window=6)),
}


def _randomize(torch, model, plus_one: bool):
    """O(1) weights (the default init gives near-zero logits), so every mapping matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((0.0 if plus_one else 1.0) + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p) * (0.3 if plus_one else 1.0))  # Gemma scales by sqrt(D)
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


def _build(hf, case, directory, seed=0):
    torch, transformers = hf
    (config_cls, model_cls), overrides, save_kwargs, _ = CASES[case]
    cfg = getattr(transformers, config_cls)(**{**_COMMON, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    _randomize(torch, model, plus_one=config_cls.startswith("Gemma"))
    model.save_pretrained(directory, **save_kwargs)
    return model


@pytest.fixture(scope="module")
def built(hf, tmp_path_factory):
    """case -> (transformers model, our model, directory), each built once per module."""
    cache = {}

    def get(case):
        if case not in cache:
            directory = tmp_path_factory.mktemp(case)
            model = _build(hf, case, directory, seed=len(case))
            cache[case] = (case, model, load_hf(str(directory)), directory)
        return cache[case]
    return get


def _ragged(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, V, size=(len(LENGTHS), max(LENGTHS)))
    for b, n in enumerate(LENGTHS):
        tokens[b, n:] = 0  # right padding
    return tokens, np.array(LENGTHS, np.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_and_logits_match_transformers(hf, built, case):
    torch, _ = hf
    case, model, lm, directory = built(case)
    for field, value in CASES[case][3].items():
        assert getattr(lm.config, field) == value, field
    assert lm.config.vocab_size == V and lm.config.dtype == "float32"
    if "sharded" in case:
        assert len(list(directory.glob("model-*.safetensors"))) > 1

    tokens, lengths = _ragged()
    ours_full = np.asarray(jax.jit(lm.forward)(jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths)))  # [B, P, V]
    ours_last, _ = jax.jit(lm.prefill)(jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths),
                                       lm.init_cache(len(LENGTHS), max(LENGTHS)))
    for b, n in enumerate(LENGTHS):
        with torch.no_grad():
            theirs = model(torch.tensor(tokens[b:b + 1, :n])).logits[0].numpy()  # [n, V]
        assert np.abs(theirs).max() > 1.0  # not trivially small
        np.testing.assert_allclose(ours_full[b, :n], theirs, atol=TOL, rtol=0, err_msg=f"{case} row {b}")
        np.testing.assert_allclose(np.asarray(ours_last[b]), theirs[-1], atol=TOL, rtol=0, err_msg=f"{case} row {b}")


# One generate case per family runs by default; the second Llama and Qwen2 variants (same
# decode path, other switches) only with -m slow, to keep the default run short.
_SLOW_GENERATE = ("llama-untied-linear", "qwen2-tied-bias", "qwen3-tied", "qwen3-untied-window6", "olmo2",
                  "smollm3-nope-window6", "phi3-window6", "qwen3moe-step2", "mixtral-window6")


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in _SLOW_GENERATE else c
                                  for c in sorted(CASES)])
def test_greedy_generate_matches_transformers(hf, built, case):
    torch, _ = hf
    case, model, lm, _ = built(case)
    tokens, lengths = _ragged(1)
    out = js.generate(lm, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths),
                      jax.random.split(jax.random.key(0), len(LENGTHS)), max_new_tokens=NEW_TOKENS)
    assert (np.asarray(out.lengths) == NEW_TOKENS).all()
    for b, n in enumerate(LENGTHS):
        with torch.no_grad():
            theirs = model.generate(torch.tensor(tokens[b:b + 1, :n]), attention_mask=torch.ones(1, n, dtype=torch.long),
                                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        ours, theirs = np.asarray(out.tokens[b]), theirs[0, n:].numpy()
        original = lm.config.rope_scaling.original_max_position_embeddings if "longrope" in case else None
        if original is not None and n <= original:
            # transformers' Phi-3 generate re-runs the whole sequence with the long factors once it
            # grows past original_max_position_embeddings (prepare_inputs_for_generation drops the
            # cache); a KV-cache decode keeps the keys it has: the tokens agree up to that point.
            ours, theirs = ours[:original - n + 1], theirs[:original - n + 1]
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{case} row {b}")


# ------------------------------------------------------- tokenizer, chat template, CLI

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] | tojson }}\n{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + eos_token + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_checkpoint(hf, tmp_path_factory):
    """A tiny Qwen2 with a trained BPE tokenizer, a chat template, and a generation_config
    that says greedy (do_sample false) and lists two EOS ids."""
    torch, transformers = hf
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Name three rivers of Europe.", "The Rhine, the Danube and the Loire."] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", unk_token="<unk>",
                                                chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    directory = tmp_path_factory.mktemp("chat")
    fast.save_pretrained(directory)
    cfg = transformers.Qwen2Config(**{**_COMMON, "vocab_size": len(fast), "eos_token_id": 2, "pad_token_id": 3,
                                      "bos_token_id": None, "tie_word_embeddings": False})
    torch.manual_seed(5)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    _randomize(torch, model, plus_one=False)
    model.generation_config = transformers.GenerationConfig(do_sample=False, eos_token_id=[2, 3], pad_token_id=3)
    model.save_pretrained(directory)
    return directory, model, fast


def test_chat_template_and_eos_ids_match_transformers(chat_checkpoint):
    from models import HFTokenizer

    directory, _, fast = chat_checkpoint
    tok = HFTokenizer(str(directory))
    assert tok.eos_ids == (2, 3) and tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be \"brief\" 🙂"}, {"role": "user", "content": " Name a river. "}]
    ours = tok.apply_chat_template(messages)
    assert ours == fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_end|>\n<|im_start|>assistant\n") and '"Be \\"brief\\" 🙂"' in ours
    assert tok.encode(ours, add_bos=False) == fast(ours, add_special_tokens=False)["input_ids"]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == fast.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False)


def test_cli_chat_uses_checkpoint_defaults_and_matches_transformers(hf, chat_checkpoint):
    """generate.py --chat on a Hugging Face directory: greedy from generation_config.json
    (no sampling flag given), stops at either EOS id, same text as transformers."""
    import os
    import subprocess
    import sys

    torch, _ = hf
    directory, model, fast = chat_checkpoint
    prompt = "Name three rivers."
    chat = fast.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([fast(chat, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12)
    expected = fast.decode(theirs[0, ids.shape[1]:], skip_special_tokens=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "generate.py"), prompt, "--checkpoint",
                        str(directory), "--chat", "--max-new-tokens", "12", "--seed", "1"],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr
    assert len(set(expected)) > 3  # a varied continuation, not one repeated token
    assert r.stdout.startswith(f"[0] {prompt}{expected}\n"), (r.stdout, expected)


def test_cli_plain_prompt_without_bos_json_prompt_logprobs_and_sampling_over_a_greedy_default(chat_checkpoint):
    """A checkpoint with no BOS encodes plain prompts without one; --json-output carries the
    prompt log-likelihood; a sampling flag over a greedy generation_config samples (with a note)."""
    import json
    import os
    import subprocess
    import sys

    directory, _, fast = chat_checkpoint
    prompt = "Name three rivers."
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "generate.py"), prompt, "--checkpoint",
                        str(directory), "--max-new-tokens", "4", "--top-p", "0.95", "--seed", "1",
                        "--json-output", "--prompt-logprobs"],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[0])
    assert row["prompt"] == prompt and len(row["token_ids"]) <= 4
    assert row["prompt_tokens_scored"] == len(fast(prompt, add_special_tokens=False)["input_ids"]) - 1
    assert row["prompt_logprob"] < 0
    assert "sampling at --temperature 0.8" in r.stderr


# ------------------------------------------------------- multimodal Gemma 3: the text model

def test_multimodal_gemma3_text_model_loads_and_matches_transformers(hf, tmp_path):
    """Gemma3ForConditionalGeneration: the text model (language_model.*) loads, the vision tower
    and projector are not read; its logits on text equal transformers' multimodal model's."""
    torch, transformers = hf
    text = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=48, head_dim=16, sliding_window=6, max_position_embeddings=128,
                layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=V - 1, boi_token_index=V - 3, eoi_token_index=V - 2)
    torch.manual_seed(3)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    model.config._attn_implementation = "eager"
    _randomize(torch, model, plus_one=True)
    model.save_pretrained(tmp_path)
    lm = load_hf(str(tmp_path))
    assert lm.config.qk_norm == "head" and lm.config.sliding_window_layers == (0,)
    tokens = _ragged()[0][:1, :19]
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens)).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(lm.forward(jnp.asarray(tokens, jnp.int32)))[0], theirs, atol=TOL, rtol=0)

    # without the text weights: says why
    import json as _json

    from safetensors.numpy import load_file, save_file
    weights = {k: v for k, v in load_file(str(tmp_path / "model.safetensors")).items()
               if not k.startswith("language_model.")}
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="without its text model's weights"):
        load_hf(str(tmp_path))
    blob = _json.loads((tmp_path / "config.json").read_text())
    del blob["text_config"]
    (tmp_path / "config.json").write_text(_json.dumps(blob))
    with pytest.raises(ValueError, match="needs a text_config dict"):
        load_hf(str(tmp_path))
