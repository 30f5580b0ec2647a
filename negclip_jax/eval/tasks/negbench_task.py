"""NegBench (benchmarks/src/evaluation/eval_mcq.py, CLIP_benchmark retrieval): multiple
choice among 4 captions with a wrong-answer breakdown, binary choice, text-to-image
retrieval."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from negclip_jax.data.negbench import load_negbench_mcq, load_negbench_retrieval
from negclip_jax.data.records import McqRecord, RetrievalSet
from negclip_jax.eval import embed, metrics

logger = logging.getLogger(__name__)

ANSWER_TYPES = {  # MCQ layout -> caption index -> answer type (the original's mapping)
  "coco": {1: "hybrid", 2: "positive", 3: "negative"},  # COCO, VOC2007, MSR-VTT MCQs
  "synthetic": {0: "positive", 1: "hybrid", 2: "hybrid", 3: "negative"},
}
UNMAPPED = "unmapped"  # the type of a wrong answer at an index the layout does not map


def _predictions(
  embedder, tokenizer, context_length: int, records: Sequence[McqRecord], protocol: str
) -> np.ndarray:
  """int [N]: argmax over each record's captions (first maximum wins)."""
  images = embed.embed_files(embedder, [r.image_path for r in records], protocol=protocol)
  texts = embed.embed_texts(
    embedder, tokenizer, context_length, [c for r in records for c in r.captions], "captions"
  )
  scores = np.einsum("nkd,nd->nk", texts.reshape(len(records), -1, texts.shape[-1]), images)
  return np.argmax(scores, -1)


def wrong_answers(predicted: np.ndarray, records: Sequence[McqRecord], layout: str) -> dict:
  """ "wrong_as_<type>" (fraction of wrong answers whose chosen caption has that type)
  and "wrong_<template>_as_<type>" counts; types by caption index from `ANSWER_TYPES`.

  A layout that leaves an index unmapped (caption 0 in ``coco``: NegBench's COCO MCQs never
  offer it as a wrong answer; the original raises KeyError) counts a wrong pick there as
  type ``unmapped``, with a warning, so a file whose right answer is elsewhere still scores.
  """
  types = ANSWER_TYPES[layout]
  names = list(dict.fromkeys(types.values()))
  if len(types) < max(len(r.captions) for r in records):
    names.append(UNMAPPED)
  templates = list(dict.fromkeys(r.template for r in records))
  counts = {(t, a): 0 for t in templates for a in names}
  for p, r in zip(predicted, records):
    if p != r.correct:
      counts[r.template, types.get(int(p), UNMAPPED)] += 1
  unmapped = sum(counts[t, UNMAPPED] for t in templates) if UNMAPPED in names else 0
  if unmapped:
    logger.warning(
      "%d wrong answer(s) chose a caption the %r MCQ layout gives no answer type %s; "
      "counted as %r (--mcq-layout picks the layout)",
      unmapped,
      layout,
      types,
      UNMAPPED,
    )
  total = sum(counts.values())
  out = {
    f"wrong_as_{a}": sum(counts[t, a] for t in templates) / total if total else float("nan")
    for a in names
  }
  out.update({f"wrong_{t}_as_{a}": c for (t, a), c in counts.items()})
  return out


def evaluate_mcq(
  embedder,
  tokenizer,
  context_length: int,
  records: Sequence[McqRecord],
  protocol: str = "original",
  layout: str = "coco",
) -> dict:
  """ "accuracy", "accuracy_<template>" per template, the `wrong_answers` keys, "n"."""
  predicted = _predictions(embedder, tokenizer, context_length, records, protocol)
  correct = predicted == np.array([r.correct for r in records])
  templates = np.array([r.template for r in records], object)
  out = {"accuracy": metrics.accuracy(correct)}
  for template in dict.fromkeys(templates):
    out[f"accuracy_{template}"] = metrics.accuracy(correct[templates == template])
  return {**out, **wrong_answers(predicted, records, layout), "n": len(records)}


def evaluate_binary_mcq(
  embedder, tokenizer, context_length: int, records: Sequence[McqRecord], protocol: str = "original"
) -> dict:
  """ "accuracy" (argmax over caption_0, caption_1; ties: caption_0), "n"."""
  predicted = _predictions(embedder, tokenizer, context_length, records, protocol)
  return {
    "accuracy": metrics.accuracy(predicted == np.array([r.correct for r in records])),
    "n": len(records),
  }


def evaluate_retrieval(
  embedder,
  tokenizer,
  context_length: int,
  data: RetrievalSet,
  protocol: str = "original",
  ties: str = "optimistic",
) -> dict:
  """ "t2i_r1", "t2i_r5" (each caption's own row image), "n" texts, "n_images"."""
  images = embed.embed_files(embedder, data.image_paths, protocol=protocol)
  texts = embed.embed_texts(embedder, tokenizer, context_length, data.captions, "captions")
  out = metrics.retrieval_metrics(
    images, texts, data.caption_to_image, ks=(1, 5), directions=("t2i",), ties=ties
  )
  return {**out, "n": len(data.captions), "n_images": len(data.image_paths)}


def run_mcq(
  embedder,
  tokenizer,
  context_length: int,
  *,
  data: str,
  image_root: str,
  protocol: str = "original",
  mcq_layout: str = "coco",
) -> dict:
  """`evaluate_mcq` on a NegBench MCQ CSV."""
  if mcq_layout not in ANSWER_TYPES:
    raise ValueError(f"unknown MCQ layout {mcq_layout!r}; known: {sorted(ANSWER_TYPES)}")
  return evaluate_mcq(
    embedder, tokenizer, context_length, load_negbench_mcq(data, image_root), protocol, mcq_layout
  )


def run_binary_mcq(
  embedder,
  tokenizer,
  context_length: int,
  *,
  data: str,
  image_root: str,
  protocol: str = "original",
) -> dict:
  """`evaluate_binary_mcq` on a NegBench binary MCQ CSV."""
  return evaluate_binary_mcq(
    embedder,
    tokenizer,
    context_length,
    load_negbench_mcq(data, image_root, num_options=2),
    protocol,
  )


def run_retrieval(
  embedder,
  tokenizer,
  context_length: int,
  *,
  data: str,
  image_root: str,
  protocol: str = "original",
  ties: str = "optimistic",
) -> dict:
  """`evaluate_retrieval` on a NegBench retrieval CSV."""
  return evaluate_retrieval(
    embedder, tokenizer, context_length, load_negbench_retrieval(data, image_root), protocol, ties
  )
