"""`--config configs/tiny.py` = `--config tiny`: the shipped negclip_jax/configs/tiny.py."""

from negclip_jax.configs.tiny import get_config  # noqa: F401
