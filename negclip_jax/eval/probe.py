"""Linear probes: can a logistic regression read a binary property off fixed features?

`fit_logistic` is the one logistic regression of the package (also the NegShapes
text-only shortcut rule); `linear_probe` scores a probe on held-out features by balanced
accuracy (mean of the per-class recalls: 0.5 is chance whatever the class balance, 1.0 a
perfect read-out).
"""

from __future__ import annotations

import numpy as np


def fit_logistic(
  x: np.ndarray,
  y: np.ndarray,
  weights: np.ndarray | None = None,
  l2: float = 1e-3,
  steps: int = 100,
) -> np.ndarray:
  """L2-regularised logistic regression, full-batch Newton, float64.

  x: float [N, D] (include a constant column for a bias); y: {0, 1} [N]; weights: float [N]
  per-example loss weights (default 1). Returns w float [D]: the logit of y=1 is x @ w.
  The objective is mean(weights * log-loss) + l2/2 |w|^2.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  c = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
  w = np.zeros(x.shape[1])
  for _ in range(steps):
    p = 1 / (1 + np.exp(-(x @ w)))
    grad = x.T @ (c * (p - y)) / len(y) + l2 * w
    hess = (x * (c * p * (1 - p))[:, None]).T @ x / len(y) + l2 * np.eye(len(w))
    delta = np.linalg.solve(hess, grad)
    w -= delta
    if np.abs(delta).max() < 1e-8:
      break
  return w


def balanced_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
  """Mean over the classes present in `labels` (bool [N]) of the fraction predicted right."""
  predicted, labels = np.asarray(predicted, bool), np.asarray(labels, bool)
  recalls = [np.mean(predicted[labels == k] == k) for k in (False, True) if np.any(labels == k)]
  return float(np.mean(recalls))


def linear_probe(
  train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, l2: float = 1e-2
) -> float:
  """Balanced accuracy on (test_x [M, D], test_y bool [M]) of a probe fit on (train_x [N, D],
  train_y bool [N]).

  Features are standardised with the training statistics; the classes are weighted to
  equal total weight, so a rare property is not ignored.
  """
  train_y = np.asarray(train_y, bool)
  if train_y.all() or not train_y.any():
    raise ValueError(
      f"a probe needs both classes in training ({int(train_y.sum())} of {len(train_y)} positive)"
    )
  mean, sd = train_x.mean(0), train_x.std(0) + 1e-8
  design = lambda x: np.concatenate([(x - mean) / sd, np.ones((len(x), 1))], 1)
  pos = train_y.mean()
  weights = np.where(train_y, 0.5 / pos, 0.5 / (1 - pos))
  w = fit_logistic(design(train_x), train_y, weights, l2)
  return balanced_accuracy(design(test_x) @ w > 0, test_y)
