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

CLI: ``python -m negclip_jax.data.ccneg convert IN.pt OUT.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from typing import Literal, Sequence

from negclip_jax.data.coco_negation import coco_image_paths
from negclip_jax.data.records import (
    DataError,
    PresenceRecord,
    check_images_exist,
    get_field,
    require_list,
    require_text,
    resolve_path,
)

CCNEG_SOURCE_PREFIX = "/workspace/datasets/cc3m/"
"""Prefix of the image paths stored in the released ``ccneg_preprocessed.pt``."""

CCNEG_EVAL_SIZE = 40000
"""The last 40,000 samples of CC-Neg are its evaluation split."""

_RawRecord = tuple[str, str, str]  # (image_path as stored, caption, negative prompt with commas)


def _unpickler_reason(error: Exception) -> str:
    """The one-line cause inside torch's long weights_only error message."""
    marker = "WeightsUnpickler error:"
    text = str(error)
    if marker in text:
        rest = text.split(marker, 1)[1].strip()
        if rest:
            return rest.splitlines()[0].split(". ")[0]
    return type(error).__name__


_JSONL_HINT = ("or convert the file yourself to JSONL (one {\"image_path\", \"caption\", "
               "\"negative_prompt\"} object per line; see docs/data_formats.md) and load that")


def _load_pt(path: str, hint: str = _JSONL_HINT) -> object:
    """torch.load(weights_only=True); DataError naming the file if that refuses it."""
    import torch  # Only the .pt format needs torch.

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DataError(
            path,
            f"cannot be loaded by torch's safe loader (weights_only=True): {_unpickler_reason(e)}. "
            "The file is corrupt or holds objects other than plain containers, strings, "
            "numbers and tensors; this reader never unpickles arbitrary objects. If you trust "
            f"the file, allowlist the named global with torch.serialization.add_safe_globals, {hint}",
        ) from e
    except FileNotFoundError:
        raise
    except Exception as e:  # torch reports corrupt files as RuntimeError, KeyError, ...
        raise DataError(path, f"not a readable torch file ({type(e).__name__}: {e})") from e


def _read_pt(path: str) -> list[_RawRecord]:
    data = _load_pt(path)
    image_paths = require_list(path, get_field(path, data, "image_paths", index=None),
                               index=None, key="image_paths")
    annotations = require_list(path, get_field(path, data, "annotations", index=None),
                               index=None, key="annotations")
    if len(image_paths) != len(annotations):
        raise DataError(
            path,
            f"{len(image_paths)} image_paths but {len(annotations)} annotations",
            key="image_paths/annotations",
        )
    out = []
    for i, (image_path, ann) in enumerate(zip(image_paths, annotations)):
        caption = get_field(path, get_field(path, ann, "json", index=i), "caption",
                            index=i, label="json.caption")
        negative = get_field(path, get_field(path, ann, "sop_data", index=i), "negative-prompt",
                             index=i, label="sop_data.negative-prompt")
        out.append((
            require_text(path, image_path, index=i, key="image_paths"),
            require_text(path, caption, index=i, key="json.caption"),
            require_text(path, negative, index=i, key="sop_data.negative-prompt"),
        ))
    return out


def _read_jsonl(path: str) -> list[_RawRecord]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            i = len(out)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"invalid JSON on line {line_no}: {e}", index=i) from e
            out.append(tuple(
                require_text(path, get_field(path, obj, key, index=i), index=i, key=key)
                for key in ("image_path", "caption", "negative_prompt")
            ))
    return out


def _read_raw(path: str) -> list[_RawRecord]:
    if path.endswith(".pt"):
        return _read_pt(path)
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    raise DataError(path, "unsupported extension; expected .pt or .jsonl")


