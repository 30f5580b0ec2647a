"""Ablation: train the whole text blocks instead of the front ones."""

from negclip_jax.configs import omni_negclip_vitb32


def get_config():
  c = omni_negclip_vitb32.get_config()
  c.layers = "whole"
  return c
