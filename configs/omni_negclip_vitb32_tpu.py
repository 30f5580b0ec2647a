"""Alias of the shipped config `omni_negclip_vitb32_tpu` (negclip_jax/configs/)."""

from negclip_jax.configs.omni_negclip_vitb32_tpu import get_config  # noqa: F401
