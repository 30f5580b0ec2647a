"""`--config configs/demo.py` = `--config demo`: the shipped negclip_jax/configs/demo.py."""

from negclip_jax.configs.demo import get_config  # noqa: F401
