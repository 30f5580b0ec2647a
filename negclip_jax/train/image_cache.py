"""Frozen image-tower cache: every training image's `get_image_features`, computed once.

The image tower never trains, so its raw (un-normalized; the train step normalizes)
features can replace pixels in the batches (`*_image_emb`). `image_embeddings` decodes
each image once; unreadable images go to the `records.BadRecords` policy (raised, or
dropped and reported), so a cached run finds corrupt files before training starts.

Stored (``cache_dir``, local or ``gs://``) as one folder per key: each process writes the
features of its own block of images (`hosts.process_block`) to ``shard-<p>-of-<P>.npy``,
float32 [rows, D] (rows of unloadable images included), then process 0 writes
``index.json`` {"num_images", "num_kept", "dim", "image_size", "source", "dropped":
{position: reason}, "shards": [{"file", "start", "stop"}]}; every file is written
atomically and the index last, so an entry without one is absent. A reader loads only the
shards overlapping its own block (any process count) and the blocks are all-gathered.
The key is a sha256 over the image identities (array bytes, or path + size + mtime), the
preprocessing (image_size, CLIP mean/std), the vision config and the bytes of every
``vision_model/*`` and ``visual_projection/*`` weight, so any change to those misses. An
unreadable entry is a miss (recomputed, overwritten). With several processes the hit is
agreed by all of them first: a miss on any one makes all recompute, so every process joins
the same collectives.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os

import jax
import numpy as np
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from negclip_jax import hosts, storage
from negclip_jax.data.records import BadRecords, DataError
from negclip_jax.eval.embed import Embedder
from negclip_jax.model.preprocess import CLIP_MEAN, CLIP_STD
from negclip_jax.train.pipeline import IMAGE_COLUMNS, Images, bad_records, load_example_image

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
INDEX_FILE = "index.json"
VISION_PREFIXES = ("vision_model", "visual_projection")
BATCH_SIZE = 64  # images per process per embedding call


def _update_images(h, images: Images, stamps) -> None:
  if isinstance(images, np.ndarray):
    h.update(f"array {images.dtype} {images.shape}\n".encode())
    h.update(np.ascontiguousarray(images).data)
    return
  for path in images:
    stamp = stamps[path] if stamps is not None and path in stamps else storage.file_stamp(path)
    h.update(f"{path}\0{stamp or 'missing'}\n".encode())


def cache_key(model, params, images: Images, image_size: int, stamps=None) -> str:
  """sha256 hex of everything the cached features depend on (see the module doc).

  stamps: {path: `pipeline.file_stamp`} already taken (`table.file_stamps`), so that no
  file is `stat`ed twice; paths it lacks are stat'ed here.
  """
  h = hashlib.sha256(f"negclip_jax image cache v{CACHE_VERSION}\n".encode())
  h.update(
    f"{image_size}\n{model.config.vision!r}\n{model.config.projection_dim}\n"
    f"{np.dtype(model.dtype).name}\n".encode()
  )
  h.update(CLIP_MEAN.tobytes() + CLIP_STD.tobytes())
  flat = traverse_util.flatten_dict(params)
  for path in sorted(p for p in flat if p[0] in VISION_PREFIXES):
    leaf = np.asarray(jax.device_get(flat[path]))
    h.update(f"{'/'.join(path)} {leaf.dtype} {leaf.shape}\n".encode())
    h.update(np.ascontiguousarray(leaf).data)
  _update_images(h, images, stamps)
  return h.hexdigest()


def _describe(images: Images) -> str:
  if isinstance(images, np.ndarray):
    return f"uint8 array {list(images.shape)}"
  return f"{len(images)} image files, first {images[0]!r}" if len(images) else "no images"


def _shard_file(process: int, process_count: int) -> str:
  return f"shard-{process:05d}-of-{process_count:05d}.npy"


def _read_block(entry: epath.Path, n: int):
  """(this process's block of the stored features [hi - lo, D], dropped {position:
  reason}) from the shards overlapping it, or None (absent, or unreadable, e.g. a shard
  emptied or cut short by a crash: logged, then recomputed and overwritten)."""
  if not (entry / INDEX_FILE).exists():
    return None
  try:
    meta = json.loads((entry / INDEX_FILE).read_text())
    if meta["num_images"] != n:
      raise ValueError(f"{meta['num_images']} images indexed, {n} asked for")
    lo, hi = hosts.process_block(n)
    parts = []
    for shard in meta["shards"]:
      start, stop = shard["start"], shard["stop"]
      if max(lo, start) < min(hi, stop):
        with storage.open(os.fspath(entry / shard["file"]), "rb") as f:
          rows = np.load(f)
        if rows.shape != (stop - start, meta["dim"]):
          raise ValueError(
            f"{shard['file']} has shape {rows.shape}, the index says {(stop - start, meta['dim'])}"
          )
        parts.append(rows[max(lo, start) - start : min(hi, stop) - start])
    block = np.concatenate(parts) if parts else np.zeros((0, meta["dim"]), np.float32)
    if len(block) != hi - lo:
      raise ValueError(f"the shards hold {len(block)} of rows {lo}..{hi - 1}")
    return block, {int(i): r for i, r in meta["dropped"].items()}
  except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
    logger.warning("image cache %s unreadable (%s: %s); recomputing it", entry, type(e).__name__, e)
    return None


def _hit_everywhere(cached) -> bool:
  """Whether every process found the entry: a miss anywhere makes all recompute, so the
  collectives of `_compute` are entered by all processes or by none."""
  hit = cached is not None
  every = hosts.all_processes(hit)
  if hit and not every:
    logger.warning("image cache: hit here but missed on another process; recomputing")
  return every


def _write_entry(
  entry: epath.Path, block: np.ndarray, dropped, images: Images, image_size: int
) -> None:
  """This process's shard, then (process 0, once every shard is written) the index."""
  n, procs = len(images), jax.process_count()
  entry.mkdir(parents=True, exist_ok=True)
  if len(block):
    buffer = io.BytesIO()
    np.save(buffer, block)
    storage.write_atomic(entry / _shard_file(jax.process_index(), procs), buffer.getvalue())
  if procs > 1:
    multihost_utils.sync_global_devices("negclip_jax: image cache shards written")
  if jax.process_index() != 0:
    return
  shards = [
    {"file": _shard_file(p, procs), "start": lo, "stop": hi}
    for p in range(procs)
    for lo, hi in [hosts.process_block(n, p)]
    if hi > lo
  ]
  meta = {
    "num_images": n,
    "num_kept": n - len(dropped),
    "dim": block.shape[1],
    "image_size": image_size,
    "source": _describe(images),
    "dropped": {str(i): r for i, r in sorted(dropped.items())},
    "shards": shards,
  }
  storage.write_atomic(entry / INDEX_FILE, json.dumps(meta, indent=1).encode())


