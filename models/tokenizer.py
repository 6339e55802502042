"""Tokenizers: byte-level UTF-8 (the shipped model's), and Hugging Face `tokenizer.json`.

Both implement the same small interface: `encode(text) -> list[int]`,
`decode(ids) -> str`, `encode_batch(texts) -> (ids [B, P], lengths [B])`,
`decode_batch(ids, lengths) -> list[str]`, the ids `bos_id`, `eos_id`, `pad_id`, and
`eos_ids` (every id that ends a sequence; Llama 3 checkpoints list several).
`HFTokenizer.apply_chat_template` renders the checkpoint's chat template with jinja2.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

#: The longest text a chat template may render (characters; `apply_chat_template`'s
#: `max_chars`, the CLI's --max-chat-chars). A template is code from the checkpoint:
#: ``{{ 'x' * 10**9 }}`` took 7.4 GB before the tokenizer aborted (docs/limits.md).
MAX_CHAT_CHARS = 4_000_000


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
        try:
            self._tok = Tokenizer.from_file(file)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for any bad file
            raise ValueError(f"HFTokenizer: {file!r} is not a tokenizer.json the tokenizers library can read "
                             f"(garbage, or a model type it does not know): {e}") from None
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

        check_generation_config(folder)
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
                            max_chars: int = MAX_CHAT_CHARS, **template_vars) -> str:
        """Renders `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat
        template, as transformers' `apply_chat_template(..., tokenize=False)` does (a sandboxed
        jinja2 environment with trim_blocks / lstrip_blocks, `raise_exception`, `strftime_now`,
        a non-escaping `tojson`, and the special token strings such as `bos_token`).

        Encode the result with `encode(text, add_bos=False)`: templates write the BOS
        themselves (Gemma 3's template starts with `bos_token`).

        `template_vars` are the template's own variables, passed as transformers passes
        extra keyword arguments, e.g. Qwen3's `enable_thinking=False`.

        The rendered text is bounded while it is produced: more than `max_chars`
        characters (default `MAX_CHAT_CHARS`, docs/limits.md), or a ``*``, ``+`` or
        ``**`` inside the template whose result would exceed it, raises ValueError before
        the text is built; so does a template rendering nothing (no prompt to generate
        from).
        """
        clash = sorted(set(template_vars) & {"messages", "add_generation_prompt", *self._special_tokens})
        if clash:
            raise ValueError(f"apply_chat_template: template variables {clash} are set by the tokenizer itself")
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template (no chat_template in tokenizer_config.json "
                             "and no chat_template.jinja)")
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
            raise ValueError(f"max_chars must be an int >= 1, got {max_chars!r}")
        template = _compile_template(self.chat_template, max_chars)
        pieces, total = [], 0
        for piece in template.generate(**{"tools": None, "documents": None, **template_vars},
                                       messages=list(messages), add_generation_prompt=add_generation_prompt,
                                       **self._special_tokens):
            total += len(piece)
            if total > max_chars:
                raise ValueError(f"the chat template rendered more than max_chars={max_chars} characters "
                                 f"(raise it with max_chars=, --max-chat-chars in scripts/generate.py)")
            pieces.append(piece)
        text = "".join(pieces)
        if not text:
            raise ValueError("the chat template rendered an empty prompt (nothing to generate from)")
        return text


def _chat_template(folder: str, token_config: dict) -> str | None:
    template = token_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    return template


def _compile_template(template: str, max_chars: int = MAX_CHAT_CHARS):
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise ImportError("chat templates need `pip install jinja2` (the hf extra)") from e
    from datetime import datetime

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """Refuses a `*`, `+` or `**` whose result would exceed the render bound, before computing it."""

        intercepted_binops = frozenset(["*", "+", "**"])

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right, max_chars)
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _check_binop(operator: str, left, right, max_chars: int) -> None:
    """A template's sequence repetition / concatenation or power that would be too large."""
    def size(x):
        return len(x) if isinstance(x, (str, bytes, list, tuple)) else None

    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if size(seq) is not None and isinstance(times, int) and size(seq) * max(times, 0) > max_chars:
                raise ValueError(f"the chat template repeats a sequence of {size(seq)} items {times} times, more "
                                 f"than max_chars={max_chars} (--max-chat-chars)")
    elif operator == "+":
        if size(left) is not None and size(right) is not None and size(left) + size(right) > max_chars:
            raise ValueError(f"the chat template builds a sequence longer than max_chars={max_chars} "
                             f"(--max-chat-chars)")
    elif isinstance(left, int) and isinstance(right, int) and not isinstance(left, bool) and right > 0 \
            and abs(left) > 1 and right * math.log2(abs(left)) > 4096:
        raise ValueError(f"the chat template computes {left} ** {right}, a number of more than 4096 bits")


def _read_json(file: str) -> dict:
    """A JSON object file, {} if missing; a ValueError naming the file if it is not one."""
    if not os.path.exists(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            blob = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: malformed JSON ({e})") from None
    if not isinstance(blob, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(blob).__name__}")
    return blob


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_generation_config(directory: str) -> None:
    """Checks the sampling fields of `directory/generation_config.json` (if any), raising a
    ValueError naming the field, the value and the file: temperature a number >= 0, top_p
    a number in (0, 1], top_k an int >= 0, do_sample a bool."""
    file = os.path.join(directory, "generation_config.json")
    gen = _read_json(file)
    checks = {
        "temperature": (lambda v: _number(v) and v >= 0, "a number >= 0"),
        "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "top_k": (lambda v: _number(v) and v >= 0 and float(v).is_integer(), "an integer >= 0"),
        "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    }
    for field, (ok, what) in checks.items():
        value = gen.get(field)
        if value is not None and not ok(value):
            raise ValueError(f"{file}: {field}={value!r} must be {what}")
