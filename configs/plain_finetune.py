"""Alias of the shipped config `plain_finetune` (negclip_jax/configs/)."""

from negclip_jax.configs.plain_finetune import get_config  # noqa: F401
