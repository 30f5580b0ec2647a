"""NegBench CSV readers (multiple-choice and retrieval).

MCQ CSV columns: ``image_path, correct_answer, caption_0, caption_1, caption_2, caption_3,
correct_answer_template`` (``correct_answer`` is the index 0-3 of the right caption).
Binary MCQ CSV columns: ``image_path, correct_answer, caption_0, caption_1`` (answer 0 or 1;
read as ``McqRecord`` with an empty template).
Retrieval CSV columns: ``filepath, captions`` where ``captions`` is a Python list literal
of strings, e.g. ``"['A dog.', 'No cat is present.']"``. Extra columns are ignored.
Record indices in errors are 0-based data rows (the header is not counted).
"""

from __future__ import annotations

import ast
import csv
import itertools
import os
from collections.abc import Iterator

from negclip_jax import storage
from negclip_jax.data.records import (
  DataError,
  McqRecord,
  RetrievalSet,
  check_images_exist,
  not_utf8,
  require_text,
  resolve_path,
)

MCQ_COLUMNS = (
  "image_path",
  "correct_answer",
  "caption_0",
  "caption_1",
  "caption_2",
  "caption_3",
  "correct_answer_template",
)
BINARY_MCQ_COLUMNS = ("image_path", "correct_answer", "caption_0", "caption_1")
RETRIEVAL_COLUMNS = ("filepath", "captions")


def _rows(csv_path: str | os.PathLike, columns: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
  """``(row index, row dict)`` for each data row; DataError if a column is missing."""
  with storage.open(csv_path, encoding="utf-8-sig", newline="") as f:
    reader = csv.DictReader(f)
    try:
      header = reader.fieldnames or []
    except UnicodeDecodeError as e:
      raise not_utf8(csv_path, e) from e
    missing = [c for c in columns if c not in header]
    if missing:
      raise DataError(csv_path, f"missing columns {missing}; header is {header}", key=missing[0])
    rows = iter(reader)
    for i in itertools.count():
      try:
        row = next(rows)
      except StopIteration:
        return
      except csv.Error as e:
        raise DataError(csv_path, f"malformed CSV: {e}", index=i) from e
      except UnicodeDecodeError as e:
        raise not_utf8(csv_path, e, index=i) from e
      if None in row or any(row[c] is None for c in columns):
        raise DataError(
          csv_path, f"number of fields differs from the header's {len(header)}", index=i
        )
      yield i, row


def load_negbench_mcq(
  csv_path: str | os.PathLike,
  image_root: str | os.PathLike,
  *,
  check_images: bool = True,
  num_options: int = 4,
) -> list[McqRecord]:
  """One ``McqRecord`` per row, in file order (template string kept as given).

  ``num_options=2`` reads a binary MCQ CSV (no template column; template ``""``).
  """
  if num_options not in (2, 4):
    raise ValueError(f"num_options must be 2 or 4, got {num_options}")
  columns = MCQ_COLUMNS if num_options == 4 else BINARY_MCQ_COLUMNS
  answers = tuple(str(k) for k in range(num_options))
  records = []
  for i, row in _rows(csv_path, columns):
    answer = row["correct_answer"].strip()
    if answer not in answers:
      raise DataError(
        csv_path,
        f"expected an integer 0-{num_options - 1}, got {row['correct_answer']!r}",
        index=i,
        key="correct_answer",
      )
    records.append(
      McqRecord(
        image_path=resolve_path(
          require_text(csv_path, row["image_path"], index=i, key="image_path"), image_root
        ),
        captions=tuple(
          require_text(csv_path, row[f"caption_{k}"], index=i, key=f"caption_{k}")
          for k in range(num_options)
        ),
        correct=int(answer),
        template=row["correct_answer_template"] if num_options == 4 else "",
      )
    )
  if not records:
    raise DataError(csv_path, "no data rows")
  if check_images:
    check_images_exist(csv_path, [r.image_path for r in records])
  return records


def _parse_captions(csv_path: str | os.PathLike, text: str, *, index: int) -> list[str]:
  """Parse a list-of-strings literal with ``ast.literal_eval`` (never ``eval``)."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
    raise DataError(
      csv_path,
      f"not a Python list literal ({type(e).__name__}): {text[:80]!r}",
      index=index,
      key="captions",
    ) from e
  if not isinstance(value, list) or not value:
    raise DataError(
      csv_path,
      f"expected a non-empty list of strings, got {text[:80]!r}",
      index=index,
      key="captions",
    )
  return [require_text(csv_path, c, index=index, key=f"captions[{j}]") for j, c in enumerate(value)]


def load_negbench_retrieval(
  csv_path: str | os.PathLike, image_root: str | os.PathLike, *, check_images: bool = True
) -> RetrievalSet:
  """One gallery image per row (rows are not merged), with that row's captions."""
  image_paths: list[str] = []
  captions: list[str] = []
  caption_to_image: list[int] = []
  for i, row in _rows(csv_path, RETRIEVAL_COLUMNS):
    path = require_text(csv_path, row["filepath"], index=i, key="filepath")
    row_captions = _parse_captions(csv_path, row["captions"], index=i)
    captions.extend(row_captions)
    caption_to_image.extend([i] * len(row_captions))
    image_paths.append(resolve_path(path, image_root))
  if not image_paths:
    raise DataError(csv_path, "no data rows")
  if check_images:
    check_images_exist(csv_path, image_paths)
  return RetrievalSet(image_paths, captions, caption_to_image)
