"""Alias of the shipped config `ablation_back` (negclip_jax/configs/)."""

from negclip_jax.configs.ablation_back import get_config  # noqa: F401
