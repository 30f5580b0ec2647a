"""NegRefCOCOg: does the (negated) phrase pick its referred box among the image's boxes?"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from negclip_jax.data.negrefcocog import load_negrefcocog
from negclip_jax.data.records import RefRecord
from negclip_jax.eval import embed, metrics
from negclip_jax.model.preprocess import crop_box, load_image

_DECODED_CACHE = 8  # images kept decoded while their boxes are cropped


def evaluate(
  embedder, tokenizer, context_length: int, records: Sequence[RefRecord], protocol: str = "original"
) -> dict:
  """{"accuracy", "n", "n_missing_ref"}: correct when the best box (first maximum of
  sim(crop, phrase)) equals `ref_bbox` in value; a `ref_bbox` missing from
  `bbox_list` (kept only by a reader without `require_ref`) counts wrong.

  Crops are pixels (x, y, x + w, y + h) of each box, preprocessed like whole images;
  under "original" they are cut in the image's own mode (OpenAI `clip` order).
  """
  load = embed.image_loader(embedder, protocol)
  decode = functools.lru_cache(_DECODED_CACHE)(load_image)
  rgb = protocol == "hf"
  crops = [(r.image_path, box) for r in records for box in r.bbox_list]
  crop_emb = embedder.images(
    crops, lambda item: load(crop_box(decode(item[0]), item[1], rgb=rgb)), "crops"
  )
  phrases = embed.embed_texts(
    embedder, tokenizer, context_length, [r.phrase for r in records], "phrases"
  )
  bounds = np.cumsum([0] + [len(r.bbox_list) for r in records])
  correct = np.array(
    [
      r.bbox_list[int(np.argmax(crop_emb[lo:hi] @ phrase))] == r.ref_bbox
      for r, lo, hi, phrase in zip(records, bounds, bounds[1:], phrases)
    ],
    bool,
  )
  return {
    "accuracy": metrics.accuracy(correct),
    "n": len(records),
    "n_missing_ref": sum(r.ref_bbox not in r.bbox_list for r in records),
  }


def run(
  embedder,
  tokenizer,
  context_length: int,
  *,
  data: str,
  image_root: str,
  protocol: str = "original",
) -> dict:
  """`evaluate` on a NegRefCOCOg JSON file with images under `image_root`.

  "original" keeps records whose `ref_bbox` is not in `bbox_list` (counted wrong, as
  the original script does); "hf" rejects them with an error naming the record.
  """
  records = load_negrefcocog(data, image_root, require_ref=protocol == "hf")
  return evaluate(embedder, tokenizer, context_length, records, protocol)
