"""Offline demo: NegShapes, the small preset, fast settings. Runs anywhere on CPU.

With `init` empty it fine-tunes random weights; `python -m negclip_jax.demo` first
pretrains a small CLIP and passes its exported HF directory as `init`.
"""

from negclip_jax.configs import omni_negclip_vitb32


def get_config():
  c = omni_negclip_vitb32.get_config()
  c.model = "small"
  c.data.presence = "negshapes"
  c.data.absence = "negshapes"
  c.data.negshapes_num = 8192
  c.batch_size = 64
  c.num_epochs = 1
  c.total_steps = 200
  c.learning_rate = 5e-4
  c.weight_decay = 0.05
  c.warmup_steps = 20
  c.log_every = 20
  c.save_every = 100
  c.evals.negshapes = dict(task="negshapes", every=0, num=500)
  return c
