"""`--config configs/ablation_back.py` = `--config ablation_back`: the shipped negclip_jax/configs/ablation_back.py."""

from negclip_jax.configs.ablation_back import get_config  # noqa: F401
