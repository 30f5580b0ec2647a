"""`--config configs/omni_negclip_vitb32.py` = `--config omni_negclip_vitb32`: the shipped negclip_jax/configs/omni_negclip_vitb32.py."""

from negclip_jax.configs.omni_negclip_vitb32 import get_config  # noqa: F401
