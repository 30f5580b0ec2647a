"""Ordered, bounded, overlapped reading: `read_ahead(load, items)` on a pool of threads.

Reading an image is mostly waiting (a bucket object costs ~30 ms from a TPU VM) and PIL
decoding, which releases the GIL; so threads, not processes. Every image the package reads
goes through here: the image-cache pass and the evaluators (`eval.embed.Embedder.images`)
and the training batches without the cache (`train.pipeline.TrainPipeline`).

`read_ahead` yields ``load(item)`` in the order of `items`, reading at most `window` items
ahead of the one last handed out: reading runs ahead of the consumer (e.g. the next batch
is read while the device embeds this one) but never holds more than `window` results
besides the one awaited. An exception raised by ``load`` is raised unchanged when its item
is reached (so the first bad item in order raises, as a serial loop would), and the loads
not yet consumed are cancelled when the consumer stops.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_AUTO_THREADS = 128


def read_threads(configured: int = 0) -> int:
  """Reader threads: `configured` if > 0 (config key ``data.read_threads``), else
  ``max(32, 4 * os.cpu_count())`` up to MAX_AUTO_THREADS; threads mostly wait on I/O."""
  if configured < 0:
    raise ValueError(f"read_threads must be >= 0 (0: from the CPU count), got {configured}")
  if configured:
    return configured
  return min(MAX_AUTO_THREADS, max(32, 4 * (os.cpu_count() or 1)))


def read_ahead(
  load: Callable[[T], R], items: Iterable[T], threads: int = 0, window: int | None = None
) -> Iterator[R]:
  """``load(item)`` for each item, in order, read by `read_threads(threads)` threads with
  at most `window` (default: twice the threads) items ahead; see the module doc.
  threads=1 loads serially in the calling thread (no pool)."""
  threads = read_threads(threads)
  if threads == 1:
    yield from map(load, items)
    return
  window = max(1, window or 2 * threads)
  items = iter(items)
  pending: collections.deque[concurrent.futures.Future] = collections.deque()
  pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="negclip-read")
  try:
    for item in items:
      pending.append(pool.submit(load, item))
      if len(pending) > window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    for future in pending:
      future.cancel()
    pool.shutdown(wait=False, cancel_futures=True)
