"""Alias of the shipped config `ablation_middle` (negclip_jax/configs/)."""

from negclip_jax.configs.ablation_middle import get_config  # noqa: F401
