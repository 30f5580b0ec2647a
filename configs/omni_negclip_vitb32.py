"""Alias of the shipped config `omni_negclip_vitb32` (negclip_jax/configs/)."""

from negclip_jax.configs.omni_negclip_vitb32 import get_config  # noqa: F401
