"""NegRefCOCOg: does the (negated) phrase pick its referred box among the image's boxes?"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from negclip_jax.data.negrefcocog import load_negrefcocog
from negclip_jax.data.records import RefRecord
from negclip_jax.preprocess import crop_box, load_image, preprocess_image
from negclip_jax.tasks import common, metrics

_DECODED_CACHE = 8  # images kept decoded while their boxes are cropped


def evaluate(embedder, tokenizer, context_length: int, records: Sequence[RefRecord]) -> dict:
  """{"accuracy": fraction with argmax_box sim(crop, phrase) == ref box (first max), "n"}.

  Crops are pixels (x, y, x + w, y + h) of each box, preprocessed like whole images.
  """
  size = common.image_size(embedder)
  decode = functools.lru_cache(_DECODED_CACHE)(load_image)
  crops = [(r.image_path, box) for r in records for box in r.bbox_list]
  crop_emb = embedder.images(
      crops, lambda item: preprocess_image(crop_box(decode(item[0]), item[1]), size), "crops")
  phrases = common.embed_texts(embedder, tokenizer, context_length,
                               [r.phrase for r in records], "phrases")
  bounds = np.cumsum([0] + [len(r.bbox_list) for r in records])
  scores = [crop_emb[lo:hi] @ phrase for lo, hi, phrase in zip(bounds, bounds[1:], phrases)]
  correct = metrics.choice_correct(scores, [r.ref_index for r in records])
  return {"accuracy": metrics.accuracy(correct), "n": len(records)}


def run(embedder, tokenizer, context_length: int, *, data: str, image_root: str) -> dict:
  """`evaluate` on a NegRefCOCOg JSON file with images under `image_root`."""
  return evaluate(embedder, tokenizer, context_length, load_negrefcocog(data, image_root))
