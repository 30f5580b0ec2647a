"""Frozen image-tower cache: every training image's `get_image_features`, computed once.

The image tower never trains, so its raw (un-normalized; the train step normalizes)
features can replace pixels in the batches (`*_image_emb`). `image_embeddings` decodes
each image once; unreadable images go to the `records.BadRecords` policy (raised, or
dropped and reported), so a cached run finds corrupt files before training starts.

On disk (``cache_dir``): ``<key>.npy`` float32 [K, D] (the K loadable images, in order)
and ``<key>.json`` {"num_images", "num_kept", "dim", "image_size", "source", "dropped":
{position: reason}}, each written atomically. The key is a sha256 over the image
identities (array bytes, or path + size + mtime), the preprocessing (image_size, CLIP
mean/std), the vision config and the bytes of every ``vision_model/*`` and
``visual_projection/*`` weight, so any change to those misses. An unreadable entry is a
miss (recomputed, overwritten). With several processes the hit is agreed by all of them
first: a miss on any one makes all recompute, so every process joins the same collectives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from negclip_jax.data.pipeline import (IMAGE_COLUMNS, Images, bad_records, file_stamp,
                                      gather_failures, load_example_image)
from negclip_jax.data.records import BadRecords, DataError
from negclip_jax.embed import Embedder
from negclip_jax.preprocess import CLIP_MEAN, CLIP_STD

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
VISION_PREFIXES = ("vision_model", "visual_projection")


def _update_images(h, images: Images, stamps) -> None:
  if isinstance(images, np.ndarray):
    h.update(f"array {images.dtype} {images.shape}\n".encode())
    h.update(np.ascontiguousarray(images).data)
    return
  for path in images:
    stamp = stamps[path] if stamps is not None and path in stamps else file_stamp(path)
    h.update(f"{path}\0{stamp or 'missing'}\n".encode())


def cache_key(model, params, images: Images, image_size: int, stamps=None) -> str:
  """sha256 hex of everything the cached features depend on (see the module doc).

  stamps: {path: `pipeline.file_stamp`} already taken (`table.file_stamps`), so that no
  file is `stat`ed twice; paths it lacks are stat'ed here.
  """
  h = hashlib.sha256(f"negclip_jax image cache v{CACHE_VERSION}\n".encode())
  h.update(f"{image_size}\n{model.config.vision!r}\n{model.config.projection_dim}\n"
           f"{np.dtype(model.dtype).name}\n".encode())
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


def _write_atomic(path: str, write) -> None:
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def _read_cache(stem: str):
  """(emb [K, D], dropped {position: reason}) stored under `stem`, or None (absent, or
  unreadable: logged, then recomputed and overwritten)."""
  if not (os.path.isfile(stem + ".json") and os.path.isfile(stem + ".npy")):
    return None
  try:
    with open(stem + ".json", encoding="utf-8") as f:
      meta = json.load(f)
    emb = np.load(stem + ".npy")
    if emb.shape != (meta["num_kept"], meta["dim"]):
      raise ValueError(f"shape {emb.shape}, its .json says {(meta['num_kept'], meta['dim'])}")
    return emb, {int(i): r for i, r in meta["dropped"].items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    logger.warning("image cache %s.npy/.json unreadable (%s: %s); recomputing it", stem,
                   type(e).__name__, e)
    return None


def _hit_everywhere(cached) -> bool:
  """Whether every process found the entry: a miss anywhere makes all recompute, so the
  collectives of `_compute` are entered by all processes or by none."""
  hit = cached is not None
  if jax.process_count() == 1:
    return hit
  every = bool(np.all(multihost_utils.process_allgather(np.array(hit))))
  if hit and not every:
    logger.warning("image cache: hit here but missed on another process; recomputing")
  return every


def _write_cache(stem: str, emb, dropped, images: Images, image_size: int) -> None:
  meta = {"num_images": len(images), "num_kept": len(emb), "dim": emb.shape[1],
          "image_size": image_size, "source": _describe(images),
          "dropped": {str(i): r for i, r in sorted(dropped.items())}}
  _write_atomic(stem + ".npy", lambda f: np.save(f, emb))
  _write_atomic(stem + ".json", lambda f: f.write(json.dumps(meta, indent=1).encode()))


def _compute(model, params, images: Images, image_size, batch_size, skip: bool, record_index,
             key):
  """(emb float32 [K, D] of the loadable images, dropped {position: reason})."""
  failed: dict[int, str] = {}

  def load(i):
    try:
      return load_example_image(images, i, image_size, int(record_index[i]), key)
    except DataError as e:
      if not skip:
        raise
      failed[i] = e.reason
      return np.zeros((image_size, image_size, 3), np.float32)

  embedder = Embedder(model, params, batch_size, normalize=False)
  emb = embedder.images(range(len(images)), load, desc="image cache")
  dropped = gather_failures(failed, len(images))
  keep = np.ones(len(images), bool)
  keep[list(dropped)] = False
  return np.ascontiguousarray(emb[keep], np.float32), dropped


def image_embeddings(model, params, images: Images, image_size: int, cache_dir: str | None = None,
                     batch_size: int = 64, on_error: BadRecords | str = "raise",
                     record_index=None, key: str = "image", source: str | None = None,
                     stamps=None) -> tuple[np.ndarray, np.ndarray]:
  """Raw `get_image_features` of `images` -> (emb float32 [K, D], kept int64 [K] positions).

  images: uint8 [N, H, W, 3] or N file paths (preprocessed at `image_size`). An image that
  cannot be loaded goes to the `on_error` policy (`records.BadRecords`) as a DataError
  (`source`, record index = record_index[i], default i, `key`): raised, or skipped (left out
  of `kept`). With `cache_dir`, a previous result for the same key is loaded instead of
  computed (a stored skip-mode result still raises for its dropped images under "raise").
  With several processes each loads its own block of images, so only the one holding a bad
  image raises: prefer on_error="skip" there. `stamps`: see `cache_key`.
  """
  bad = bad_records(on_error)
  n = len(images)
  record_index = np.arange(n) if record_index is None else np.asarray(record_index)
  stem = cached = None
  if cache_dir is not None:
    stem = os.path.join(cache_dir, cache_key(model, params, images, image_size, stamps))
    cached = _read_cache(stem)
    logger.info("image cache %s: %s (%s)", "hit" if cached else "miss", stem, _describe(images))
  if stem is None or not _hit_everywhere(cached):
    emb, dropped = _compute(model, params, images, image_size, batch_size, bad.skip, record_index,
                            key)
    if stem is not None:
      os.makedirs(cache_dir, exist_ok=True)
      _write_cache(stem, emb, dropped, images, image_size)
  else:
    emb, dropped = cached
  for i, reason in sorted(dropped.items()):
    where = source or ("image array" if isinstance(images, np.ndarray) else images[i])
    bad(DataError(where, f"unreadable image: {reason}", index=int(record_index[i]), key=key))
  kept = np.array([i for i in range(n) if i not in dropped], np.int64)
  return emb, kept


def embed_table(table, model, params, image_size: int, *, cache_dir: str | None = None,
                batch_size: int = 64, on_error: BadRecords | str = "raise"):
  """`table` (a pipeline table) with `image_emb` (and `distractor_emb` if it holds
  distractors) from `image_embeddings`; rows with an unloadable image dropped.

  NegShapes' two tables share one image array: with `cache_dir` the second call is a hit.
  """
  embedded, reasons = {}, {}
  for column in table.image_columns():
    key = IMAGE_COLUMNS[column].image_key
    emb, kept = image_embeddings(model, params, getattr(table, column), image_size, cache_dir,
                                 batch_size, on_error, record_index=table.record_index, key=key,
                                 source=table.source, stamps=table.file_stamps)
    embedded[column] = (emb, kept)
    for i in np.setdiff1d(np.arange(len(table)), kept):
      reasons.setdefault(int(i), f"{key} could not be loaded")
  keep = np.setdiff1d(np.arange(len(table)), list(reasons))
  return table.with_image_emb(reasons, **{
      IMAGE_COLUMNS[column].emb_field: emb[np.searchsorted(kept, keep)]
      for column, (emb, kept) in embedded.items()})
