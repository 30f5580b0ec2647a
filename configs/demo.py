"""Alias of the shipped config `demo` (negclip_jax/configs/)."""

from negclip_jax.configs.demo import get_config  # noqa: F401
