"""Alias of the shipped config `ablation_conclip` (negclip_jax/configs/)."""

from negclip_jax.configs.ablation_conclip import get_config  # noqa: F401
