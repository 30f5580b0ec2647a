"""`--config configs/ablation_whole.py` = `--config ablation_whole`: the shipped negclip_jax/configs/ablation_whole.py."""

from negclip_jax.configs.ablation_whole import get_config  # noqa: F401
