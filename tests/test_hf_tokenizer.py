"""HFTokenizer: a locally trained byte-level BPE `tokenizer.json` round-trips text, and the
special ids come from config.json, else tokenizer_config.json, with clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models import HFTokenizer

tokenizers = pytest.importorskip("tokenizers")

from helpers import BPE_TEXTS as TEXTS, checkpoint_dir  # noqa: E402


def test_round_trip_and_ids_match_the_tokenizers_library(tmp_path, tokenizer_file):
    from tokenizers import Tokenizer

    tok = HFTokenizer(checkpoint_dir(tmp_path, tokenizer_file, config=dict(bos_token_id=1, eos_token_id=2)))
    reference = Tokenizer.from_file(str(tokenizer_file))
    assert tok.vocab_size == reference.get_vocab_size()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # no pad id: EOS
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == [1, *reference.encode(text, add_special_tokens=False).ids]
        assert tok.decode(ids + [2]) == text  # specials skipped
    ids, lengths = tok.encode_batch(TEXTS)
    assert ids.dtype == np.int32 and ids.shape == (3, int(lengths.max()))
    assert (ids[2, lengths[2]:] == tok.pad_id).all()
    assert tok.decode_batch(ids, lengths) == TEXTS


@pytest.mark.parametrize("tokenizer_config", [
    dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>"),
    dict(bos_token=dict(content="<s>"), eos_token=dict(content="</s>"), pad_token=dict(content="<pad>")),
])
def test_special_ids_from_tokenizer_config_strings(tmp_path, tokenizer_file, tokenizer_config):
    tok = HFTokenizer(checkpoint_dir(tmp_path, tokenizer_file, tokenizer_config=tokenizer_config))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)


def test_config_json_wins_and_a_list_of_eos_ids_takes_the_first(tmp_path, tokenizer_file):
    tok = HFTokenizer(checkpoint_dir(tmp_path, tokenizer_file,
                                     config=dict(bos_token_id=0, eos_token_id=[3, 2], pad_token_id=1),
                                     tokenizer_config=dict(bos_token="<s>", eos_token="</s>")))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 3, 1)


def test_tokenizer_file_path_directly_and_no_bos(tmp_path, tokenizer_file):
    folder = checkpoint_dir(tmp_path, tokenizer_file, tokenizer_config=dict(eos_token="</s>"))
    tok = HFTokenizer(folder + "/tokenizer.json")
    assert tok.bos_id is None and tok.eos_id == 2
    plain = tok._tok.encode("ab", add_special_tokens=False).ids
    assert tok.encode("ab", add_bos=False) == tok.encode("ab") == plain  # no BOS to add
    assert not tok.add_bos_token
    with pytest.raises(ValueError, match="no BOS token; pass add_bos=False"):
        tok.encode("ab", add_bos=True)


@pytest.mark.parametrize("post_processor, tokenizer_config, adds_bos", [
    ("bos_template", {}, True),        # Llama / Mistral / Gemma files: "<s> $A"
    ("byte_level", {}, False),         # Qwen2's file: a ByteLevel post-processor, no BOS
    ("bos_template", dict(add_bos_token=False), False),  # the config's flag wins
    ("byte_level", dict(add_bos_token=True), True),
    (None, {}, True),                  # no post-processor: a BOS whenever there is one
])
def test_plain_prompts_get_a_bos_as_transformers_does(tmp_path, tokenizer_file, post_processor,
                                                       tokenizer_config, adds_bos):
    """`encode` / `encode_batch` add the BOS exactly where transformers' `tokenizer(text)`
    does: the backend post-processor's output (what `PreTrainedTokenizerFast` returns),
    unless tokenizer_config.json sets `add_bos_token` (as Llama's tokenizer class honours)."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(tokenizer_file))
    if post_processor == "bos_template":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    elif post_processor == "byte_level":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    (tmp_path / "config.json").write_text(json.dumps(dict(bos_token_id=1, eos_token_id=2)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    ours = HFTokenizer(str(tmp_path))
    assert ours.add_bos_token is adds_bos
    plain = tok.encode(TEXTS[0], add_special_tokens=False).ids
    assert ours.encode(TEXTS[0]) == ([1] if adds_bos else []) + plain
    if not tokenizer_config:  # the backend's own rule: what transformers' fast tokenizer returns
        assert ours.encode(TEXTS[0]) == tok.encode(TEXTS[0], add_special_tokens=True).ids \
            or post_processor is None
    ids, lengths = ours.encode_batch(TEXTS[:1])
    assert list(ids[0, :lengths[0]]) == ours.encode(TEXTS[0])
    assert ours.encode(TEXTS[0], add_bos=True)[0] == 1 and ours.encode(TEXTS[0], add_bos=False) == plain


@pytest.mark.parametrize("config, tokenizer_config, match", [
    (None, None, "no EOS id"),
    (dict(eos_token_id=100000), None, r"eos_token_id=100000 is outside the vocabulary"),
    (dict(eos_token_id=2, bos_token_id=-1), None, r"bos_token_id=-1 is outside the vocabulary"),
])
def test_bad_special_ids_are_clear_errors(tmp_path, tokenizer_file, config, tokenizer_config, match):
    with pytest.raises(ValueError, match=match):
        HFTokenizer(checkpoint_dir(tmp_path, tokenizer_file, config, tokenizer_config))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json at path="):
        HFTokenizer(str(tmp_path))


# ------------------------------------------------- issue 22: Qwen3 and Gemma 3 conventions

# The generation-prompt part of Qwen3's template: enable_thinking=False pre-fills an empty
# think block (transformers passes extra apply_chat_template kwargs to the template).
QWEN3_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
# Gemma 3's shape: the template writes the BOS, a plain prompt gets one from the tokenizer.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- for m in messages %}{{ '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role)"
    " + '\\n' + m.content | trim + '<end_of_turn>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}")


def _fast(tokenizer_file, tmp_path, template, bos, add_bos, post_bos):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(tokenizer_file))
    if post_bos:  # Gemma's tokenizer.json: a TemplateProcessing post-processor that adds <s>
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>", chat_template=template,
                                                add_bos_token=add_bos, clean_up_tokenization_spaces=False)
    fast.save_pretrained(tmp_path)
    return fast, HFTokenizer(str(tmp_path))


