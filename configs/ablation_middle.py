"""`--config configs/ablation_middle.py` = `--config ablation_middle`: the shipped negclip_jax/configs/ablation_middle.py."""

from negclip_jax.configs.ablation_middle import get_config  # noqa: F401