def load_ccneg(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    split: Literal["train", "eval", "all"] = "train",
    eval_size: int = CCNEG_EVAL_SIZE,
    *,
    source_prefix: str = CCNEG_SOURCE_PREFIX,
    check_images: bool = True,
    distractor_paths: Sequence[str] | None = None,
) -> list[PresenceRecord]:
    """Load CC-Neg as ``PresenceRecord(image_path, caption, negated)``, in file order.

    ``distractor_paths[i]`` (from :func:`load_distractor_paths`) becomes the
    ``distractor_path`` of file record i; it must cover every selected record.

    Image paths starting with ``source_prefix`` have it replaced by ``image_root``;
    other relative paths are joined to ``image_root``, other absolute paths are kept.
    Commas are removed from the negated caption (as the original CoN-CLIP code does).
    The last ``eval_size`` records form ``"eval"``, the rest ``"train"`` (``eval_size``
    is ignored for ``"all"``).
    """
    path = os.fspath(path)
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    raw = _read_raw(path)
    if split == "all":
        selected = raw
    elif not 0 <= eval_size <= len(raw):
        raise DataError(path, f"eval_size={eval_size} is not within [0, {len(raw)}] records")
    else:
        cut = len(raw) - eval_size
        selected = raw[:cut] if split == "train" else raw[cut:]

    first = len(raw) - eval_size if split == "eval" else 0
    if distractor_paths is not None and len(distractor_paths) < first + len(selected):
        raise DataError(path, f"the distractor mapping has {len(distractor_paths)} entries; the "
                        f"{split!r} split needs one for each of records {first}.."
                        f"{first + len(selected) - 1}")
    root = os.fspath(image_root)
    records = []
    for i, (image_path, caption, negative) in enumerate(selected, start=first):
        if image_path.startswith(source_prefix):
            image_path = os.path.join(root, image_path[len(source_prefix):])
        else:
            image_path = resolve_path(image_path, root)
        distractor = None if distractor_paths is None else distractor_paths[i]
        records.append(PresenceRecord(image_path, caption, negative.replace(",", ""), distractor))
    if check_images:
        check_images_exist(path, [r.image_path for r in records])
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


def load_distractor_paths(mapping_path: str | os.PathLike, coco_json: str | os.PathLike,
                          coco_image_dir: str | os.PathLike) -> list[str]:
    """Per CC-Neg record (file order), the path of its top-1 distractor image.

    ``mapping_path`` is CoN-CLIP's ``distractor_image_mapping.pt`` and ``coco_json`` the
    COCO annotation file whose images it indexes (see the module docstring); paths are
    ``coco_image_dir/file_name``. Loaded with torch's safe loader only.
    """
    mapping_path = os.fspath(mapping_path)
    mapping = _load_pt(mapping_path, hint="or re-save it as a plain list of lists of ints")
    if hasattr(mapping, "tolist"):
        mapping = mapping.tolist()
    if not isinstance(mapping, (list, tuple)):
        raise DataError(mapping_path, "expected a list (one entry per CC-Neg record), got "
                        f"{type(mapping).__name__}")
    id_to_path = coco_image_paths(coco_json, coco_image_dir)
    ordered = [id_to_path[k] for k in sorted(id_to_path)]
    paths = []
    for i, entry in enumerate(mapping):
        j = _top1(mapping_path, entry, i)
        if not 0 <= j < len(ordered):
            raise DataError(mapping_path, f"COCO index {j} is outside the {len(ordered)} images "
                            f"of {os.fspath(coco_json)}", index=i)
        paths.append(ordered[j])
    return paths


def convert_ccneg_to_jsonl(pt_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """Validate ``pt_path`` (safe loader only) and write it as JSONL; return the record count.

    Values are written raw (original image paths, commas kept), so loading the JSONL
    with :func:`load_ccneg` gives the same records as loading the ``.pt``.
    """
    pt_path, out_path = os.fspath(pt_path), os.fspath(out_path)
    raw = _read_pt(pt_path)
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for image_path, caption, negative in raw:
            f.write(json.dumps(
                {"image_path": image_path, "caption": caption, "negative_prompt": negative},
                ensure_ascii=False,
            ) + "\n")
    os.replace(tmp, out_path)
    return len(raw)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``convert IN.pt OUT.jsonl``)."""
    parser = argparse.ArgumentParser(prog="python -m negclip_jax.data.ccneg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