@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen3_template_enable_thinking_matches_transformers(tmp_path, tokenizer_file, thinking):
    fast, tok = _fast(tokenizer_file, tmp_path, QWEN3_TEMPLATE, "<s>", False, False)
    messages = [{"role": "user", "content": "To be, or not to be?"}]
    extra = {} if thinking is None else {"enable_thinking": thinking}
    ours = tok.apply_chat_template(messages, **extra)
    assert ours == fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    assert ours.endswith("<think>\n\n</think>\n\n") == (thinking is False)
    assert tok.encode("To be", add_bos=None) == fast("To be")["input_ids"]  # no BOS: Qwen3's rule
    with pytest.raises(ValueError, match="template variables \\['eos_token'\\]"):
        tok.apply_chat_template(messages, eos_token="x")


def test_gemma3_bos_rule_matches_transformers(tmp_path, tokenizer_file):
    """Plain prompts get the BOS (add_bos_token + the post-processor); the chat template writes its
    own BOS, so the rendered chat is encoded without another: one BOS, as transformers gives."""
    fast, tok = _fast(tokenizer_file, tmp_path, GEMMA3_TEMPLATE, "<s>", True, True)
    assert tok.add_bos_token and tok.encode("To be") == fast("To be")["input_ids"]
    assert tok.encode("To be")[0] == tok.bos_id
    messages = [{"role": "user", "content": " To be? "}]
    chat = tok.apply_chat_template(messages)
    assert chat == fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(chat, add_bos=False)
    assert ids == fast.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
