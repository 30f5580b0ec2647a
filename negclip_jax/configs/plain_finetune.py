"""Baseline: plain CLIP fine-tuning on the true captions of both datasets (no negation terms)."""

from negclip_jax.configs import omni_negclip_vitb32


def get_config():
  c = omni_negclip_vitb32.get_config()
  c.objective = "plain_clip"
  return c
