"""Ablation: presence loss without the 2-way caption-vs-negation term L3."""

from negclip_jax.configs import omni_negclip_vitb32


def get_config():
  c = omni_negclip_vitb32.get_config()
  c.objective = "presence_no_l3"
  return c
