"""Metrics shared by the evaluation tasks (numpy, on L2-normalized embeddings).

Similarity is the dot product. Accuracies and recalls are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_QUERY_CHUNK = 1024  # queries per similarity block in `best_ranks`
TIES = ("optimistic", "pessimistic")  # rank rules for tied scores (`best_ranks`)

NEGATION_WORDS = ("no", "not", "without")  # words that mark a caption as negated


def pairwise_correct(pos: np.ndarray, neg: np.ndarray, ties_correct: bool) -> np.ndarray:
  """bool [N]: pos [N] beats neg [N] (`>=` when ties count as correct, else `>`)."""
  return pos >= neg if ties_correct else pos > neg


def softmax(logits: np.ndarray) -> np.ndarray:
  """Softmax over the last axis (max-subtracted), in the logits' dtype."""
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC of scores [N] for bool/0-1 labels [N]: P(score_pos > score_neg) + P(tie) / 2.

  Computed from average ranks (the Mann-Whitney U statistic), so tied scores count
  half, as in `sklearn.metrics.roc_auc_score`.
  """
  labels, scores = np.asarray(labels, bool), np.asarray(scores)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if not n_pos or not n_neg:
    raise ValueError(f"ROC AUC needs both classes; got {n_pos} positive, {n_neg} negative")
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  upper = np.cumsum(counts)
  average_rank = (upper - (counts - 1) / 2)[inverse]  # 1-based, ties share their mean rank
  return float((average_rank[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy(correct: np.ndarray) -> float:
  """Mean of a bool array."""
  return float(np.mean(correct))


def best_ranks(
  queries: np.ndarray,
  gallery: np.ndarray,
  pair_query: np.ndarray,
  pair_item: np.ndarray,
  ties: str = "optimistic",
) -> np.ndarray:
  """int [Q]: 1-based rank of each query's best-ranked ground-truth gallery item.

  queries [Q, D], gallery [G, D]; ground truth is many-to-many, given as distinct pairs
  (pair_query[p], pair_item[p]). With s = the best ground-truth score, rank is
  1 + #items scoring > s ("optimistic": ties go to the ground truth) or
  1 + #non-ground-truth items scoring >= s ("pessimistic": ties go against it).
  A query without ground truth gets rank G + 1.
  """
  if ties not in TIES:
    raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
  pair_query, pair_item = np.asarray(pair_query), np.asarray(pair_item)
  ranks = np.empty(len(queries), np.int64)
  for lo in range(0, len(queries), _QUERY_CHUNK):
    sims = queries[lo : lo + _QUERY_CHUNK] @ gallery.T
    mine = (pair_query >= lo) & (pair_query < lo + len(sims))
    rows, cols = pair_query[mine] - lo, pair_item[mine]
    best = np.full(len(sims), -np.inf, sims.dtype)
    np.maximum.at(best, rows, sims[rows, cols])
    if ties == "optimistic":
      ranks[lo : lo + len(sims)] = 1 + (sims > best[:, None]).sum(1)
    else:
      tied_truth = np.zeros(len(sims), np.int64)
      np.add.at(tied_truth, rows, sims[rows, cols] == best[rows])
      ranks[lo : lo + len(sims)] = 1 + (sims >= best[:, None]).sum(1) - tied_truth
  return ranks


def recall_at_k(ranks: np.ndarray, k: int) -> float:
  """Fraction of queries whose best ground truth is in the top k."""
  return float(np.mean(ranks <= k))


def retrieval_metrics(
  image_emb: np.ndarray,
  text_emb: np.ndarray,
  caption_to_image: Sequence[int],
  ks: Sequence[int] = (1, 5, 10),
  directions: Sequence[str] = ("t2i", "i2t"),
  mean_rank: bool = False,
  ties: str = "optimistic",
) -> dict[str, float]:
  """Recall@k (keys "t2i_r1", "i2t_r5", ...) and optionally "<dir>_mean_rank".

  image_emb [I, D], text_emb [T, D]; text j describes image caption_to_image[j].
  t2i: hit if the text's image is in the top k; i2t: hit if any of the image's texts is.
  `ties` is the rank rule of `best_ranks`; "both" adds "<key>_pessimistic" next to
  the optimistic keys (a sensitivity check for tied scores, e.g. a repeated image).
  """
  if ties not in (*TIES, "both"):
    raise ValueError(f"ties must be one of {(*TIES, 'both')}, got {ties!r}")
  if ties == "both":
    out = retrieval_metrics(image_emb, text_emb, caption_to_image, ks, directions, mean_rank)
    pessimistic = retrieval_metrics(
      image_emb, text_emb, caption_to_image, ks, directions, mean_rank, "pessimistic"
    )
    return {**out, **{f"{k}_pessimistic": v for k, v in pessimistic.items()}}
  texts = np.arange(len(text_emb))
  images = np.asarray(caption_to_image)
  setups = {
    "t2i": (text_emb, image_emb, texts, images),
    "i2t": (image_emb, text_emb, images, texts),
  }
  out = {}
  for direction in directions:
    ranks = best_ranks(*setups[direction], ties=ties)
    out.update({f"{direction}_r{k}": recall_at_k(ranks, k) for k in ks})
    if mean_rank:
      out[f"{direction}_mean_rank"] = float(ranks.mean())
  return out
