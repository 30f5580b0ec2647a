"""`--config configs/ablation_conclip.py` = `--config ablation_conclip`: the shipped negclip_jax/configs/ablation_conclip.py."""

from negclip_jax.configs.ablation_conclip import get_config  # noqa: F401
