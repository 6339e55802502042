"""One-line loading of the shipped model (or any checkpoint) with its tokenizer."""

from __future__ import annotations

import os

from models.checkpoint import CheckpointError, load_model
from models.decoder import DecoderLM
from models.tokenizer import ByteTokenizer, HFTokenizer

#: The checkpoint that ships with the project (see its README.md model card).
SHIPPED_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "shakespeare")


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
