"""Old module path, kept for one release: which parameters train is `negclip_jax.train.param_groups`,
the schedules and AdamW are `negclip_jax.train.optim`."""

from negclip_jax.train.optim import (  # noqa: F401
  SCHEDULES,
  AdamWState,
  learning_rate_schedule,
  make_optimizer,
  masked_adamw,
  original_cosine_lr,
  torch_adamw,
)
from negclip_jax.train.param_groups import (  # noqa: F401
  ALWAYS_TRAINABLE,
  FROZEN,
  LAYER_PRESETS,
  NEVER_TRAINABLE,
  TRAINABLE,
  label_params,
  merge,
  parse_layers,
  split,
  summary,
  text_layers,
)
