"""Plain-Python records produced by the dataset readers, plus shared validation.

Readers in this package parse annotation files into the frozen dataclasses below;
they never decode images (that is the input pipeline's job) and never drop bad
records silently: every problem raises :class:`DataError`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from negclip_jax import storage

Box = tuple[float, float, float, float]
"""Pixel box ``(x, y, w, h)``: top-left corner, width, height (COCO convention)."""

logger = logging.getLogger(__name__)

_MAX_MISSING_SHOWN = 5


class DataError(ValueError):
  """A dataset file is malformed or refers to missing data.

  The message starts with the file, then the 0-based record index and the key at
  fault when known, e.g. ``"ann.json, record 3, key 'caption': empty string"``.
  The parts are also kept as attributes ``file``, ``index`` and ``key``.
  """

  def __init__(
    self, file: str | os.PathLike, message: str, *, index: int | None = None, key: str | None = None
  ):
    self.file = os.fspath(file)
    self.index = index
    self.key = key
    self.reason = message
    where = [self.file]
    if index is not None:
      where.append(f"record {index}")
    if key is not None:
      where.append(f"key {key!r}")
    super().__init__(f"{', '.join(where)}: {message}")


ON_ERROR = ("raise", "skip")


class BadRecords:
  """The bad-record policy, in one place: what happens to a record that cannot be used.

  ``on_error="raise"`` raises the DataError; ``"skip"`` drops the record: it is kept in
  ``skipped``, the first few are named in the log, and `write` lists every one as a JSON
  line ``{"file", "record", "key", "reason"}`` (the run's ``WORKDIR/skipped.jsonl``).
  Readers report per-record parse errors here; the training tables report empty texts
  and missing or undecodable images (`pipeline.validate`, `image_cache`).
  """

  SHOWN = 5

  def __init__(self, on_error: str = "raise"):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    self.on_error = on_error
    self.skipped: list[DataError] = []

  @property
  def skip(self) -> bool:
    return self.on_error == "skip"

  def __call__(self, error: DataError) -> None:
    """Raises `error`, or records it as skipped."""
    if not self.skip:
      raise error
    self.skipped.append(error)
    if len(self.skipped) <= self.SHOWN:
      logger.warning("skipping: %s", error)

  def parse(self, parse, *args):
    """``parse(*args)``, or None when it raises a DataError that this policy skips."""
    try:
      return parse(*args)
    except DataError as e:
      self(e)
      return None

  def write(self, path: str | os.PathLike) -> None:
    """Writes every skipped record to `path` (JSON lines, local or ``gs://``); removes
    `path` if there are none."""
    if not self.skipped:
      if storage.isfile(path):
        storage.path(path).unlink()
      return
    storage.write_atomic(
      path,
      "".join(
        json.dumps({"file": e.file, "record": e.index, "key": e.key, "reason": e.reason}) + "\n"
        for e in self.skipped
      ).encode(),
    )

  def summary(self) -> str:
    """One line: how many records were skipped, per file."""
    per_file: dict[str, int] = {}
    for e in self.skipped:
      per_file[e.file] = per_file.get(e.file, 0) + 1
    return (
      f"skipped {len(self.skipped)} bad records ("
      + ", ".join(f"{n} in {f}" for f, n in per_file.items())
      + ")"
    )


@dataclass(frozen=True)
class PresenceRecord:
  """CC-Neg sample: an image, its true caption and a negated (false) caption.

  ``distractor_path``, when set, is an image for which ``negated`` is true (CoN-CLIP's
  distractor image, used by the ``conclip`` objective).
  """

  image_path: str
  caption: str
  negated: str
  distractor_path: str | None = None
  index: int | None = field(default=None, compare=False, kw_only=True)  # record in its file


@dataclass(frozen=True)
class AbsenceRecord:
  """NegationCLIP COCO sample: original caption and its negation-augmented update."""

  image_path: str
  caption: str
  updated: str
  index: int | None = field(default=None, compare=False, kw_only=True)  # record in its file


@dataclass(frozen=True)
class RefRecord:
  """NegRefCOCOg sample: a phrase referring to ``ref_bbox``, one of ``bbox_list``.

  Boxes are ``(x, y, w, h)`` in pixels of the original image.
  """

  image_path: str
  phrase: str
  ref_bbox: Box
  bbox_list: tuple[Box, ...]

  @property
  def ref_index(self) -> int:
    """Position of ``ref_bbox`` in ``bbox_list`` (first match)."""
    return self.bbox_list.index(self.ref_bbox)


@dataclass(frozen=True)
class McqRecord:
  """NegBench multiple-choice sample: 4 candidate captions, index of the right one."""

  image_path: str
  captions: tuple[str, ...]
  correct: int
  template: str


@dataclass(frozen=True)
class RetrievalSet:
  """Image-text retrieval gallery.

  ``captions[j]`` describes ``image_paths[caption_to_image[j]]``. Sequences are
  stored as tuples (lists are accepted and converted).
  """

  image_paths: tuple[str, ...]
  captions: tuple[str, ...]
  caption_to_image: tuple[int, ...]

  def __post_init__(self):
    for name in ("image_paths", "captions", "caption_to_image"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if len(self.captions) != len(self.caption_to_image):
      raise ValueError(
        f"{len(self.captions)} captions but {len(self.caption_to_image)} caption_to_image entries"
      )
    n = len(self.image_paths)
    bad = [i for i in self.caption_to_image if not 0 <= i < n]
    if bad:
      raise ValueError(f"caption_to_image has indices outside [0, {n}): {bad[:5]}")

  @cached_property
  def image_to_captions(self) -> tuple[tuple[int, ...], ...]:
    """For each image, the indices of its captions in increasing order."""
    out: list[list[int]] = [[] for _ in self.image_paths]
    for j, i in enumerate(self.caption_to_image):
      out[i].append(j)
    return tuple(tuple(c) for c in out)


def resolve_path(path: str, root: str | os.PathLike) -> str:
  """Absolute ``path`` is kept as is; a relative one is joined to ``root``."""
  return path if storage.is_absolute(path) else os.path.join(os.fspath(root), path)


def check_images_exist(
  file: str | os.PathLike, image_paths: Sequence[str], indices: Sequence[int] | None = None
) -> None:
  """Raise DataError (count + first few, with record indices) if any path is missing.

  ``indices[k]`` is the record index reported for ``image_paths[k]`` (default ``k``).
  """
  unique = list(dict.fromkeys(image_paths))
  exists = dict(zip(unique, storage.files_exist(unique)))
  missing = [
    (k if indices is None else indices[k], p) for k, p in enumerate(image_paths) if not exists[p]
  ]
  if missing:
    shown = "; ".join(f"record {i}: {p}" for i, p in missing[:_MAX_MISSING_SHOWN])
    raise DataError(
      file,
      f"{len(missing)} of {len(image_paths)} image paths do not exist "
      f"(first {min(len(missing), _MAX_MISSING_SHOWN)}: {shown}); check the "
      "image root, or pass check_images=False to skip this check",
    )


def get_field(
  file: str | os.PathLike, obj: Any, key: str, *, index: int | None, label: str | None = None
) -> Any:
  """``obj[key]`` for a JSON-like mapping, else DataError naming ``label`` (default ``key``)."""
  label = key if label is None else label
  if not isinstance(obj, Mapping):
    raise DataError(
      file, f"expected an object holding this key, got {type(obj).__name__}", index=index, key=label
    )
  if key not in obj:
    raise DataError(file, "missing key", index=index, key=label)
  return obj[key]


def require_text(file: str | os.PathLike, value: Any, *, index: int | None, key: str) -> str:
  """Return ``value`` if it is a string with non-whitespace content, else DataError."""
  if not isinstance(value, str):
    raise DataError(file, f"expected a string, got {type(value).__name__}", index=index, key=key)
  if not value.strip():
    raise DataError(file, "empty string", index=index, key=key)
  return value


def require_list(file: str | os.PathLike, value: Any, *, index: int | None, key: str) -> list:
  """Return ``value`` if it is a list, else DataError."""
  if not isinstance(value, list):
    raise DataError(file, f"expected a list, got {type(value).__name__}", index=index, key=key)
  return value


def not_utf8(
  file: str | os.PathLike,
  error: UnicodeDecodeError,
  *,
  index: int | None = None,
  line: int | None = None,
) -> DataError:
  """DataError for bytes of `file` (on 1-based `line`, when known) that are not UTF-8."""
  bad = error.object[error.start : error.start + 1]
  where = f" on line {line}" if line is not None else ""
  return DataError(file, f"not UTF-8 text{where} ({error.reason}: {bad!r})", index=index)


def load_json(file: str | os.PathLike) -> Any:
  """Parse a UTF-8 JSON file; syntax and encoding errors become DataError."""
  with storage.open(file, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(file, f"invalid JSON: {e}") from e
    except UnicodeDecodeError as e:
      raise not_utf8(file, e) from e
