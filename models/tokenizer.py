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
    """Wraps a Hugging Face `tokenizer.json` (needs the optional `tokenizers` package)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ImportError("loading tokenizer.json needs `pip install tokenizers`") from e
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        self._tok = Tokenizer.from_file(file)
        self.vocab_size = self._tok.get_vocab_size()
        config = {}
        config_file = os.path.join(os.path.dirname(file), "config.json")
        if os.path.exists(config_file):
            with open(config_file) as f:
                config = json.load(f)
        self.bos_id = config.get("bos_token_id", 1)
        eos = config.get("eos_token_id", 2)
        self.eos_id = eos[0] if isinstance(eos, list) else eos
        pad = config.get("pad_token_id")
        self.pad_id = self.eos_id if pad is None else pad

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)
