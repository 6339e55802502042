"""The bytes of a tokenizer's tokens, and the packed token masks: what the on-device
constraints (:mod:`.structured`) and the host engine (:mod:`.host`) both read."""

from __future__ import annotations

import json
from typing import Any

import jax.numpy as jnp
from jax import Array

def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode map, inverted (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _hf_token_bytes(tok: Any) -> list[bytes | None]:
    """Bytes of every id of a ``tokenizers.Tokenizer`` (None for special tokens).

    Supports byte-level BPE (a ``ByteLevel`` decoder: GPT-2, Llama 3, Qwen, ...) and
    SentencePiece-style vocabularies (``▁`` for space, ``<0xNN>`` byte fallback: Llama 2,
    Mistral). Other decoders (WordPiece, ...) are refused.
    """
    spec = json.loads(tok.to_str())
    decoder = spec.get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["id"]: t["content"] for t in spec.get("added_tokens", []) if not t.get("special")}
    vocab = tok.get_vocab(with_added_tokens=True)
    out: list[bytes | None] = [None] * tok.get_vocab_size()
    if "ByteLevel" in kinds:
        table = _byte_level_decoder()

        def to_bytes(s: str) -> bytes | None:
            try:
                return bytes(table[c] for c in s)
            except KeyError:  # not in the byte alphabet: a plain-text added token
                return s.encode("utf-8")
    elif kinds & {"ByteFallback", "Metaspace", "Replace"}:
        def to_bytes(s: str) -> bytes | None:
            if len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                return bytes([int(s[3:5], 16)])
            return s.replace("\u2581", " ").encode("utf-8")
    else:
        raise ValueError(f"token_bytes: unsupported tokenizer decoder {sorted(k for k in kinds if k)}; "
                         f"byte-level BPE and SentencePiece-style vocabularies are supported")
    for text, i in vocab.items():
        if i in special or not 0 <= i < len(out):
            continue
        out[i] = added[i].encode("utf-8") if i in added else to_bytes(text)
    return out


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id stands for (``None``: a special token, never generated as text).

    Accepts ``models.ByteTokenizer`` (ids 0..255 are bytes), ``models.HFTokenizer``, a
    ``tokenizers.Tokenizer``, or any object with a ``token_bytes()`` method returning such
    a list.

    Example:
      >>> from models import ByteTokenizer
      >>> token_bytes(ByteTokenizer())[65], token_bytes(ByteTokenizer())[257]
      (b'A', None)
    """
    if callable(getattr(tokenizer, "token_bytes", None)):  # models.ByteTokenizer has one
        return list(tokenizer.token_bytes())
    inner = getattr(tokenizer, "_tok", tokenizer)  # models.HFTokenizer wraps a tokenizers.Tokenizer
    if hasattr(inner, "to_str") and hasattr(inner, "get_vocab"):
        return _hf_token_bytes(inner)
    raise TypeError(f"token_bytes: unsupported tokenizer {type(tokenizer).__name__}; pass a ByteTokenizer, "
                    f"an HFTokenizer, a tokenizers.Tokenizer, or an object with token_bytes()")



def _bits(words: Array, v: int) -> Array:
    """uint32 [B, W] -> bool [B, v] (bit j of word i is token 32 i + j; beyond 32 W: False)."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = ((words[..., None] >> shifts) & 1).astype(bool).reshape(*words.shape[:-1], -1)  # [B, 32 W]
    n = bits.shape[-1]
    return bits[..., :v] if v <= n else jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, v - n)])
