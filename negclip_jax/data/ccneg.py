"""CC-Neg reader (CoN-CLIP's ``ccneg_preprocessed.pt``, or its JSONL conversion).

``.pt`` layout (a ``torch.save``-d dict)::

    {"image_paths": [str, ...],                  # N paths under /workspace/datasets/cc3m/
     "annotations": [{"json": {"caption": str, ...},
                      "sop_data": {"negative-prompt": str, ...}, ...}, ...]}   # N

``.jsonl`` layout: one ``{"image_path", "caption", "negative_prompt"}`` object per line,
with the same raw values as the ``.pt`` (paths not rewritten, commas kept).

CLI: ``python -m negclip_jax.data.ccneg convert IN.pt OUT.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from typing import Literal

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


def _load_pt(path: str) -> object:
    import torch  # Only the .pt format needs torch.

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DataError(
            path,
            f"cannot be loaded by torch's safe loader (weights_only=True): {_unpickler_reason(e)}. "
            "The file is corrupt or holds objects other than plain containers, strings, "
            "numbers and tensors; this reader never unpickles arbitrary objects. If you trust "
            "the file, allowlist the named global with torch.serialization.add_safe_globals, "
            "or convert the file yourself to JSONL (one {\"image_path\", \"caption\", "
            "\"negative_prompt\"} object per line; see docs/data_formats.md) and load that",
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
) -> list[PresenceRecord]:
    """Load CC-Neg as ``PresenceRecord(image_path, caption, negated)``, in file order.

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

    root = os.fspath(image_root)
    records = []
    for image_path, caption, negative in selected:
        if image_path.startswith(source_prefix):
            image_path = os.path.join(root, image_path[len(source_prefix):])
        else:
            image_path = resolve_path(image_path, root)
        records.append(PresenceRecord(image_path, caption, negative.replace(",", "")))
    if check_images:
        check_images_exist(path, [r.image_path for r in records])
    return records


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
