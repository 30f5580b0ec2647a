"""negclip-jax: Omni-NegCLIP (negation-aware CLIP fine-tuning) in JAX/Flax."""

from negclip_jax.model.clip import CLIP, CLIPConfig, get_config, init_params
from negclip_jax.model.convert import load_pretrained, save_pretrained
from negclip_jax.model.tokenizer import ClipTokenizer, tokenize

__all__ = [
  "CLIP",
  "CLIPConfig",
  "ClipTokenizer",
  "get_config",
  "init_params",
  "load_pretrained",
  "save_pretrained",
  "tokenize",
]
