"""NegationCLIP's negation-augmented COCO captions (COCO-captions JSON + ``updated_caption``).

Layout::

    {"images":      [{"id": int, "file_name": str, ...}, ...],
     "annotations": [{"image_id": int, "caption": str, "updated_caption": str, ...}, ...]}
"""

from __future__ import annotations

import os

from negclip_jax.data.records import (
  AbsenceRecord,
  BadRecords,
  DataError,
  check_images_exist,
  get_field,
  load_json,
  require_list,
  require_text,
  resolve_path,
)


def coco_image_paths(
  json_path: str | os.PathLike, image_dir: str | os.PathLike, data=None
) -> dict[int, str]:
  """COCO image id -> ``image_dir/file_name`` (an absolute ``file_name`` is kept), from
  the ``images`` list of a COCO annotation file (``data``: that file, already parsed)."""
  data = load_json(json_path) if data is None else data
  images = require_list(
    json_path, get_field(json_path, data, "images", index=None), index=None, key="images"
  )
  id_to_path: dict[int, str] = {}
  for i, image in enumerate(images):
    image_id = get_field(json_path, image, "id", index=i, label="images.id")
    if not isinstance(image_id, int) or isinstance(image_id, bool):
      raise DataError(
        json_path, f"expected an integer id, got {image_id!r}", index=i, key="images.id"
      )
    if image_id in id_to_path:
      raise DataError(json_path, f"duplicate image id {image_id}", index=i, key="images.id")
    file_name = require_text(
      json_path,
      get_field(json_path, image, "file_name", index=i, label="images.file_name"),
      index=i,
      key="images.file_name",
    )
    id_to_path[image_id] = resolve_path(file_name, image_dir)
  return id_to_path


def load_coco_negation(
  json_path: str | os.PathLike,
  image_dir: str | os.PathLike,
  *,
  check_images: bool = True,
  bad: BadRecords | None = None,
) -> list[AbsenceRecord]:
  """One ``AbsenceRecord(image_path, caption, updated)`` per annotation, in file order.

  ``image_path`` is ``image_dir/file_name`` (an absolute ``file_name`` is kept).
  Record indices in errors are positions in ``annotations`` (or ``images`` when the
  key is an image field). An annotation that cannot be parsed goes to ``bad`` (default:
  raise); each record's ``index`` is its position in ``annotations``.
  """
  bad = bad or BadRecords()
  data = load_json(json_path)
  id_to_path = coco_image_paths(json_path, image_dir, data)
  annotations = require_list(
    json_path, get_field(json_path, data, "annotations", index=None), index=None, key="annotations"
  )

  def parse(i, ann):
    image_id = get_field(json_path, ann, "image_id", index=i)
    known = isinstance(image_id, int) and not isinstance(image_id, bool)
    if not known or image_id not in id_to_path:
      raise DataError(json_path, f"unknown image_id {image_id!r}", index=i, key="image_id")
    return AbsenceRecord(
      image_path=id_to_path[image_id],
      caption=require_text(
        json_path, get_field(json_path, ann, "caption", index=i), index=i, key="caption"
      ),
      updated=require_text(
        json_path,
        get_field(json_path, ann, "updated_caption", index=i),
        index=i,
        key="updated_caption",
      ),
      index=i,
    )

  records = [bad.parse(parse, i, ann) for i, ann in enumerate(annotations)]
  records = [r for r in records if r is not None]
  if check_images:
    check_images_exist(json_path, [r.image_path for r in records])
  return records
