"""NegBench: multiple choice among 4 captions, and text-to-image retrieval."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from negclip_jax.data.negbench import load_negbench_mcq, load_negbench_retrieval
from negclip_jax.data.records import McqRecord, RetrievalSet
from negclip_jax.tasks import common, metrics


def evaluate_mcq(embedder, tokenizer, context_length: int, records: Sequence[McqRecord]) -> dict:
  """"accuracy" (argmax over the 4 captions), "accuracy_<template>" per template, "n"."""
  images = common.embed_files(embedder, [r.image_path for r in records])
  texts = common.embed_texts(embedder, tokenizer, context_length,
                             [c for r in records for c in r.captions], "captions")
  scores = np.einsum("nkd,nd->nk", texts.reshape(len(records), -1, texts.shape[-1]), images)
  correct = metrics.choice_correct(scores, [r.correct for r in records])
  templates = np.array([r.template for r in records], object)
  out = {"accuracy": metrics.accuracy(correct)}
  for template in dict.fromkeys(templates):
    out[f"accuracy_{template}"] = metrics.accuracy(correct[templates == template])
  return {**out, "n": len(records)}


def evaluate_retrieval(embedder, tokenizer, context_length: int, data: RetrievalSet) -> dict:
  """"t2i_r1", "t2i_r5" (each caption's own row image), "n" texts, "n_images"."""
  images = common.embed_files(embedder, data.image_paths)
  texts = common.embed_texts(embedder, tokenizer, context_length, data.captions, "captions")
  out = metrics.retrieval_metrics(images, texts, data.caption_to_image, ks=(1, 5),
                                  directions=("t2i",))
  return {**out, "n": len(data.captions), "n_images": len(data.image_paths)}


def run_mcq(embedder, tokenizer, context_length: int, *, data: str, image_root: str) -> dict:
  """`evaluate_mcq` on a NegBench MCQ CSV."""
  return evaluate_mcq(embedder, tokenizer, context_length, load_negbench_mcq(data, image_root))


def run_retrieval(embedder, tokenizer, context_length: int, *, data: str,
                  image_root: str) -> dict:
  """`evaluate_retrieval` on a NegBench retrieval CSV."""
  return evaluate_retrieval(embedder, tokenizer, context_length,
                            load_negbench_retrieval(data, image_root))
