"""CC-Neg: does the image match its caption at least as well as the negated caption?

Mode 1 (CoN-CLIP `ClipRunner.score_over_loader`): correct when sim(image, caption) >=
sim(image, negated) (argmax over [caption, negated], ties to the caption), with
subsets by negation word (`eval_ccneg_no_not_without.py`) and by number of
object-predicate pairs (`--num-ops`). Mode 2 (`score_over_loader2`): see `evaluate2`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from negclip_jax.data import tfds_shards, webdataset
from negclip_jax.data.ccneg import (
  CCNEG_EVAL_SIZE,
  ImagePairRecord,
  load_ccneg,
  load_ccneg2,
  load_num_ops,
  strip_commas,
)
from negclip_jax.data.records import PresenceRecord
from negclip_jax.eval import embed, metrics

TFDS_NAME = "negclip_ccneg"  # `data.tfds_builders.NegclipCcneg`


def has_word(text: str, words: Sequence[str]) -> bool:
  """Whether ' text ' contains ' w ' for some w (the original's test, on the raw text)."""
  padded = f" {text} "
  return any(f" {w} " in padded for w in words)


def _correct(
  embedder,
  tokenizer,
  context_length: int,
  image_paths: Sequence[str],
  captions: Sequence[str],
  negated: Sequence[str],
  protocol: str,
) -> np.ndarray:
  """bool [N]: sim(image, caption) >= sim(image, negated)."""
  images = embed.embed_files(embedder, image_paths, protocol=protocol)
  pos = embed.embed_texts(embedder, tokenizer, context_length, captions, "captions")
  neg = embed.embed_texts(embedder, tokenizer, context_length, negated, "negated captions")
  return metrics.pairwise_correct(
    np.sum(images * pos, -1), np.sum(images * neg, -1), ties_correct=True
  )


def evaluate(
  embedder,
  tokenizer,
  context_length: int,
  records: Sequence[PresenceRecord],
  protocol: str = "original",
  negation_words: Sequence[str] = metrics.NEGATION_WORDS,
  num_ops: dict[int, Sequence[int]] | None = None,
) -> dict:
  """ "accuracy", "n", then per word w "accuracy_word_<w>", "n_word_<w>" and per count k
  of `num_ops` (k -> record positions) "accuracy_ops_<k>", "n_ops_<k>".

  `records` keep the raw negated caption (commas included): words are matched on it,
  commas are stripped before embedding. An empty subset has accuracy NaN.
  """
  if isinstance(negation_words, str):
    raise TypeError(
      f"negation_words must be a sequence of words, got the string {negation_words!r}"
    )
  correct = _correct(
    embedder,
    tokenizer,
    context_length,
    [r.image_path for r in records],
    [r.caption for r in records],
    [strip_commas(r.negated) for r in records],
    protocol,
  )
  out = {"accuracy": metrics.accuracy(correct), "n": len(records)}
  subsets = {
    f"word_{w}": [i for i, r in enumerate(records) if has_word(r.negated, [w])]
    for w in negation_words
  }
  subsets.update({f"ops_{k}": list(rows) for k, rows in (num_ops or {}).items()})
  for name, rows in subsets.items():
    out[f"accuracy_{name}"] = metrics.accuracy(correct[rows]) if rows else float("nan")
    out[f"n_{name}"] = len(rows)
  return out


def evaluate2(
  embedder,
  tokenizer,
  context_length: int,
  records: Sequence[ImagePairRecord],
  logit_scale: float,
  protocol: str = "original",
) -> dict:
  """Mode 2: "positive_acc", "negative_acc", "accuracy" (their mean), "auc", "n".

  For each image, p = softmax(logit_scale * [sim(caption), sim(negated)])[1], as the
  original computes it (with the stored log-space scale). Positive images are right
  when argmax is the caption (ties: caption), negative images when it is the negated
  caption; AUC is the ROC AUC of p against label 0 / 1 (positive / negative image).
  """
  pos = embed.embed_texts(
    embedder, tokenizer, context_length, [r.caption for r in records], "captions"
  )
  neg = embed.embed_texts(
    embedder, tokenizer, context_length, [r.negated for r in records], "negated captions"
  )
  out, probs = {}, []
  for label, name in enumerate(("positive", "negative")):
    images = embed.embed_files(
      embedder, [getattr(r, f"{name}_path") for r in records], f"{name} images", protocol
    )
    logits = logit_scale * np.stack([np.sum(images * pos, -1), np.sum(images * neg, -1)], -1)
    out[f"{name}_acc"] = metrics.accuracy(np.argmax(logits, -1) == label)
    probs.append(metrics.softmax(logits)[:, 1])
  labels = np.repeat([0, 1], len(records))
  return {
    **out,
    "accuracy": (out["positive_acc"] + out["negative_acc"]) / 2,
    "auc": metrics.roc_auc(labels, np.concatenate(probs)),
    "n": len(records),
  }


def run(
  embedder,
  tokenizer,
  context_length: int,
  *,
  data: str,
  image_root: str,
  eval_size: int = CCNEG_EVAL_SIZE,
  protocol: str = "original",
  negation_words: Sequence[str] = metrics.NEGATION_WORDS,
  num_ops: bool = False,
) -> dict:
  """`evaluate` on the eval split (last `eval_size` records) of a .pt/.jsonl file;
  `num_ops` adds the subsets of the .pt's "num_ops" field."""
  records = load_ccneg(data, image_root, split="eval", eval_size=eval_size, keep_commas=True)
  ops = load_num_ops(data, eval_size) if num_ops else None
  return evaluate(embedder, tokenizer, context_length, records, protocol, negation_words, ops)


def run_shards(
  embedder,
  tokenizer,
  context_length: int,
  *,
  data: str,
  protocol: str = "original",
  negation_words: Sequence[str] = metrics.NEGATION_WORDS,
) -> dict:
  """`evaluate` (mode 1) on every sample of webdataset shards `data` (a brace pattern, local
  or gs://): the image, its ``.txt`` caption and the ``negated`` field (its ``.negated``
  member or .json field; `data.webdataset`)."""
  records = webdataset.load_presence(data, caption_key="txt", negated_key="negated")
  return evaluate(embedder, tokenizer, context_length, records, protocol, negation_words)


def run_tfds(
  embedder,
  tokenizer,
  context_length: int,
  *,
  tfds_data_dir: str,
  protocol: str = "original",
  negation_words: Sequence[str] = metrics.NEGATION_WORDS,
) -> dict:
  """`evaluate` (mode 1) on the "eval" split of the TFDS dataset ``negclip_ccneg`` prepared
  under `tfds_data_dir` (local or gs://) by `data.tfds_builders` (negated captions with
  their commas, as `run` reads them)."""
  records = tfds_shards.load_presence(TFDS_NAME, "eval", data_dir=tfds_data_dir)
  return evaluate(embedder, tokenizer, context_length, records, protocol, negation_words)


def run2(
  embedder,
  tokenizer,
  context_length: int,
  *,
  data: str,
  image_root: str,
  protocol: str = "original",
) -> dict:
  """`evaluate2` on a CC-Neg mode-2 .pt, with the model's stored `logit_scale`."""
  logit_scale = float(np.asarray(embedder.params["logit_scale"]).reshape(-1)[0])  # replicated
  return evaluate2(
    embedder, tokenizer, context_length, load_ccneg2(data, image_root), logit_scale, protocol
  )
