"""Tokenizers: byte-level UTF-8 (the shipped model's), and Hugging Face `tokenizer.json`.

Both implement the same small interface: `encode(text) -> list[int]`,
`decode(ids) -> str`, `encode_batch(texts) -> (ids [B, P], lengths [B])`,
`decode_batch(ids, lengths) -> list[str]`, the ids `bos_id`, `eos_id`, `pad_id`, and
`eos_ids` (every id that ends a sequence; Llama 3 checkpoints list several).
`HFTokenizer.apply_chat_template` renders the checkpoint's chat template with jinja2.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


class _BatchMixin:
    bos_id: int
    eos_id: int
    pad_id: int

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encodes texts to a right-padded int32 array [B, P] and int32 lengths [B]; `add_bos`
        as `encode` (None: the tokenizer's own rule)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not one string")
        rows = [self.encode(t, add_bos=add_bos) for t in texts]
        if not rows:
            raise ValueError("encode_batch needs at least one text")
        lengths = np.array([len(r) for r in rows], np.int32)
        if lengths.min() == 0:
            raise ValueError("cannot encode an empty prompt without BOS (pass add_bos=True)")
        ids = np.full((len(rows), int(lengths.max())), self.pad_id, np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        return ids, lengths

    def decode_batch(self, ids, lengths=None) -> list[str]:
        """Decodes rows of ids; `lengths` (optional) gives how many ids of each row to use."""
        ids = np.asarray(ids)
        if lengths is None:
            lengths = [ids.shape[1]] * ids.shape[0]
        return [self.decode(ids[i, : int(n)]) for i, n in enumerate(np.asarray(lengths))]


class ByteTokenizer(_BatchMixin):
    """Lossless byte-level UTF-8 tokenizer: ids 0..255 are bytes, then BOS, EOS, PAD.

    Example:
      >>> tok = ByteTokenizer()
      >>> tok.decode(tok.encode("天气 nice"))
      '天气 nice'
    """

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258
    eos_ids = (257,)
    chat_template = None

    def encode(self, text: str, *, add_bos: bool | None = True) -> list[int]:
        """UTF-8 bytes, after a BOS unless `add_bos=False` (None: BOS, this tokenizer's rule)."""
        ids = list(text.encode("utf-8"))
        return ids if add_bos is False else [self.bos_id, *ids]

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id stands for: ids 0..255 are bytes, the specials (BOS, EOS, PAD) None
        (`jaxsample.token_bytes` reads this for constrained decoding)."""
        return [bytes([i]) for i in range(256)] + [None] * (self.vocab_size - 256)

    def decode(self, ids) -> str:
        """Decodes ids, skipping special ids; invalid UTF-8 (a cut multi-byte char) becomes U+FFFD."""
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer(_BatchMixin):
    """Wraps a Hugging Face `tokenizer.json` (needs the optional `tokenizers` package).

    The special ids come from the checkpoint's `config.json` (`bos_token_id`,
    `eos_token_id`, `pad_token_id`), else from `tokenizer_config.json`'s token strings
    (`bos_token`, ...), looked up in the vocabulary. A missing BOS is None (then
    `encode(add_bos=True)` raises); a missing PAD falls back to EOS, as most Llama
    checkpoints do; a missing EOS is an error, since generation needs one to stop on.
    `eos_ids` holds every end-of-sequence id of `generation_config.json` and
    `config.json` (`eos_id` first). `chat_template` is `tokenizer_config.json`'s
    `chat_template` (or the `chat_template.jinja` file), None if the checkpoint has none.
    `add_bos_token` says whether a plain prompt gets a BOS, as transformers'
    `tokenizer(text)` does: `tokenizer_config.json`'s `add_bos_token` when it sets one,
    else whether `tokenizer.json`'s post-processor puts the BOS first (Llama, Mistral and
    Gemma files do, Qwen2's does not), else whenever there is a BOS.

    Args:
      path: a checkpoint directory holding `tokenizer.json`, or the file itself.
    """

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ImportError("loading tokenizer.json needs `pip install tokenizers`") from e
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"HFTokenizer: no tokenizer.json at path={path!r}")
        self._tok = Tokenizer.from_file(file)
        self.vocab_size = self._tok.get_vocab_size()
        folder = os.path.dirname(file)
        config = _read_json(os.path.join(folder, "config.json"))
        token_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        self.bos_id = self._special_id("bos", config, token_config)
        self.eos_id = self._special_id("eos", config, token_config)
        pad = self._special_id("pad", config, token_config)
        if self.eos_id is None:
            raise ValueError(f"HFTokenizer: no EOS id for {file!r}: neither config.json's eos_token_id nor "
                             f"tokenizer_config.json's eos_token names one")
        self.pad_id = self.eos_id if pad is None else pad
        from models.hf import read_generation_defaults  # local import: models.hf needs jax

        self.eos_ids = tuple(dict.fromkeys([self.eos_id, *read_generation_defaults(folder).eos_ids]))
        bad = [i for i in self.eos_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"HFTokenizer: eos_token_id {bad} outside the vocabulary [0, {self.vocab_size})")
        self.chat_template = _chat_template(folder, token_config)
        self.add_bos_token = self._adds_bos(token_config)
        self._special_tokens = {key: (v.get("content") if isinstance(v, dict) else v)
                                for key, v in token_config.items()
                                if key.endswith("_token") and isinstance(v, (str, dict))}

    def _special_id(self, name: str, config: dict, token_config: dict) -> int | None:
        value = config.get(f"{name}_token_id")
        if isinstance(value, list):  # e.g. Llama 3's several EOS ids: the first one
            value = value[0] if value else None
        if value is None:
            token = token_config.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            value = None if token is None else self._tok.token_to_id(token)
        if value is not None and not 0 <= int(value) < self.vocab_size:
            raise ValueError(f"HFTokenizer: {name}_token_id={value} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        return None if value is None else int(value)

    def _adds_bos(self, token_config: dict) -> bool:
        """Whether a plain prompt gets a BOS (see the class docstring)."""
        flag = token_config.get("add_bos_token")
        if isinstance(flag, bool):
            return flag and self.bos_id is not None
        if self.bos_id is None:
            return False
        if self._tok.post_processor is not None:
            probe = self._tok.encode("a", add_special_tokens=True).ids
            return bool(probe) and probe[0] == self.bos_id
        return True

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`: after a BOS if `add_bos` (an error without one), none if
        False; None (default): as the checkpoint's tokenizer does (`add_bos_token`)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos_token
        if not add_bos:
            return ids
        if self.bos_id is None:
            raise ValueError("this tokenizer has no BOS token; pass add_bos=False")
        return [self.bos_id, *ids]

    def decode(self, ids) -> str:
        """Decodes ids, skipping special tokens (BOS, EOS, PAD and the tokenizer's others)."""
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                            **template_vars) -> str:
        """Renders `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat
        template, as transformers' `apply_chat_template(..., tokenize=False)` does (a sandboxed
        jinja2 environment with trim_blocks / lstrip_blocks, `raise_exception`, `strftime_now`,
        a non-escaping `tojson`, and the special token strings such as `bos_token`).

        Encode the result with `encode(text, add_bos=False)`: templates write the BOS
        themselves (Gemma 3's template starts with `bos_token`).

        `template_vars` are the template's own variables, passed as transformers passes
        extra keyword arguments, e.g. Qwen3's `enable_thinking=False`.
        """
        clash = sorted(set(template_vars) & {"messages", "add_generation_prompt", *self._special_tokens})
        if clash:
            raise ValueError(f"apply_chat_template: template variables {clash} are set by the tokenizer itself")
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template (no chat_template in tokenizer_config.json "
                             "and no chat_template.jinja)")
        return _compile_template(self.chat_template).render(
            **{"tools": None, "documents": None, **template_vars}, messages=list(messages),
            add_generation_prompt=add_generation_prompt, **self._special_tokens)


def _chat_template(folder: str, token_config: dict) -> str | None:
    template = token_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    return template


def _compile_template(template: str):
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise ImportError("chat templates need `pip install jinja2` (the hf extra)") from e
    from datetime import datetime

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _read_json(file: str) -> dict:
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        return json.load(f)
