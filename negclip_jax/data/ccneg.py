"""CC-Neg reader (CoN-CLIP's ``ccneg_preprocessed.pt``, or its JSONL conversion).

``.pt`` layout (a ``torch.save``-d dict)::

    {"image_paths": [str, ...],                  # N paths under /workspace/datasets/cc3m/
     "annotations": [{"json": {"caption": str, ...},
                      "sop_data": {"negative-prompt": str, ...}, ...}, ...]}   # N

``.jsonl`` layout: one ``{"image_path", "caption", "negative_prompt"}`` object per line,
with the same raw values as the ``.pt`` (paths not rewritten, commas kept).

Distractor images (CoN-CLIP's objective): ``distractor_image_mapping.pt`` is a
``torch.save``-d list with one entry per CC-Neg record (file order): the indices of its
top-k COCO train2017 images, best first (a list of ints or a 1-D tensor; the whole list
may also be one [N, k] tensor). Index j is the j-th image of ``captions_train2017.json``
in increasing id order (torchvision's ``CocoCaptions``); the top-1 image is used.

Evaluation extras (CoN-CLIP ``src/data/evaluation_datasets.py``): the ``.pt`` may hold
``"num_ops": {k: [file index, ...]}`` (records with k object-predicate pairs; a list
indexed by k is accepted too), read by :func:`load_num_ops`. CC-Neg mode 2 is a separate
``.pt``: ``{"image_paths_positive": [[str, ...], ...], "image_paths_negative": [[str,
...], ...], "labels": [{"positive_prompt": str, "negated_prompt": str, ...}, ...]}``
(the first path of each list is used), read by :func:`load_ccneg2`.

CLI: ``python -m negclip_jax.data.ccneg convert IN.pt OUT.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from typing import Literal, Sequence

from negclip_jax import storage
from negclip_jax.data.coco_negation import coco_image_paths
from negclip_jax.data.records import (
  BadRecords,
  DataError,
  PresenceRecord,
  check_images_exist,
  get_field,
  not_utf8,
  require_list,
  require_text,
  resolve_path,
)

CCNEG_SOURCE_PREFIX = "/workspace/datasets/cc3m/"
"""Prefix of the image paths stored in the released ``ccneg_preprocessed.pt``."""

CCNEG_EVAL_SIZE = 40000
"""The last 40,000 samples of CC-Neg are its evaluation split."""

_RawRecord = tuple[str, str, str]  # (image_path as stored, caption, negative prompt with commas)

logger = logging.getLogger(__name__)


_JSONL_HINT = (
  'convert it yourself to JSONL (one {"image_path", "caption", '
  '"negative_prompt"} object per line; see docs/data_formats.md) and load that'
)


def _load_pt(path: str, hint: str = _JSONL_HINT) -> object:
  """`negclip_jax.torch_io.load` (the safe loader); DataError naming the file if it refuses."""
  from negclip_jax import torch_io

  try:
    return torch_io.load(path, hint=hint)
  except torch_io.UnreadableTorchFileError as e:
    raise DataError(e.file, e.reason) from e


def _read_pt(path: str, bad: BadRecords) -> list[_RawRecord | None]:
  data = _load_pt(path)
  image_paths = require_list(
    path, get_field(path, data, "image_paths", index=None), index=None, key="image_paths"
  )
  annotations = require_list(
    path, get_field(path, data, "annotations", index=None), index=None, key="annotations"
  )
  if len(image_paths) != len(annotations):
    raise DataError(
      path,
      f"{len(image_paths)} image_paths but {len(annotations)} annotations",
      key="image_paths/annotations",
    )

  def parse(i, image_path, ann):
    caption = get_field(
      path, get_field(path, ann, "json", index=i), "caption", index=i, label="json.caption"
    )
    negative = get_field(
      path,
      get_field(path, ann, "sop_data", index=i),
      "negative-prompt",
      index=i,
      label="sop_data.negative-prompt",
    )
    return (
      require_text(path, image_path, index=i, key="image_paths"),
      require_text(path, caption, index=i, key="json.caption"),
      require_text(path, negative, index=i, key="sop_data.negative-prompt"),
    )

  return [
    bad.parse(parse, i, image_path, ann)
    for i, (image_path, ann) in enumerate(zip(image_paths, annotations))
  ]


def _read_jsonl(path: str, bad: BadRecords) -> list[_RawRecord | None]:
  """One record per non-blank line, each decoded on its own: a line that is not UTF-8 or
  not JSON is that record's DataError (naming the line), not the file's."""

  def parse(i, line_no, line):
    try:
      obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise not_utf8(path, e, index=i, line=line_no) from e
    except json.JSONDecodeError as e:
      raise DataError(path, f"invalid JSON on line {line_no}: {e}", index=i) from e
    return tuple(
      require_text(path, get_field(path, obj, key, index=i), index=i, key=key)
      for key in ("image_path", "caption", "negative_prompt")
    )

  out = []
  with storage.open(path, "rb") as f:
    for line_no, line in enumerate(f, start=1):
      if line.strip():
        out.append(bad.parse(parse, len(out), line_no, line))
  return out


def _read_raw(path: str, bad: BadRecords | None = None) -> list[_RawRecord | None]:
  """The file's records in order; None for each one `bad` skipped."""
  bad = bad or BadRecords()
  if path.endswith(".pt"):
    return _read_pt(path, bad)
  if path.endswith(".jsonl"):
    return _read_jsonl(path, bad)
  raise DataError(path, "unsupported extension; expected .pt or .jsonl")


