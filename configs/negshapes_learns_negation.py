"""Alias of the shipped config `negshapes_learns_negation` (negclip_jax/configs/)."""

from negclip_jax.configs.negshapes_learns_negation import get_config  # noqa: F401
