"""Load a local Hugging Face Llama or Mistral checkpoint (the first loader; kept for
compatibility). `models.hf.load_hf` reads these and the other supported families.

    >>> from models.llama import load_llama
    >>> lm = load_llama("path/to/TinyLlama")        # config.json + *.safetensors
"""

from __future__ import annotations

from models.decoder import DecoderLM
from models.hf import config_from_hf, load_hf, read_hf_config

__all__ = ["config_from_hf", "is_llama_checkpoint", "load_llama"]

LLAMA_MODEL_TYPES = ("llama", "mistral")


def is_llama_checkpoint(directory: str) -> bool:
    """True if `directory`'s config.json is a Hugging Face Llama or Mistral checkpoint."""
    try:
        return read_hf_config(directory).get("model_type") in LLAMA_MODEL_TYPES
    except (OSError, ValueError):
        return False


def load_llama(directory: str, dtype: str | None = None) -> DecoderLM:
    """`load_hf` restricted to LlamaForCausalLM / MistralForCausalLM checkpoints.

    Raises:
      ValueError: another architecture (use `models.load_hf`), or anything `load_hf` refuses.
    """
    model_type = read_hf_config(directory).get("model_type", "llama")
    if model_type not in LLAMA_MODEL_TYPES:
        raise ValueError(f"load_llama: unsupported model_type={model_type!r}: expected one of "
                         f"{list(LLAMA_MODEL_TYPES)} (models.load_hf reads the other families)")
    return load_hf(directory, dtype)
