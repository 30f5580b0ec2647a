"""parallel_read.read_ahead: order, bounded in-flight loads, errors in order, serial mode,
images decoded in processes."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from negclip_jax.data import parallel_read
from negclip_jax.model import preprocess


def test_results_come_in_order_whatever_finishes_first():
  delays = [0.02 * ((7 * i) % 5) for i in range(30)]  # later items often finish first

  def load(i):
    time.sleep(delays[i])
    return i * i

  assert list(parallel_read.read_ahead(load, range(30), threads=8, window=10)) == [
    i * i for i in range(30)
  ]


def test_at_most_window_loads_are_in_flight_and_reading_runs_ahead():
  lock, started, consumed, most = threading.Lock(), [0], [0], [0]

  def load(i):
    with lock:
      started[0] += 1
      most[0] = max(most[0], started[0] - consumed[0])
    return i

  for _ in parallel_read.read_ahead(load, range(200), threads=16, window=12):
    with lock:
      consumed[0] += 1
    time.sleep(0.001)  # a slow consumer: the readers fill the window
  # Bounded: the item awaited plus `window` ahead of it; and the window was used (reading
  # runs ahead of the consumer).
  assert 12 <= most[0] <= 13


def test_the_first_bad_item_in_order_raises_and_the_rest_is_cancelled():
  loaded = []

  def load(i):
    if i == 3:
      time.sleep(0.05)  # items after it fail sooner; item 3's error must come first
      raise ValueError("bad 3")
    if i > 3:
      raise KeyError(i)
    loaded.append(i)
    return i

  got = []
  with pytest.raises(ValueError, match="bad 3"):
    for x in parallel_read.read_ahead(load, range(1000), threads=4, window=8):
      got.append(x)
  assert got == [0, 1, 2]


def test_stopping_early_cancels_reads_not_started():
  calls = []

  def load(i):
    calls.append(i)
    time.sleep(0.01)
    return i

  reader = parallel_read.read_ahead(load, range(10_000), threads=2, window=4)
  assert [next(reader) for _ in range(3)] == [0, 1, 2]
  reader.close()
  time.sleep(0.05)
  assert len(calls) <= 3 + 4 + 1  # consumed, window, and the one being submitted


def test_one_thread_loads_serially_in_the_caller():
  threads = set()
  out = list(
    parallel_read.read_ahead(lambda i: threads.add(threading.get_ident()) or i, range(5), 1)
  )
  assert out == list(range(5)) and threads == {threading.get_ident()}


def test_thread_count():
  assert parallel_read.read_threads(3) == 3
  assert 32 <= parallel_read.read_threads(0) <= parallel_read.MAX_AUTO_THREADS
  with pytest.raises(ValueError, match="read_threads must be >= 0"):
    parallel_read.read_threads(-1)


def test_decode_process_count():
  try:
    parallel_read.set_decode_processes(3)
    assert parallel_read.decode_processes() == 3
    parallel_read.set_decode_processes(0)
    assert parallel_read.decode_processes() == 0 and parallel_read.decode_pool() is None
    parallel_read.set_decode_processes(-1)
    cpus = len(os.sched_getaffinity(0))
    assert parallel_read.decode_processes() == (min(cpus, 16) if cpus > 1 else 0)
    with pytest.raises(ValueError, match="decode_processes must be >= -1"):
      parallel_read.set_decode_processes(-2)
  finally:
    parallel_read.set_decode_processes(0)


def test_reader_threads_decode_image_files_in_the_pool_and_in_order(tmp_path):
  """Image files read on the reader threads are decoded in `decode_pool()`'s processes:
  the same bits as a serial pass, in order; a bad file raises at its item, naming it."""
  rng = np.random.default_rng(0)
  paths = []
  for i in range(12):
    paths.append(tmp_path / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), np.uint8)).save(paths[-1])
  (tmp_path / "bad.png").write_bytes(b"not a png")
  used = set()

  def load(path):
    used.add(parallel_read.thread_decoder())
    return preprocess.preprocess_image(path, 16)

  try:
    parallel_read.set_decode_processes(2)
    serial = list(parallel_read.read_ahead(load, paths, threads=1))
    assert used == {None}
    used.clear()
    parallel = list(parallel_read.read_ahead(load, paths, threads=4))
    assert used == {parallel_read.decode_pool()} != {None}
    assert [a.tobytes() for a in parallel] == [a.tobytes() for a in serial]
    got = []
    with pytest.raises(ValueError, match=r"bad.png: not an image file"):
      for x in parallel_read.read_ahead(load, paths[:3] + [tmp_path / "bad.png"] + paths, 4):
        got.append(x)
    assert len(got) == 3
  finally:
    parallel_read.set_decode_processes(0)


def test_decoding_processes_exit_when_their_parent_is_killed(tmp_path):
  """A SIGKILLed trainer (a preempted host) leaves no decoding process behind."""
  script = (
    "import time\n"
    "from negclip_jax.data import parallel_read\n"
    "if __name__ == '__main__':\n"
    "  parallel_read.set_decode_processes(2)\n"
    "  list(parallel_read.decode_pool().map(abs, range(8)))\n"
    "  print('ready', flush=True)\n"
    "  time.sleep(600)\n"
  )
  (tmp_path / "parent.py").write_text(script)
  parent = subprocess.Popen(
    [sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, text=True
  )
  try:
    assert parent.stdout.readline() == "ready\n"
    children = psutil.Process(parent.pid).children(recursive=True)
    decoders = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    assert len(decoders) == 2
  finally:
    parent.kill()
    parent.wait()
  _, alive = psutil.wait_procs(decoders, timeout=10)
  assert alive == []
