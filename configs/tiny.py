"""Alias of the shipped config `tiny` (negclip_jax/configs/)."""

from negclip_jax.configs.tiny import get_config  # noqa: F401
