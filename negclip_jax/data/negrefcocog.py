"""NegRefCOCOg reader: negated referring expressions over COCO train2014 images.

Layout: a JSON list of
``{"image": str, "phrase": str, "ref_bbox": [x, y, w, h], "bbox_list": [[x, y, w, h], ...]}``
where ``image`` is a file name relative to the image directory and boxes are in pixels.
"""

from __future__ import annotations

import math
import os

from negclip_jax.data.records import (
  Box,
  DataError,
  RefRecord,
  check_images_exist,
  get_field,
  load_json,
  require_list,
  require_text,
  resolve_path,
)


def _box(file: str | os.PathLike, value: object, *, index: int, key: str) -> Box:
  """``[x, y, w, h]`` of finite numbers with ``w, h > 0``, as a tuple of floats."""
  if (
    not isinstance(value, list)
    or len(value) != 4
    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    or not all(math.isfinite(v) for v in value)
  ):
    raise DataError(
      file, f"expected [x, y, w, h] of 4 finite numbers, got {value!r}", index=index, key=key
    )
  x, y, w, h = (float(v) for v in value)
  if w <= 0 or h <= 0:
    raise DataError(file, f"box width and height must be > 0, got {value!r}", index=index, key=key)
  return x, y, w, h


def load_negrefcocog(
  json_path: str | os.PathLike,
  image_dir: str | os.PathLike,
  *,
  check_images: bool = True,
  require_ref: bool = True,
) -> list[RefRecord]:
  """One ``RefRecord`` per entry, in file order.

  With ``require_ref`` a ``ref_bbox`` that does not occur in ``bbox_list`` is a
  DataError; without, it is kept (the original script then counts it wrong).
  """
  entries = require_list(json_path, load_json(json_path), index=None, key="<top level>")
  records = []
  for i, entry in enumerate(entries):
    image = require_text(
      json_path, get_field(json_path, entry, "image", index=i), index=i, key="image"
    )
    phrase = require_text(
      json_path, get_field(json_path, entry, "phrase", index=i), index=i, key="phrase"
    )
    ref_bbox = _box(
      json_path, get_field(json_path, entry, "ref_bbox", index=i), index=i, key="ref_bbox"
    )
    raw_list = require_list(
      json_path, get_field(json_path, entry, "bbox_list", index=i), index=i, key="bbox_list"
    )
    bbox_list = tuple(
      _box(json_path, b, index=i, key=f"bbox_list[{j}]") for j, b in enumerate(raw_list)
    )
    if require_ref and ref_bbox not in bbox_list:
      raise DataError(
        json_path, f"ref_bbox {list(ref_bbox)} is not one of bbox_list", index=i, key="ref_bbox"
      )
    records.append(RefRecord(resolve_path(image, image_dir), phrase, ref_bbox, bbox_list))
  if check_images:
    check_images_exist(json_path, [r.image_path for r in records])
  return records
