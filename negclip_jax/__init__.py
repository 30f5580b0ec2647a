"""negclip-jax: Omni-NegCLIP (negation-aware CLIP fine-tuning) in JAX/Flax.

The names below are imported on first use, so that importing a light module (e.g.
`negclip_jax.model.preprocess` in an image-decoding process) does not import JAX.
"""

import importlib

_EXPORTS = {
  "CLIP": "negclip_jax.model.clip",
  "CLIPConfig": "negclip_jax.model.clip",
  "get_config": "negclip_jax.model.clip",
  "init_params": "negclip_jax.model.clip",
  "load_pretrained": "negclip_jax.model.convert",
  "save_pretrained": "negclip_jax.model.convert",
  "ClipTokenizer": "negclip_jax.model.tokenizer",
  "tokenize": "negclip_jax.model.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'negclip_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
  return sorted(list(globals()) + __all__)
