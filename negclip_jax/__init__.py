"""negclip-jax: Omni-NegCLIP (negation-aware CLIP fine-tuning) in JAX/Flax."""

from negclip_jax.convert import load_pretrained, save_pretrained
from negclip_jax.model import CLIP, CLIPConfig, get_config, init_params
from negclip_jax.tokenizer import ClipTokenizer, tokenize

__all__ = ["CLIP", "CLIPConfig", "ClipTokenizer", "get_config", "init_params", "load_pretrained",
           "save_pretrained", "tokenize"]
