"""NegShapes: presence, absence and retrieval on generated (offline) shape scenes."""

from __future__ import annotations

import numpy as np

from negclip_jax.data import negshapes
from negclip_jax.tasks import common, metrics


def generate(num: int = 500, seed: int = 0, image_size: int = 64) -> dict:
  """{"presence", "absence", "retrieval"}: the three NegShapes task dicts, `num` each."""
  return {"presence": negshapes.presence_task(num, seed, image_size),
          "absence": negshapes.absence_task(num, seed, image_size),
          "retrieval": negshapes.retrieval_task(num, seed, image_size)}


def evaluate(embedder, tokenizer, context_length: int, data: dict) -> dict:
  """"presence_acc", "absence_acc", "retrieval_t2i_r1", "retrieval_i2t_r1", "n".

  presence: sim(image, caption) >= sim(image, negated); absence: sim(text, pos image)
  > sim(text, neg image); retrieval: caption i <-> image i. Images (uint8, any size) are
  preprocessed to the model's size. "n" is the number of presence examples.
  """
  def texts(values, desc):
    return common.embed_texts(embedder, tokenizer, context_length, values, desc)

  presence, absence, retrieval = data["presence"], data["absence"], data["retrieval"]
  image = common.embed_arrays(embedder, presence["images"], "presence images")
  presence_ok = metrics.pairwise_correct(
      np.sum(image * texts(presence["captions"], "presence captions"), -1),
      np.sum(image * texts(presence["negated"], "presence negated"), -1), ties_correct=True)
  text = texts(absence["texts"], "absence texts")
  absence_ok = metrics.pairwise_correct(
      np.sum(text * common.embed_arrays(embedder, absence["images_pos"], "absence pos"), -1),
      np.sum(text * common.embed_arrays(embedder, absence["images_neg"], "absence neg"), -1),
      ties_correct=False)
  recall = metrics.retrieval_metrics(
      common.embed_arrays(embedder, retrieval["images"], "retrieval images"),
      texts(retrieval["captions"], "retrieval captions"),
      np.arange(len(retrieval["captions"])), ks=(1,))
  return {"presence_acc": metrics.accuracy(presence_ok),
          "absence_acc": metrics.accuracy(absence_ok),
          **{f"retrieval_{k}": v for k, v in recall.items()},
          "n": len(presence["captions"])}


def run(embedder, tokenizer, context_length: int, *, num: int = 500, seed: int = 0,
        image_size: int | None = None) -> dict:
  """`evaluate` on freshly generated data; image_size defaults to the model's."""
  data = generate(num, seed, image_size or common.image_size(embedder))
  return evaluate(embedder, tokenizer, context_length, data)
