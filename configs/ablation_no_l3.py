"""`--config configs/ablation_no_l3.py` = `--config ablation_no_l3`: the shipped negclip_jax/configs/ablation_no_l3.py."""

from negclip_jax.configs.ablation_no_l3 import get_config  # noqa: F401
