"""Chain presets: the documented orders, pruning, errors, where the order changes results,
and transformers' own processor list (skipped without torch)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from helpers import load_script

SEEDS = np.array([[1.2, 2.0, 3.5, 3.0, 1.8, 1.0]], np.float32)  # docs/sampling.md's worked example
WORDS = ("wonderful", "cloudy", "nice", "hot", "gloomy", "delicious")


def names(c):
    return [type(p).__name__ for p in c.processors]


def kept(logits):
    return {WORDS[i] for i in np.flatnonzero(np.isfinite(np.asarray(logits)[0]))}


def test_documented_orders():
    extras = dict(logit_bias={1: 0.5}, bad_words=[[3]], min_new_tokens=2, stop_ids=[5])
    assert names(js.full_chain(allowed_tokens=[1, 2], **extras)) == [
        "SparseLogitBias", "AllowTokens", "BadWords", "MinNewTokens", "RepetitionPenalty",
        "PresenceFrequencyPenalty", "NoRepeatNGram", "DRY", "DynamicTemperature", "TopK", "TopP",
        "MinP", "TypicalP", "EpsilonCutoff", "EtaCutoff", "TopNSigma", "XTC", "MirostatV2"]
    assert names(js.transformers_chain(**extras)) == [
        "SparseLogitBias", "RepetitionPenalty", "NoRepeatNGram", "BadWords", "MinNewTokens",
        "Temperature", "TopK", "TopP", "MinP", "TypicalP", "EpsilonCutoff", "EtaCutoff"]
    assert names(js.vllm_chain(allowed_tokens=[1, 2], **extras)) == [
        "AllowTokens", "BadWords", "MinNewTokens", "SparseLogitBias", "RepetitionPenalty",
        "PresenceFrequencyPenalty", "Temperature", "MinP", "TopK", "TopP"]
    assert names(js.llamacpp_chain(logit_bias={1: 0.5})) == [
        "SparseLogitBias", "RepetitionPenalty", "PresenceFrequencyPenalty", "DRY", "TopNSigma", "TopK",
        "TypicalP", "TopP", "MinP", "XTC", "DynamicTemperature"]
    assert names(js.llamacpp_chain(mirostat_tau=5.0, temperature=0.8)) == [
        "Temperature", "MirostatV2"]
    # what each system counts: vLLM matches bad words on the output, llama.cpp's
    # frequency/presence penalties count the prompt too
    assert not js.vllm_chain(bad_words=[[3]]).processors[0].include_prompt
    assert js.llamacpp_chain().processors[1].include_prompt


def test_defaults_are_the_identity_and_prune_keeps_only_what_acts():
    # every default is its stage's identity value (each processor's identity is tested with
    # the processor), so pruning a default preset leaves nothing
    for build in (js.full_chain, js.transformers_chain, js.vllm_chain, js.llamacpp_chain):
        assert len(build().processors) >= 6
        assert names(build(prune=True)) == []
    assert names(js.full_chain(temperature=0.7, top_k=40, dry_multiplier=0.8, prune=True)) == [
        "DRY", "DynamicTemperature", "TopK"]
    # per-row values: a stage stays if any row enables it
    assert names(js.vllm_chain(top_p=np.array([1.0, 0.9], np.float32), prune=True)) == ["TopP"]
    assert names(js.vllm_chain(top_p=np.ones(2, np.float32), prune=True)) == []


def test_preset_chain_dispatch_and_errors():
    assert names(js.preset_chain("vllm", temperature=0.5, prune=True)) == ["Temperature"]
    assert set(js.ORDERS) == {"default", "transformers", "vllm", "llamacpp"}
    with pytest.raises(ValueError, match="unknown order 'hf'"):
        js.preset_chain("hf")
    with pytest.raises(ValueError, match=r"vLLM has no dry_multiplier.*order='default'"):
        js.preset_chain("vllm", dry_multiplier=0.8)
    with pytest.raises(ValueError, match="transformers has no presence_penalty"):
        js.preset_chain("transformers", presence_penalty=0.5)
    with pytest.raises(ValueError, match="mirostat mode .* got top_k"):
        js.llamacpp_chain(mirostat_tau=5.0, top_k=40)
    with pytest.raises(ValueError, match="min_new_tokens needs stop_ids"):
        js.full_chain(min_new_tokens=3)
    with pytest.raises(ValueError, match=r"top_p: p must be in \(0, 1\], got 1.5"):
        js.preset_chain("llamacpp", top_p=1.5)


# ----------------------------------------------------------------------------- order matters


def test_temperature_first_or_last_changes_truncations():
    """transformers/vLLM apply temperature before the truncations, llama.cpp after."""
    # top-p 0.9 at T = 0.5 (docs/sampling.md): after temperature {nice, hot}; before it, 4 words
    assert kept(js.transformers_chain(temperature=0.5, top_p=0.9, prune=True)(SEEDS)) == {"nice", "hot"}
    assert kept(js.llamacpp_chain(temperature=0.5, top_p=0.9, prune=True)(SEEDS)) == {"nice", "hot", "cloudy", "gloomy"}
    # min-p 0.2 at T = 2: after temperature the threshold is 0.2 * 0.3047 and all 6 stay;
    # before it (llama.cpp) 0.2 * 0.4556 = 0.091 drops gloomy, wonderful and delicious
    assert len(kept(js.vllm_chain(temperature=2.0, min_p=0.2, prune=True)(SEEDS))) == 6
    assert kept(js.llamacpp_chain(temperature=2.0, min_p=0.2, prune=True)(SEEDS)) == {"nice", "hot", "cloudy"}


def test_min_p_before_top_p_changes_top_p():
    """vLLM runs min-p before top-p, so top-p's mass is over fewer (renormalised) tokens."""
    x = jnp.log(jnp.array([[0.45, 0.25, 0.2, 0.1]]))
    assert int(np.isfinite(js.vllm_chain(min_p=0.3, top_p=0.75, prune=True)(x)).sum()) == 2
    assert int(np.isfinite(js.transformers_chain(min_p=0.3, top_p=0.75, prune=True)(x)).sum()) == 3