def strip_commas(text: str) -> str:
  """A caption as CoN-CLIP embeds negated captions: commas removed."""
  return text.replace(",", "")


def held_out(path: str, n: int, eval_size: int, split: str) -> int:
  """The records the eval split holds: `eval_size`, or for a file of at most `eval_size`
  records (a small file under the paper's 40000 default) all `n` of them for ``"eval"`` and
  none for ``"train"`` (training uses the whole file), with a warning naming the option."""
  if eval_size < 0:
    raise DataError(path, f"eval_size={eval_size} must be >= 0 (--eval-size, data.ccneg_eval_size)")
  if eval_size < n:
    return eval_size
  held = n if split == "eval" else 0
  logger.warning(
    "%s: eval_size=%d >= its %d records: the %s split uses all %d (nothing is held out); "
    "set --eval-size (negclip-eval) or config.data.ccneg_eval_size (training) below %d to "
    "hold the last records out",
    path,
    eval_size,
    n,
    split,
    n,
    n,
  )
  return held


def load_ccneg(
  path: str | os.PathLike,
  image_root: str | os.PathLike,
  split: Literal["train", "eval", "all"] = "train",
  eval_size: int = CCNEG_EVAL_SIZE,
  *,
  source_prefix: str = CCNEG_SOURCE_PREFIX,
  check_images: bool = True,
  distractor_paths: Sequence[str] | None = None,
  keep_commas: bool = False,
  bad: BadRecords | None = None,
) -> list[PresenceRecord]:
  """Load CC-Neg as ``PresenceRecord(image_path, caption, negated)``, in file order.

  ``distractor_paths[i]`` (from :func:`load_distractor_paths`) becomes the
  ``distractor_path`` of file record i; it must cover every selected record.

  Image paths starting with ``source_prefix`` have it replaced by ``image_root``;
  other relative paths are joined to ``image_root``, other absolute paths are kept.
  Commas are removed from the negated caption (as the original CoN-CLIP code does)
  unless ``keep_commas`` (then apply :func:`strip_commas` before embedding).
  The last ``eval_size`` records form ``"eval"``, the rest ``"train"`` (``eval_size``
  is ignored for ``"all"``); a file of at most ``eval_size`` records is used whole by
  both, with a warning (`held_out`). A record that cannot be parsed goes to ``bad`` (default:
  raise); the splits are by position in the file, so skipping does not move them.
  Each record's ``index`` is its position in the file.
  """
  path = os.fspath(path)
  if split not in ("train", "eval", "all"):
    raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
  raw = _read_raw(path, bad)
  if split == "all":
    selected = raw
  else:
    eval_size = held_out(path, len(raw), eval_size, split)
    cut = len(raw) - eval_size
    selected = raw[:cut] if split == "train" else raw[cut:]

  first = len(raw) - eval_size if split == "eval" else 0
  if distractor_paths is not None and len(distractor_paths) < first + len(selected):
    raise DataError(
      path,
      f"the distractor mapping has {len(distractor_paths)} entries; the "
      f"{split!r} split needs one for each of records {first}.."
      f"{first + len(selected) - 1}",
    )
  root = os.fspath(image_root)
  records = []
  for i, parsed in enumerate(selected, start=first):
    if parsed is None:  # skipped by `bad`
      continue
    image_path, caption, negative = parsed
    if image_path.startswith(source_prefix):
      image_path = os.path.join(root, image_path[len(source_prefix) :])
    else:
      image_path = resolve_path(image_path, root)
    distractor = None if distractor_paths is None else distractor_paths[i]
    negated = negative if keep_commas else strip_commas(negative)
    records.append(PresenceRecord(image_path, caption, negated, distractor, index=i))
  if check_images:
    check_images_exist(path, [r.image_path for r in records])
  return records


