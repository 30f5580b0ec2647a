"""`--config configs/plain_finetune.py` = `--config plain_finetune`: the shipped negclip_jax/configs/plain_finetune.py."""

from negclip_jax.configs.plain_finetune import get_config  # noqa: F401
