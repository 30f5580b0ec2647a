"""Metrics shared by the evaluation tasks (numpy, on L2-normalized embeddings).

Similarity is the dot product. Accuracies and recalls are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_QUERY_CHUNK = 1024  # queries per similarity block in `best_ranks`


def pairwise_correct(pos: np.ndarray, neg: np.ndarray, ties_correct: bool) -> np.ndarray:
  """bool [N]: pos [N] beats neg [N] (`>=` when ties count as correct, else `>`)."""
  return pos >= neg if ties_correct else pos > neg


def choice_correct(scores: Sequence[np.ndarray], labels: Sequence[int]) -> np.ndarray:
  """bool [N]: argmax of each 1-D score array (first max wins) equals its label."""
  return np.array([int(np.argmax(s)) == label for s, label in zip(scores, labels)], bool)


def accuracy(correct: np.ndarray) -> float:
  """Mean of a bool array."""
  return float(np.mean(correct))


def best_ranks(queries: np.ndarray, gallery: np.ndarray, pair_query: np.ndarray,
               pair_item: np.ndarray) -> np.ndarray:
  """int [Q]: 1-based rank of each query's best-ranked ground-truth gallery item.

  queries [Q, D], gallery [G, D]; ground truth is many-to-many, given as pairs
  (pair_query[p], pair_item[p]). Rank = 1 + number of items scoring strictly higher
  than the best ground truth (ties are optimistic). A query without ground truth
  gets rank G + 1.
  """
  pair_query, pair_item = np.asarray(pair_query), np.asarray(pair_item)
  ranks = np.empty(len(queries), np.int64)
  for lo in range(0, len(queries), _QUERY_CHUNK):
    sims = queries[lo:lo + _QUERY_CHUNK] @ gallery.T
    mine = (pair_query >= lo) & (pair_query < lo + len(sims))
    rows, cols = pair_query[mine] - lo, pair_item[mine]
    best = np.full(len(sims), -np.inf, sims.dtype)
    np.maximum.at(best, rows, sims[rows, cols])
    ranks[lo:lo + len(sims)] = 1 + (sims > best[:, None]).sum(1)
  return ranks


def recall_at_k(ranks: np.ndarray, k: int) -> float:
  """Fraction of queries whose best ground truth is in the top k."""
  return float(np.mean(ranks <= k))


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray,
                      caption_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10),
                      directions: Sequence[str] = ("t2i", "i2t"),
                      mean_rank: bool = False) -> dict[str, float]:
  """Recall@k (keys "t2i_r1", "i2t_r5", ...) and optionally "<dir>_mean_rank".

  image_emb [I, D], text_emb [T, D]; text j describes image caption_to_image[j].
  t2i: hit if the text's image is in the top k; i2t: hit if any of the image's texts is.
  """
  texts = np.arange(len(text_emb))
  images = np.asarray(caption_to_image)
  setups = {"t2i": (text_emb, image_emb, texts, images),
            "i2t": (image_emb, text_emb, images, texts)}
  out = {}
  for direction in directions:
    ranks = best_ranks(*setups[direction])
    out.update({f"{direction}_r{k}": recall_at_k(ranks, k) for k in ks})
    if mean_rank:
      out[f"{direction}_mean_rank"] = float(ranks.mean())
  return out