# ----------------------------------------------------------------------------- transformers


def test_transformers_chain_equals_transformers_own_processor_list():
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from transformers.generation.utils import GenerationMixin

    values = dict(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05, epsilon_cutoff=3e-3, eta_cutoff=2e-3,
                  repetition_penalty=1.3, min_new_tokens=3)
    config = tf.GenerationConfig(do_sample=True, no_repeat_ngram_size=2, bad_words_ids=[[5], [1, 2]],
                                 eos_token_id=7, **values)
    config._eos_token_tensor = torch.tensor([7])
    host = types.SimpleNamespace(config=types.SimpleNamespace(is_encoder_decoder=False),
                                 _merge_criteria_processor_list=lambda procs, extra: procs)
    try:
        theirs = GenerationMixin._get_logits_processor(host, config, input_ids_seq_length=4, device="cpu")
    except (AttributeError, TypeError) as e:  # a private API: skip if it moved
        pytest.skip(f"transformers' _get_logits_processor changed: {e}")
    ours = js.transformers_chain(no_repeat_ngram=2, bad_words=[[5], [1, 2]], stop_ids=[7], **values)
    assert [type(p).__name__.replace("LogitsProcessor", "").replace("LogitsWarper", "") for p in theirs] == [
        "RepetitionPenalty", "NoRepeatNGram", "NoBadWords", "MinNewTokensLength", "Temperature", "TopK",
        "TopP", "MinP", "Epsilon", "Eta"]

    rng = np.random.default_rng(1)
    vocab, b, prompt = 12, 4, 4
    apply = jax.jit(lambda c, s, x: c.apply(x, s, None))  # one compilation for every case
    for generated in (1, 3, 5):
        ctx = rng.integers(0, vocab, size=(b, prompt + generated))
        ctx[0, -2:] = [1, 2]
        ctx[1, -1] = 1
        scores = rng.normal(0, 2, (b, vocab)).astype(np.float32)
        want = theirs(torch.tensor(ctx), torch.tensor(scores)).numpy()
        state = ours.init(jnp.asarray(ctx[:, :prompt]), jnp.full(b, prompt), vocab, max_new_tokens=5)
        for i in range(prompt, prompt + generated):
            state = ours.update(state, jnp.asarray(ctx[:, i]), jnp.asarray(scores))
        got = np.asarray(apply(ours, state, jnp.asarray(scores)))
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"after {generated} generated tokens")


# ----------------------------------------------------------------------------- CLI


def test_cli_has_a_flag_for_every_method():
    from models import ByteTokenizer

    cli = load_script("generate")
    flags = ("--temperature 0.7 --dynatemp-range 0.2 --top-k 40 --top-p 0.9 --min-p 0.05 --typical-p 0.95 "
             "--epsilon-cutoff 1e-4 --eta-cutoff 1e-4 --top-n-sigma 2 --xtc-probability 0.5 --xtc-threshold 0.2 "
             "--mirostat-tau 5 --repetition-penalty 1.1 --presence-penalty 0.3 --frequency-penalty 0.2 "
             "--penalty-window 64 --no-repeat-ngram 3 --min-new-tokens 4 --allowed-tokens 1,2,3 "
             "--logit-bias 1:0.5,2:-1 --dry-multiplier 0.8 --dry-window 128").split()
    args = cli.build_parser().parse_args(flags + ["--bad-words", "ab|c"])
    c = cli.build_sampler(args, ByteTokenizer())
    assert names(c) == [
        "SparseLogitBias", "AllowTokens", "BadWords", "MinNewTokens", "RepetitionPenalty",
        "PresenceFrequencyPenalty", "NoRepeatNGram", "DRY", "DynamicTemperature", "TopK", "TopP", "MinP",
        "TypicalP", "EpsilonCutoff", "EtaCutoff", "TopNSigma", "XTC", "MirostatV2"]
    procs = {type(p).__name__: p for p in c.processors}
    np.testing.assert_array_equal(procs["BadWords"].sequences, [[97, 98], [99, -1]])
    np.testing.assert_array_equal(procs["DRY"].sequence_breakers, [10, 58, 34, 42])  # \n : " *
    np.testing.assert_array_equal(procs["MinNewTokens"].stop_ids, [ByteTokenizer.eos_id])
    assert procs["RepetitionPenalty"].window == 64 and procs["MirostatV2"].tau == 5.0
    llama = cli.build_sampler(cli.build_parser().parse_args(["--order", "llamacpp", "--top-k", "40"]))
    assert names(llama) == ["TopK", "DynamicTemperature"]
    with pytest.raises(ValueError, match="vLLM has no no_repeat_ngram"):
        cli.build_sampler(cli.build_parser().parse_args(["--order", "vllm", "--no-repeat-ngram", "2"]))
