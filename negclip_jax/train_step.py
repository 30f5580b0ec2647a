"""Old module path, kept for one release: the training step is `negclip_jax.train.step`."""

from negclip_jax.train.step import (  # noqa: F401
  AXIS,
  MAX_LOGIT_SCALE,
  TrainState,
  create_train_state,
  image_embeddings,
  make_train_step,
  pmap_train_step,
  replicate,
  shard_map_train_step,
  text_embeddings,
)