def _compute(
  model, params, images: Images, image_size, batch_size, skip: bool, record_index, key, threads
):
  """(this process's block of features float32 [hi - lo, D], every process's dropped
  {position: reason}); images read by `threads` reader threads (`Embedder.images`)."""
  failed: dict[int, str] = {}

  def load(i):
    try:
      return load_example_image(images, i, image_size, int(record_index[i]), key)
    except DataError as e:
      if not skip:
        raise
      failed[i] = e.reason
      return np.zeros((image_size, image_size, 3), np.float32)

  embedder = Embedder(model, params, batch_size, normalize=False, read_threads=threads)
  block = embedder.images(range(len(images)), load, desc="image cache", gather=False)
  return np.ascontiguousarray(block, np.float32), hosts.gather_failures(failed, len(images))


def image_embeddings(
  model,
  params,
  images: Images,
  image_size: int,
  cache_dir: str | None = None,
  batch_size: int = BATCH_SIZE,
  on_error: BadRecords | str = "raise",
  record_index=None,
  key: str = "image",
  source: str | None = None,
  stamps=None,
  read_threads: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Raw `get_image_features` of `images` -> (emb float32 [K, D], kept int64 [K] positions).

  images: uint8 [N, H, W, 3] or N file paths (preprocessed at `image_size`). An image that
  cannot be loaded goes to the `on_error` policy (`records.BadRecords`) as a DataError
  (`source`, record index = record_index[i], default i, `key`): raised, or skipped (left out
  of `kept`). With `cache_dir`, a previous result for the same key is loaded instead of
  computed (a stored skip-mode result still raises for its dropped images under "raise").
  With several processes each loads its own block of images, so only the one holding a bad
  image raises: prefer on_error="skip" there. `stamps`: see `cache_key`. `read_threads`:
  image reader threads (`parallel_read.read_threads`; 0: from the CPU count).
  """
  bad = bad_records(on_error)
  n = len(images)
  record_index = np.arange(n) if record_index is None else np.asarray(record_index)
  entry = cached = None
  if cache_dir is not None:
    entry = storage.path(cache_dir) / cache_key(model, params, images, image_size, stamps)
    cached = _read_block(entry, n)
    logger.debug("image cache %s: %s (%s)", "hit" if cached else "miss", entry, _describe(images))
  if entry is None or not _hit_everywhere(cached):
    block, dropped = _compute(
      model, params, images, image_size, batch_size, bad.skip, record_index, key, read_threads
    )
    if entry is not None:
      _write_entry(entry, block, dropped, images, image_size)
  else:
    block, dropped = cached
  emb = hosts.gather_blocks(block, n)
  for i, reason in sorted(dropped.items()):
    where = source or ("image array" if isinstance(images, np.ndarray) else images[i])
    bad(DataError(where, f"unreadable image: {reason}", index=int(record_index[i]), key=key))
  kept = np.array([i for i in range(n) if i not in dropped], np.int64)
  return emb[kept], kept


def embed_table(
  table,
  model,
  params,
  image_size: int,
  *,
  cache_dir: str | None = None,
  batch_size: int = BATCH_SIZE,
  on_error: BadRecords | str = "raise",
  read_threads: int = 0,
):
  """`table` (a pipeline table) with `image_emb` (and `distractor_emb` if it holds
  distractors) from `image_embeddings`; rows with an unloadable image dropped.

  NegShapes' two tables share one image array: with `cache_dir` the second call is a hit.
  """
  embedded, reasons = {}, {}
  for column in table.image_columns():
    key = IMAGE_COLUMNS[column].image_key
    emb, kept = image_embeddings(
      model,
      params,
      getattr(table, column),
      image_size,
      cache_dir,
      batch_size,
      on_error,
      record_index=table.record_index,
      key=key,
      source=table.source,
      stamps=table.file_stamps,
      read_threads=read_threads,
    )
    embedded[column] = (emb, kept)
    for i in np.setdiff1d(np.arange(len(table)), kept):
      reasons.setdefault(int(i), f"{key} could not be loaded")
  keep = np.setdiff1d(np.arange(len(table)), list(reasons))
  return table.with_image_emb(
    reasons,
    **{
      IMAGE_COLUMNS[column].emb_field: emb[np.searchsorted(kept, keep)]
      for column, (emb, kept) in embedded.items()
    },
  )
