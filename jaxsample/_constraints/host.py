"""A JSON-schema constraint whose token mask is computed on the host by llguidance, per step.

For schemas that are valid but not regular (recursive ``$ref``) or whose automaton would
exceed the device limits, :func:`jaxsample.JSONSchema` returns a :class:`HostJSONSchema`
(when llguidance is installed: ``pip install 'jaxsample[structured]'``). It is a stateful
processor like :class:`~jaxsample.Constraint`: its state is one host matcher slot per row
(``int32[B]``); ``apply`` asks the host for the rows' masks and ``update`` hands it the
drawn tokens, both through ``jax.experimental.io_callback`` inside the decode loop, so
each step costs a device -> host -> device round trip plus llguidance's mask time
(docs/structured.md has the measured cost). Regular schemas stay on device.
"""

from __future__ import annotations

import itertools
import json
import threading
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxsample._processors.base import LogitsProcessor, _set, processor_dataclass, static_field

Array = jax.Array
MAX_SLOTS = 1 << 16  # live host matchers; the oldest are dropped past this

_LOCK = threading.Lock()
_GRAMMARS: dict[int, tuple[Any, str, int, int]] = {}  # handle -> (LLTokenizer, grammar, eos, words)
_SLOTS: dict[int, tuple[int, Any]] = {}  # slot -> (handle, LLMatcher)
_NEXT = itertools.count(1)
_TOKENIZERS: dict[int, Any] = {}


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise ImportError("the host engine needs llguidance: pip install 'jaxsample[structured]'") from e
    return llguidance


def available() -> bool:
    """Whether llguidance can be imported (the host engine is usable)."""
    try:
        _llguidance()
    except ImportError:
        return False
    return True


def _lltokenizer(tokenizer: Any, pieces: list):
    key = id(tokenizer)
    got = _TOKENIZERS.get(key)
    if got is not None and got[0] is tokenizer:
        return got[1]
    llg = _llguidance()
    size = int(getattr(tokenizer, "vocab_size", len(pieces)))
    eos = int(tokenizer.eos_id)
    names = [(p if p is not None else f"<|special_{i}|>".encode()) for i, p in enumerate(pieces[:size])]
    names += [f"<|special_{i}|>".encode() for i in range(len(names), size)]
    special = [i for i in range(size) if i >= len(pieces) or pieces[i] is None]
    by_bytes = {p: i for i, p in enumerate(pieces[:size]) if p and i != eos}
    longest = max((len(p) for p in by_bytes), default=1)

    def encode(s):  # greedy longest match (only used by llguidance for canonical checks)
        b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
        out, i = [], 0
        while i < len(b):
            for j in range(min(len(b), i + longest), i, -1):
                t = by_bytes.get(b[i:j])
                if t is not None:
                    out.append(t)
                    i = j
                    break
            else:
                i += 1
        return out

    class Wrap:
        eos_token_id = eos
        bos_token_id = None
        tokens = names
        special_token_ids = special
        is_tokenizer_wrapper = True

        def __call__(self, s):
            return encode(s)

    lltok = llg.LLTokenizer(Wrap(), n_vocab=size, eos_token=eos)
    _TOKENIZERS[key] = (tokenizer, lltok)
    return lltok


def _new_slots(handle: np.ndarray, b: int) -> np.ndarray:
    llg = _llguidance()
    lltok, grammar, _, _ = _GRAMMARS[int(handle)]
    out = np.empty((b,), np.int32)
    with _LOCK:
        for i in range(b):
            slot = next(_NEXT) % (1 << 30)
            _SLOTS[slot] = (int(handle), llg.LLMatcher(lltok, grammar))
            out[i] = slot
        while len(_SLOTS) > MAX_SLOTS:
            _SLOTS.pop(next(iter(_SLOTS)))
    return out


def _masks(handle: np.ndarray, slots: np.ndarray) -> np.ndarray:
    from llguidance.numpy import fill_next_token_bitmask
    _, _, eos, words = _GRAMMARS[int(handle)]
    out = np.zeros((slots.shape[0], words), np.int32)
    for i, slot in enumerate(slots.tolist()):
        got = _SLOTS.get(slot)
        if got is None:
            continue  # an unknown slot: nothing allowed (the row finishes with NO_VALID_TOKEN)
        m = got[1]
        if m.is_error():
            continue
        if m.is_stopped():
            out[i, eos >> 5] = np.int32(np.uint32(1 << (eos & 31)).view(np.int32))
            continue
        fill_next_token_bitmask(m, out, i)
    return out.view(np.uint32)


