"""Test config: the tiny preset on a little NegShapes data; seconds per run."""

import ml_collections

from negclip_jax.configs import demo


def get_config():
  c = demo.get_config()
  c.model = "tiny"
  c.data.negshapes_num = 64
  c.batch_size = 8
  c.total_steps = 6
  c.warmup_steps = 2
  c.learning_rate = 1e-3
  c.log_every = 2
  c.save_every = 2
  c.evals = ml_collections.ConfigDict()
  return c
