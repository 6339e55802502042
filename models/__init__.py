"""Models for jaxsample: a small Flax decoder, its tokenizer and checkpoints."""
from models.config import DecoderConfig, PRESETS, RopeScaling, preset
from models.decoder import Decoder, DecoderLM, KVCache, init_cache, init_params
from models.checkpoint import CheckpointError, load_model, save_model
from models.pretrained import SHIPPED_CHECKPOINT, SHIPPED_NGRAM_DRAFT, load_ngram_draft, load_pretrained
from models.tokenizer import MAX_CHAT_CHARS, ByteTokenizer, HFTokenizer, check_generation_config
from models.hf import GenerationDefaults, is_hf_checkpoint, load_hf, read_generation_defaults
from models.llama import is_llama_checkpoint, load_llama
