"""Ordered, bounded, overlapped reading: `read_ahead(load, items)` on a pool of threads.

Reading an image is mostly waiting (a bucket object costs ~30 ms from a TPU VM), so many
threads read. Decoding is CPU, and the Python parts of PIL's open and of preprocessing hold
the GIL; with `set_decode_processes(n)` (config ``data.decode_processes``; default 0: the
threads decode) the threads hand the bytes they read to n processes (`thread_decoder`: a path
given to `preprocess_image` on a reader thread is read there and decoded, resized and
normalized in a process, bitwise as the same call here). Every image the package reads goes
through here: the image-cache pass and the evaluators (`eval.embed.Embedder.images`) and the
training batches without the cache (`train.pipeline.TrainPipeline`).

`read_ahead` yields ``load(item)`` in the order of `items`, reading at most `window` items
ahead of the one last handed out: reading runs ahead of the consumer (e.g. the next batch
is read while the device embeds this one) but never holds more than `window` results
besides the one awaited. An exception raised by ``load`` is raised unchanged when its item
is reached (so the first bad item in order raises, as a serial loop would), and the loads
not yet consumed are cancelled when the consumer stops.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import multiprocessing
import os
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_AUTO_THREADS = 128
MAX_AUTO_PROCESSES = 16

_decode_processes = 0  # `set_decode_processes`
_decode_pool: tuple[int, concurrent.futures.ProcessPoolExecutor] | None = None  # (size, pool)
_thread = threading.local()  # .decoder: the pool this reader thread decodes images in


def read_threads(configured: int = 0) -> int:
  """Reader threads: `configured` if > 0 (config key ``data.read_threads``), else
  ``max(32, 4 * os.cpu_count())`` up to MAX_AUTO_THREADS; threads mostly wait on I/O."""
  if configured < 0:
    raise ValueError(f"read_threads must be >= 0 (0: from the CPU count), got {configured}")
  if configured:
    return configured
  return min(MAX_AUTO_THREADS, max(32, 4 * (os.cpu_count() or 1)))


def set_decode_processes(processes: int) -> None:
  """Processes decoding images for the reader threads, process-wide (config key
  ``data.decode_processes``, ``negclip-eval --decode-processes``): 0 (default) none, the
  reader threads decode; -1 one per CPU up to MAX_AUTO_PROCESSES (none on a 1-CPU host)."""
  global _decode_processes
  if processes < -1:
    raise ValueError(f"decode_processes must be >= -1 (-1: from the CPU count), got {processes}")
  _decode_processes = processes


def decode_processes() -> int:
  """The number of decoding processes `set_decode_processes` asks for on this host."""
  if _decode_processes >= 0:
    return _decode_processes
  cpus = len(os.sched_getaffinity(0))
  return min(MAX_AUTO_PROCESSES, cpus) if cpus > 1 else 0


def decode_pool() -> concurrent.futures.ProcessPoolExecutor | None:
  """The process-wide pool of `decode_processes()` processes (None if 0), started on first
  use and kept: a process starts in ~0.4 s (spawned: a fresh interpreter importing
  `preprocess` and the main module, as `multiprocessing` does; JAX's threads rule out fork)."""
  global _decode_pool
  n = decode_processes()
  if _decode_pool is not None and _decode_pool[0] != n:
    _decode_pool[1].shutdown(wait=False, cancel_futures=True)
    _decode_pool = None
  if n and _decode_pool is None:
    pool = concurrent.futures.ProcessPoolExecutor(
      n,
      mp_context=multiprocessing.get_context("spawn"),
      initializer=_exit_with_parent,
      initargs=(os.getpid(),),
    )
    _decode_pool = n, pool
  return _decode_pool and _decode_pool[1]


def _exit_with_parent(parent: int) -> None:
  """A decoding process exits within a second of `parent`'s end, however it ends (a
  SIGKILLed parent closes no pipe the pool's processes wait on: they would wait forever)."""

  def watch():
    while os.getppid() == parent:
      time.sleep(1)
    os._exit(1)

  threading.Thread(target=watch, name="negclip-parent-watch", daemon=True).start()


def set_thread_decoder(pool: concurrent.futures.Executor | None) -> None:
  """Images this thread preprocesses from files are decoded by `pool` (None: here); every
  reader thread of `read_ahead` starts with `decode_pool()`."""
  _thread.decoder = pool


def thread_decoder() -> concurrent.futures.Executor | None:
  """The pool that decodes the images this thread reads (None: this thread decodes)."""
  return getattr(_thread, "decoder", None)


@atexit.register
def _stop_decode_pool() -> None:
  """Stops the decoding processes before the interpreter's teardown (a pool left to the
  garbage collector then prints an ignored exception)."""
  if _decode_pool is not None:
    _decode_pool[1].shutdown(wait=True, cancel_futures=True)


def read_ahead(
  load: Callable[[T], R], items: Iterable[T], threads: int = 0, window: int | None = None
) -> Iterator[R]:
  """``load(item)`` for each item, in order, read by `read_threads(threads)` threads with
  at most `window` (default: twice the threads) items ahead, images decoded by
  `decode_pool()`; see the module doc. threads=1 loads serially in the calling thread (no
  pools: the code before parallel reading)."""
  threads = read_threads(threads)
  if threads == 1:
    yield from map(load, items)
    return
  window = max(1, window or 2 * threads)
  items = iter(items)
  pending: collections.deque[concurrent.futures.Future] = collections.deque()
  pool = concurrent.futures.ThreadPoolExecutor(
    threads, "negclip-read", initializer=set_thread_decoder, initargs=(decode_pool(),)
  )
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
