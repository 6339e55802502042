"""One-line loading of the shipped model (or any checkpoint) with its tokenizer."""

from __future__ import annotations

import os

from models.checkpoint import CheckpointError, load_model
from models.decoder import DecoderLM
from models.tokenizer import ByteTokenizer, HFTokenizer

#: The checkpoint that ships with the project (see its README.md model card).
SHIPPED_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "shakespeare")
#: The shipped model's corpus n-gram draft (built by scripts/build_ngram_draft.py from its training works).
SHIPPED_NGRAM_DRAFT = os.path.join(SHIPPED_CHECKPOINT, "ngram_draft.safetensors")


def load_pretrained(path: str | None = None) -> tuple[DecoderLM, ByteTokenizer | HFTokenizer]:
    """Loads a checkpoint directory and its tokenizer.

    Args:
      path: a jaxsample checkpoint (model.safetensors + config.json), or a local Hugging
        Face directory of a family `models.load_hf` reads (config.json + safetensors +
        tokenizer.json). None loads the shipped Shakespeare model.

    Returns:
      (model, tokenizer).

    Example:
      >>> from models import load_pretrained
      >>> lm, tok = load_pretrained()
    """
    path = SHIPPED_CHECKPOINT if path is None else path
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path!r}")
    from models.hf import is_hf_checkpoint, load_hf  # local import: optional path

    if is_hf_checkpoint(path):
        return load_hf(path), HFTokenizer(path)
    return load_model(path), ByteTokenizer()


def load_ngram_draft(path: str | None = None, *, prompt_lookup: int | None = None):
    """Loads a corpus n-gram draft (`jaxsample.NGramDraft`) for speculative decoding.

    Args:
      path: a table written by `NGramDraft.save` (e.g. by scripts/build_ngram_draft.py);
        None loads the shipped Shakespeare model's table: contexts of 1..5 bytes counted
        in its 40 training works and in 256 of its own greedy continuations of training
        text (the held-out works are not in it).
      prompt_lookup: in-context match length that takes precedence over the table; 0: off;
        None: 5. On held-out text the table alone was about as good (1.88x against 1.80x
        plain greedy, docs/benchmarks.md), but text that repeats itself (a degenerate
        loop of blank lines, names, refrains) is where the table guesses wrong and the
        row's own context is right: the README's example accepts 0.5% of the drafted
        tokens without the match and 87% with it.

    Example:
      >>> import jax, jax.numpy as jnp, jaxsample as js
      >>> from models import load_ngram_draft, load_pretrained
      >>> lm, tok = load_pretrained()
      >>> ids, lengths = tok.encode_batch(["ROMEO:"])
      >>> out, stats = js.speculative_generate(lm, ids, lengths, jax.random.split(jax.random.key(0), 1),
      ...                                      max_new_tokens=16, draft=load_ngram_draft(), num_draft_tokens=4)
    """
    from jaxsample import NGramDraft  # local import: models does not need jaxsample otherwise

    return NGramDraft.load(SHIPPED_NGRAM_DRAFT if path is None else path,
                           prompt_lookup=5 if prompt_lookup is None else prompt_lookup)
