"""Processes of a multi-host run: who handles which items, and how they agree.

Every function is a no-op shortcut with one process; with several, each all-gather is
entered by every process (call them from code that every process runs).
"""

from __future__ import annotations

import json
import math
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils


def block_size(n: int) -> int:
  """Items per process when n items are split into contiguous blocks (the last may be
  shorter): every process runs this many, padding past the end of its block."""
  return math.ceil(n / jax.process_count())


def process_block(n: int, process: int | None = None) -> tuple[int, int]:
  """[lo, hi): the contiguous block of n items that `process` (default: this one) handles."""
  per_proc = block_size(n)
  p = jax.process_index() if process is None else process
  return min(n, p * per_proc), min(n, (p + 1) * per_proc)


def gather_blocks(local: np.ndarray, n: int) -> np.ndarray:
  """Every process's `process_block` rows `local` [hi - lo, ...] -> all n rows, on every
  process (one all-gather when multi-process)."""
  procs = jax.process_count()
  if procs == 1:
    return local
  per_proc = block_size(n)
  padded = np.zeros((per_proc,) + local.shape[1:], local.dtype)
  padded[: len(local)] = local
  every = multihost_utils.process_allgather(padded)  # [procs, per_proc, D]
  return np.concatenate(
    [every[p][: max(0, min(n, (p + 1) * per_proc) - p * per_proc)] for p in range(procs)]
  )


def host_slice(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """Process p's contiguous share [p * B / P, (p + 1) * B / P) of a global batch [B]."""
  b = len(indices) // process_count
  return indices[process_index * b : (process_index + 1) * b]


def all_processes(flag: bool) -> bool:
  """True iff `flag` is true on every process (one all-gather when multi-process)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def gather_failures(failed: Mapping[int, str], n: int) -> dict[int, str]:
  """{position: reason} of every process's failures among n items (one all-gather when
  multi-process; the reason of another process's failure is not sent, only its position)."""
  if jax.process_count() == 1:
    return dict(failed)
  mask = np.zeros(n, np.int32)
  mask[list(failed)] = 1
  every = np.asarray(multihost_utils.process_allgather(mask)).reshape(-1, n).any(0)
  return {
    int(i): failed.get(int(i), "could not be loaded (see the log of the process that loaded it)")
    for i in np.flatnonzero(every)
  }


def gather_json(value) -> list:
  """[each process's JSON-serializable `value`, in process order], on every process (two
  all-gathers when multi-process: the lengths, then the padded UTF-8 bytes)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array(len(data)))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: len(data)] = data
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(row[:n].tobytes()) for row, n in zip(every, lengths)]