def _index_list(path: str, value, key: str) -> list[int]:
  """A list (or 1-D tensor) of ints, else DataError naming ``key``."""
  if hasattr(value, "tolist"):
    value = value.tolist()
  if not isinstance(value, (list, tuple)) or not all(
    isinstance(v, int) and not isinstance(v, bool) for v in value
  ):
    raise DataError(path, "expected a list of integer record indices", key=key)
  return list(value)


def load_num_ops(path: str | os.PathLike, eval_size: int = CCNEG_EVAL_SIZE) -> dict[int, list[int]]:
  """{k: positions in the eval split of the records with k object-predicate pairs}.

  As CoN-CLIP's ``CCNegEvalDataset(num_ops=k)``: of the file's ``num_ops[k]`` indices,
  the last ``min(eval_size, len)`` are kept if they fall in the eval split (the last
  ``eval_size`` records), in their listed order.
  """
  path = os.fspath(path)
  if not path.endswith(".pt"):
    raise DataError(path, "num_ops is a field of the .pt file only (JSONL does not carry it)")
  data = _load_pt(path)
  n = len(
    require_list(
      path, get_field(path, data, "image_paths", index=None), index=None, key="image_paths"
    )
  )
  table = get_field(path, data, "num_ops", index=None)
  if isinstance(table, (list, tuple)):
    table = dict(enumerate(table))
  if not isinstance(table, dict):
    raise DataError(
      path, f"expected a dict from count to indices, got {type(table).__name__}", key="num_ops"
    )
  first = n - held_out(path, n, eval_size, "eval")
  out = {}
  for k in sorted(table):
    indices = _index_list(path, table[k], f"num_ops[{k}]")
    kept = indices[-min(n - first, len(indices)) :]
    out[int(k)] = [i - first for i in kept if first <= i < n]
  return out


@dataclasses.dataclass(frozen=True)
class ImagePairRecord:
  """CC-Neg mode 2: a caption true of ``positive_path`` and its negation, true of
  ``negative_path`` (both captions comma-free, as CoN-CLIP embeds them)."""

  positive_path: str
  negative_path: str
  caption: str
  negated: str


def load_ccneg2(
  path: str | os.PathLike, image_root: str | os.PathLike, *, check_images: bool = True
) -> list[ImagePairRecord]:
  """One ``ImagePairRecord`` per label of a CC-Neg mode-2 ``.pt`` (module docstring).

  Relative image paths are joined to ``image_root``; absolute ones are kept.
  """
  path = os.fspath(path)
  data = _load_pt(path)
  fields = {
    key: require_list(path, get_field(path, data, key, index=None), index=None, key=key)
    for key in ("image_paths_positive", "image_paths_negative", "labels")
  }
  sizes = {key: len(v) for key, v in fields.items()}
  if len(set(sizes.values())) != 1:
    raise DataError(path, f"lists differ in length: {sizes}", key="labels")

  def first_path(i: int, key: str) -> str:
    paths = fields[key][i]
    if isinstance(paths, (list, tuple)):
      if not paths:
        raise DataError(path, "empty list of image paths", index=i, key=key)
      paths = paths[0]
    return resolve_path(require_text(path, paths, index=i, key=key), image_root)

  records = []
  for i, label in enumerate(fields["labels"]):
    caption, negated = (
      require_text(
        path,
        get_field(path, label, key, index=i, label=f"labels.{key}"),
        index=i,
        key=f"labels.{key}",
      )
      for key in ("positive_prompt", "negated_prompt")
    )
    records.append(
      ImagePairRecord(
        first_path(i, "image_paths_positive"),
        first_path(i, "image_paths_negative"),
        strip_commas(caption),
        strip_commas(negated),
      )
    )
  if check_images:
    check_images_exist(
      path,
      [p for r in records for p in (r.positive_path, r.negative_path)],
      [i for i in range(len(records)) for _ in range(2)],
    )
  return records


