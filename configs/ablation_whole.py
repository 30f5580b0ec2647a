"""Alias of the shipped config `ablation_whole` (negclip_jax/configs/)."""

from negclip_jax.configs.ablation_whole import get_config  # noqa: F401
