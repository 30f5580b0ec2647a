"""Karpathy-split retrieval reader (``dataset_coco.json`` / ``dataset_flickr30k.json``).

Layout::

    {"images": [{"filename": str, "filepath": str (COCO only, e.g. "val2014"),
                 "split": "train" | "restval" | "val" | "test",
                 "sentences": [{"raw": str, ...}, ...], ...}, ...], ...}

The test split has 5,000 images for COCO and 1,000 for Flickr30k.
"""

from __future__ import annotations

import os

from negclip_jax.data.records import (
  DataError,
  RetrievalSet,
  check_images_exist,
  get_field,
  load_json,
  require_list,
  require_text,
)

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def load_karpathy(
  json_path: str | os.PathLike,
  image_root: str | os.PathLike,
  split: str = "test",
  *,
  max_captions_per_image: int | None = None,
  check_images: bool = True,
) -> RetrievalSet:
  """Images of ``split`` (file order) and all their ``sentences[].raw`` captions.

  Image path: ``image_root/filepath/filename``, or ``image_root/filename`` when the
  entry has no ``filepath`` (Flickr30k). ``max_captions_per_image`` keeps only the
  first k captions of each image (e.g. 5; a few COCO images have 6-7). Record indices
  in errors are positions in ``images``.
  """
  if split not in KARPATHY_SPLITS:
    raise ValueError(f"split must be one of {KARPATHY_SPLITS}, got {split!r}")
  if max_captions_per_image is not None and max_captions_per_image < 1:
    raise ValueError(f"max_captions_per_image must be >= 1, got {max_captions_per_image}")
  data = load_json(json_path)
  images = require_list(
    json_path, get_field(json_path, data, "images", index=None), index=None, key="images"
  )
  root = os.fspath(image_root)

  image_paths: list[str] = []
  image_indices: list[int] = []
  captions: list[str] = []
  caption_to_image: list[int] = []
  for i, image in enumerate(images):
    image_split = get_field(json_path, image, "split", index=i)
    if image_split not in KARPATHY_SPLITS:
      raise DataError(
        json_path,
        f"unknown split {image_split!r}, expected one of {KARPATHY_SPLITS}",
        index=i,
        key="split",
      )
    if image_split != split:
      continue
    filename = require_text(
      json_path, get_field(json_path, image, "filename", index=i), index=i, key="filename"
    )
    parts = [root, filename]
    if "filepath" in image:
      parts.insert(1, require_text(json_path, image["filepath"], index=i, key="filepath"))
    sentences = require_list(
      json_path, get_field(json_path, image, "sentences", index=i), index=i, key="sentences"
    )
    if not sentences:
      raise DataError(json_path, "image has no sentences", index=i, key="sentences")
    for j, sentence in enumerate(sentences[:max_captions_per_image]):
      key = f"sentences[{j}].raw"
      captions.append(
        require_text(
          json_path, get_field(json_path, sentence, "raw", index=i, label=key), index=i, key=key
        )
      )
      caption_to_image.append(len(image_paths))
    image_paths.append(os.path.join(*parts))
    image_indices.append(i)
  if not image_paths:
    raise DataError(json_path, f"no images in split {split!r}", key="split")
  if check_images:
    check_images_exist(json_path, image_paths, image_indices)
  return RetrievalSet(image_paths, captions, caption_to_image)