def _top1(mapping_path: str, entry, index: int) -> int:
  """The first (best) COCO index of one mapping entry."""
  if hasattr(entry, "tolist"):  # a tensor row or a 0-d tensor
    entry = entry.tolist()
  if isinstance(entry, (list, tuple)):
    if not entry:
      raise DataError(mapping_path, "empty list of COCO indices", index=index)
    entry = entry[0]
  if not isinstance(entry, int) or isinstance(entry, bool):
    raise DataError(mapping_path, f"expected an integer COCO index, got {entry!r}", index=index)
  return entry


def load_distractor_paths(
  mapping_path: str | os.PathLike, coco_json: str | os.PathLike, coco_image_dir: str | os.PathLike
) -> list[str]:
  """Per CC-Neg record (file order), the path of its top-1 distractor image.

  ``mapping_path`` is CoN-CLIP's ``distractor_image_mapping.pt`` and ``coco_json`` the
  COCO annotation file whose images it indexes (see the module docstring); paths are
  ``coco_image_dir/file_name``. Loaded with torch's safe loader only.
  """
  mapping_path = os.fspath(mapping_path)
  mapping = _load_pt(mapping_path, hint="re-save it as a plain list of lists of ints")
  if hasattr(mapping, "tolist"):
    mapping = mapping.tolist()
  if not isinstance(mapping, (list, tuple)):
    raise DataError(
      mapping_path, f"expected a list (one entry per CC-Neg record), got {type(mapping).__name__}"
    )
  id_to_path = coco_image_paths(coco_json, coco_image_dir)
  ordered = [id_to_path[k] for k in sorted(id_to_path)]
  paths = []
  for i, entry in enumerate(mapping):
    j = _top1(mapping_path, entry, i)
    if not 0 <= j < len(ordered):
      raise DataError(
        mapping_path,
        f"COCO index {j} is outside the {len(ordered)} images of {os.fspath(coco_json)}",
        index=i,
      )
    paths.append(ordered[j])
  return paths


def convert_ccneg_to_jsonl(pt_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
  """Validate ``pt_path`` (safe loader only) and write it as JSONL; return the record count.

  Values are written raw (original image paths, commas kept), so loading the JSONL
  with :func:`load_ccneg` gives the same records as loading the ``.pt``.
  """
  pt_path, out_path = os.fspath(pt_path), os.fspath(out_path)
  raw = _read_pt(pt_path, BadRecords())
  rows = (
    json.dumps(
      {"image_path": image_path, "caption": caption, "negative_prompt": negative},
      ensure_ascii=False,
    )
    + "\n"
    for image_path, caption, negative in raw
  )
  storage.write_atomic(out_path, "".join(rows).encode("utf-8"))
  return len(raw)


def main(argv: list[str] | None = None) -> None:
  """Command-line entry point (``convert IN.pt OUT.jsonl``)."""
  parser = argparse.ArgumentParser(
    prog="python -m negclip_jax.data.ccneg",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True)
  convert = sub.add_parser("convert", help="convert ccneg_preprocessed.pt to JSONL")
  convert.add_argument("pt_path")
  convert.add_argument("out_path")
  args = parser.parse_args(argv)
  try:
    n = convert_ccneg_to_jsonl(args.pt_path, args.out_path)
  except DataError as e:
    parser.exit(1, f"error: {e}\n")
  print(f"wrote {n} records to {args.out_path}")


if __name__ == "__main__":
  main()
