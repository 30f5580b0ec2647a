"""CC-Neg: does the image match its caption at least as well as the negated caption?"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from negclip_jax.data.ccneg import CCNEG_EVAL_SIZE, load_ccneg
from negclip_jax.data.records import PresenceRecord
from negclip_jax.tasks import common, metrics


def evaluate(embedder, tokenizer, context_length: int,
             records: Sequence[PresenceRecord]) -> dict:
  """{"accuracy": fraction with sim(image, caption) >= sim(image, negated), "n"}."""
  images = common.embed_files(embedder, [r.image_path for r in records])
  captions = common.embed_texts(embedder, tokenizer, context_length,
                                [r.caption for r in records], "captions")
  negated = common.embed_texts(embedder, tokenizer, context_length,
                               [r.negated for r in records], "negated captions")
  correct = metrics.pairwise_correct(np.sum(images * captions, -1),
                                     np.sum(images * negated, -1), ties_correct=True)
  return {"accuracy": metrics.accuracy(correct), "n": len(records)}


def run(embedder, tokenizer, context_length: int, *, data: str, image_root: str,
        eval_size: int = CCNEG_EVAL_SIZE) -> dict:
  """`evaluate` on the eval split (last `eval_size` records) of a .pt/.jsonl file."""
  records = load_ccneg(data, image_root, split="eval", eval_size=eval_size)
  return evaluate(embedder, tokenizer, context_length, records)