def _consume(slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    for slot, t in zip(slots.tolist(), tokens.tolist()):
        got = _SLOTS.get(slot)
        if got is None:
            continue
        m = got[1]
        if not m.is_stopped() and not m.is_error():
            m.consume_token(int(t))
    return slots


def _bits(words: Array, v: int) -> Array:
    """uint32 [B, W] -> bool [B, v] (bit j of word i is token 32 i + j; beyond 32 W: False)."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = ((words[..., None] >> shifts) & 1).astype(bool).reshape(*words.shape[:-1], -1)
    n = bits.shape[-1]
    return bits[..., :v] if v <= n else jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, v - n)])


@processor_dataclass
class HostJSONSchema(LogitsProcessor):
    """A JSON schema enforced by llguidance on the host, one mask per step (see the module docstring).

    Build it through :func:`jaxsample.JSONSchema` (``host="always"`` forces it; ``pieces``
    is :func:`jaxsample.token_bytes` of the tokenizer). Rows
    whose state is ``-1`` are unconstrained.

    Attributes:
      handle: ``int32`` the host grammar's id.
      vocab_size: static, the tokenizer's vocabulary size.
    """

    stateful: ClassVar[bool] = True

    handle: Any
    vocab_size: int = static_field(default=0)
    words: int = static_field(default=0)

    def __init__(self, schema: Any, tokenizer: Any, pieces: list, *, whitespace: str = r"[ ]?"):
        llg = _llguidance()
        lltok = _lltokenizer(tokenizer, pieces)
        text = schema if isinstance(schema, str) else json.dumps(schema)
        opts = {"whitespace_pattern": whitespace} if whitespace else {"whitespace_flexible": False}
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults=opts)
        except Exception:  # noqa: BLE001 - older llguidance: no whitespace option
            grammar = llg.LLMatcher.grammar_from_json_schema(text)
        probe = llg.LLMatcher(lltok, grammar)
        if probe.is_error():
            raise ValueError(f"JSONSchema: the host engine (llguidance) refuses the schema: {probe.get_error()}")
        size = int(getattr(tokenizer, "vocab_size", lltok.vocab_size))
        handle = next(_NEXT) % (1 << 30)
        _GRAMMARS[handle] = (lltok, grammar, int(tokenizer.eos_id), max(1, -(-size // 32)))
        _set(self, "handle", jnp.asarray(handle, jnp.int32))
        _set(self, "vocab_size", size)
        _set(self, "words", max(1, -(-size // 32)))

    def accepts(self, token_ids, row: int = 0) -> bool:
        """Whether ``token_ids`` then end-of-sequence is a complete output (llguidance on the host)."""
        del row
        llg = _llguidance()
        lltok, grammar, eos, _ = _GRAMMARS[int(self.handle)]
        m = llg.LLMatcher(lltok, grammar)
        ids = [int(t) for t in token_ids]
        return m.try_consume_tokens(ids) == len(ids) and not m.is_error() and m.consume_token(eos) \
            and not m.is_error()

    def init(self, prompt_tokens, prompt_lengths, vocab_size, *, max_new_tokens=None) -> Array:
        """Fresh host matchers, one per row: their slot ids, ``int32[B]``."""
        del prompt_lengths, max_new_tokens
        if prompt_tokens is None:
            raise ValueError("HostJSONSchema.init: pass the prompts (int [B, P])")
        if vocab_size is not None and vocab_size < self.vocab_size:
            raise ValueError(f"HostJSONSchema: the model's vocabulary ({vocab_size}) is smaller than the "
                             f"tokenizer's ({self.vocab_size})")
        b = jnp.shape(prompt_tokens)[0]
        return io_callback(lambda h: _new_slots(h, b), jax.ShapeDtypeStruct((b,), jnp.int32), self.handle)

    def apply(self, logits: Array, state: Array, key: Array | None) -> Array:
        del key
        b = logits.shape[0]
        words = io_callback(_masks, jax.ShapeDtypeStruct((b, self.words), jnp.uint32), self.handle, state)
        keep = _bits(words, logits.shape[-1]) | (state < 0)[:, None]
        return jnp.where(keep, logits, jnp.asarray(-jnp.inf, logits.dtype))

    def update(self, state: Array, token: Array, processed_logits: Array) -> Array:
        del processed_logits
        return io_callback(_consume, jax.ShapeDtypeStruct(state.shape, jnp.int32), state, token.astype(jnp.int32))
