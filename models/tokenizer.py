"""Tokenizers: byte-level UTF-8 (the shipped model's), and Hugging Face `tokenizer.json`.

Both implement the same small interface: `encode(text) -> list[int]`,
`decode(ids) -> str`, `encode_batch(texts) -> (ids [B, P], lengths [B])`,
`decode_batch(ids, lengths) -> list[str]`, and the ids `bos_id`, `eos_id`, `pad_id`.
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

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Encodes texts to a right-padded int32 array [B, P] and int32 lengths [B]."""
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

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

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

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if not add_bos:
            return ids
        if self.bos_id is None:
            raise ValueError("this tokenizer has no BOS token; pass add_bos=False")
        return [self.bos_id, *ids]

    def decode(self, ids) -> str:
        """Decodes ids, skipping special tokens (BOS, EOS, PAD and the tokenizer's others)."""
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)


def _read_json(file: str) -> dict:
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        return json.load(f)
