"""Read an already-prepared TFDS image-caption dataset from a local ``data_dir``.

Nothing is ever downloaded or generated here. ``coco_captions`` (config ``2014``)
holds the Karpathy splits (``test`` = the COCO 5k test set); prepare it on a machine
with internet with ``tfds build coco_captions --data_dir DIR`` and copy ``DIR``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from negclip_jax import storage
from negclip_jax.data.records import DataError


def _key_path(key: str | Sequence[str]) -> tuple[str, ...]:
  return (key,) if isinstance(key, str) else tuple(key)


def feature_at(builder, path: tuple[str, ...]):
  """The TFDS feature at a nested key path, else DataError listing what exists."""
  feature = builder.info.features
  for depth, k in enumerate(path):
    keys = list(feature.keys()) if hasattr(feature, "keys") else []
    if k not in keys:
      raise DataError(
        builder.data_dir,
        f"feature {'/'.join(path[: depth + 1])!r} not found; available at this level: {keys}",
        key="/".join(path),
      )
    feature = feature[k]
  return feature


def prepared_builder(name: str, data_dir: str | os.PathLike, how: str | None = None):
  """The TFDS builder of ``name`` prepared under ``data_dir``, else DataError saying `how`
  to prepare it (default: ``tfds build`` on a machine with internet access)."""
  import tensorflow_datasets as tfds

  data_dir = os.fspath(data_dir)
  if not storage.isdir(data_dir):
    raise DataError(data_dir, "TFDS data_dir does not exist")
  how = how or (
    f"prepare it on a machine with internet access with "
    f"`tfds build {name} --data_dir {data_dir}` and copy that directory here"
  )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise DataError(
      data_dir,
      f"TFDS dataset {name!r} is neither a registered TFDS dataset "
      f"nor prepared in this data_dir; {how}",
    ) from e
  except (AssertionError, ValueError) as e:  # unknown config or version
    raise DataError(data_dir, f"cannot open TFDS dataset {name!r}: {str(e).splitlines()[0]}") from e
  if not builder.is_prepared():
    raise DataError(
      builder.data_dir,
      f"TFDS dataset {builder.info.full_name!r} (version "
      f"{builder.info.version}) is not prepared under data_dir {data_dir!r}; "
      f"{how}",
    )
  return builder


def load_tfds_captions(
  name: str = "coco_captions",
  split: str = "test",
  *,
  data_dir: str | os.PathLike,
  image_key: str | Sequence[str] = "image",
  caption_key: str | Sequence[str] = ("captions", "text"),
) -> Iterator[tuple[np.ndarray, list[str]]]:
  """Yield ``(image uint8[H, W, 3], captions)`` per example of a prepared TFDS split.

  ``name`` may carry a config/version (``"coco_captions/2014:1.1.0"``); keys are
  nested feature paths. Checks run before the iterator is returned, so a missing or
  unprepared dataset raises DataError at call time. Example order is TFDS's
  deterministic order (``shuffle_files=False``), not the original file order.
  """
  import tensorflow_datasets as tfds  # Heavy import, only needed here.

  builder = prepared_builder(name, data_dir)
  image_path, caption_path = _key_path(image_key), _key_path(caption_key)
  image_feature = feature_at(builder, image_path)
  if not (
    isinstance(image_feature, tfds.features.Image)
    and image_feature.np_dtype == np.uint8
    and image_feature.shape[-1] == 3
  ):
    raise DataError(
      builder.data_dir,
      f"expected a uint8 RGB Image feature, got {image_feature!r}",
      key="/".join(image_path),
    )
  caption_feature = feature_at(builder, caption_path)
  while isinstance(caption_feature, tfds.features.Sequence):
    caption_feature = caption_feature.feature
  if not isinstance(caption_feature, tfds.features.Text):
    raise DataError(
      builder.data_dir,
      f"expected a Text feature, got {caption_feature!r}",
      key="/".join(caption_path),
    )
  try:
    dataset = builder.as_dataset(split=split, shuffle_files=False)
  except ValueError as e:
    raise DataError(
      builder.data_dir,
      f"cannot read split {split!r} (available: {sorted(builder.info.splits)}): {e}",
    ) from e

  def examples() -> Iterator[tuple[np.ndarray, list[str]]]:
    for i, example in enumerate(tfds.as_numpy(dataset)):
      image, text = example, example
      for k in image_path:
        image = image[k]
      for k in caption_path:
        text = text[k]
      captions = [t.decode("utf-8") for t in np.atleast_1d(text)]
      if not captions or not all(c.strip() for c in captions):
        raise DataError(
          builder.data_dir,
          f"empty caption list or caption in split {split!r}",
          index=i,
          key="/".join(caption_path),
        )
      yield image, captions

  return examples()


def load_tfds_images(
  name: str,
  split: str = "test",
  *,
  data_dir: str | os.PathLike | None = None,
  image_key: str = "image",
  label_key: str = "label",
) -> tuple[Iterator[tuple[np.ndarray, int, str]], list[str], int]:
  """``(examples, label names, count)`` of a labelled image split.

  ``name`` is a TFDS dataset prepared under ``data_dir`` (``imagenet2012``,
  ``cifar100``, ...) or, with ``data_dir`` None, an image folder
  ``name/<split>/<label>/<image>`` read by TFDS's ``ImageFolder``, or a plain
  ``name/<label>/<image>`` folder (no split level; `split` is then not used). ``examples`` yields
  ``(image uint8[H, W, 3], label index, key)``: the key is the file name where the
  dataset records one (``image/filename``), else the example index. TFDS's
  deterministic order (``shuffle_files=False``).
  """
  import tensorflow_datasets as tfds

  if data_dir is None and storage.isdir(name) and _class_folders(name):
    return _read_class_folders(name, _class_folders(name))
  if data_dir is None:
    if not storage.isdir(name):
      raise DataError(
        name,
        "not an image folder (<split>/<label>/<image>); for a TFDS "
        "dataset name also give its data_dir",
      )
    builder = tfds.folder_dataset.ImageFolder(os.fspath(name))
  else:
    builder = prepared_builder(name, data_dir)
  image_feature = feature_at(builder, (image_key,))
  if not (
    isinstance(image_feature, tfds.features.Image)
    and image_feature.np_dtype == np.uint8
    and image_feature.shape[-1] in (None, 3)
  ):
    raise DataError(
      builder.data_dir, f"expected a uint8 RGB Image feature, got {image_feature!r}", key=image_key
    )
  label_feature = feature_at(builder, (label_key,))
  if not isinstance(label_feature, tfds.features.ClassLabel):
    raise DataError(
      builder.data_dir, f"expected a ClassLabel feature, got {label_feature!r}", key=label_key
    )
  try:
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    count = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise DataError(
      builder.data_dir, f"cannot read split {split!r} (available: {sorted(builder.info.splits)})"
    ) from e

  def examples() -> Iterator[tuple[np.ndarray, int, str]]:
    for i, example in enumerate(tfds.as_numpy(dataset)):
      key = example.get("image/filename", str(i))
      yield (
        example[image_key],
        int(example[label_key]),
        key.decode("utf-8") if isinstance(key, bytes) else key,
      )

  return examples(), list(label_feature.names), count


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what TFDS's ImageFolder reads


def _class_folders(name: str) -> dict[str, list]:
  """{label: sorted image files} of a plain ``name/<label>/<image>`` folder: every
  subfolder holds images and no subfolder of its own; {} for any other layout."""
  subdirs = sorted(p for p in storage.path(name).iterdir() if p.is_dir())
  out = {}
  for sub in subdirs:
    entries = list(sub.iterdir())
    if any(e.is_dir() for e in entries):
      return {}
    out[sub.name] = sorted(e for e in entries if e.suffix.lower() in IMAGE_SUFFIXES)
  return out if any(out.values()) else {}


def _read_class_folders(name: str, classes: dict[str, list]):
  """`load_tfds_images`'s triple for a plain class folder: labels in sorted folder order
  (as ImageFolder numbers them), images in sorted file order, keys the file paths."""
  from PIL import Image, UnidentifiedImageError

  files = [(path, label) for label, paths in enumerate(classes.values()) for path in paths]

  def examples() -> Iterator[tuple[np.ndarray, int, str]]:
    for path, label in files:
      try:
        with path.open("rb") as f, Image.open(f) as image:
          pixels = np.asarray(image.convert("RGB"))
      except (OSError, UnidentifiedImageError) as e:
        raise DataError(os.fspath(path), f"not a readable image ({e})") from e
      yield pixels, label, os.fspath(path)

  return examples(), list(classes), len(files)
