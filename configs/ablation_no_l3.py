"""Alias of the shipped config `ablation_no_l3` (negclip_jax/configs/)."""

from negclip_jax.configs.ablation_no_l3 import get_config  # noqa: F401
