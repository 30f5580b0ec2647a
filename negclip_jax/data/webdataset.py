"""webdataset tar shards -> presence / absence records, images as tar-member paths.

A shard is a tar file of samples: consecutive members sharing a key (the member name up to
the first dot of its base name), one member per field, the field named by the rest of the
name (``000123.jpg``, ``000123.txt``, ``000123.json``), as open_clip / LAION / DataComp ship
them. `shards` expands a brace pattern (``shards/{00000..00127}.tar``, ``{a,b}``), local or
``gs://``. `index` lists every sample of the shards, each process reading its own block of
shards (`hosts.process_block`) and the lists all-gathered, so a pod reads each shard once.

A record's image is the sample's first of `IMAGE_FIELDS`, given as a `storage.member` path
(the image member's byte range in its shard: one ranged read when the image is loaded; the
image cache keys it by the shard's size, mtime and the range). A text field `key` is the
sample's member ``.{key}`` (UTF-8) if it has one, else field `key` of its ``.json`` member.
The record index is the sample's position over all shards; a sample without an image or a
text goes to the `records.BadRecords` policy as a DataError naming the shard, the sample's
position in it and the key. Order: the shards' order, then the order in each shard; the
training pipeline samples from it by seed and step (`train.pipeline`), so the order per seed
and the resume position are exact, as for any other table.
"""

from __future__ import annotations

import itertools
import json
import re
import tarfile

from negclip_jax import hosts, storage
from negclip_jax.data.records import (
  AbsenceRecord,
  BadRecords,
  DataError,
  PresenceRecord,
  get_field,
  not_utf8,
  require_text,
)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
TEXT_FIELDS = ("txt", "json")  # members read while indexing (besides the caption keys)
_BRACE = re.compile(r"\{([^{}]*)\}")


def shards(pattern: str) -> list[str]:
  """Shard paths of a brace `pattern`: ``{00000..00127}`` (inclusive, zero-padded to the
  first bound's width), ``{a,b,c}``; several braces expand as a product, in order."""
  parts, choices, last = [], [], 0
  for m in _BRACE.finditer(pattern):
    parts.append(pattern[last : m.start()])
    body = m.group(1)
    if ".." in body:
      lo, hi = body.split("..", 1)
      if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
        raise ValueError(f"shard pattern {pattern!r}: bad range {{{body}}}")
      choices.append([str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)])
    else:
      choices.append(body.split(","))
    last = m.end()
  parts.append(pattern[last:])
  return [
    "".join(p + c for p, c in zip(parts, combo)) + parts[-1]
    for combo in itertools.product(*choices)
  ]


def _split_name(name: str) -> tuple[str, str]:
  """(sample key, field) of a member name: ``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``)."""
  head, _, base = name.rpartition("/")
  key, _, field = base.partition(".")
  return (f"{head}/{key}" if head else key), field.lower()


def _index_shard(shard: str, text_fields: frozenset[str]) -> list[dict]:
  """Samples of one shard, in order: {"key", "members": {field: [offset, size]}, "texts":
  {field: latin-1 str of its bytes}} (texts only for `text_fields`)."""
  samples: list[dict] = []
  try:
    with storage.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
      for m in tar:
        if not m.isfile():
          continue
        key, field = _split_name(m.name)
        if not samples or samples[-1]["key"] != key:
          samples.append({"key": key, "members": {}, "texts": {}})
        samples[-1]["members"][field] = [m.offset_data, m.size]
        if field in text_fields:
          samples[-1]["texts"][field] = tar.extractfile(m).read().decode("latin-1")
  except FileNotFoundError as e:
    raise DataError(shard, "shard not found; check the shard pattern") from e
  except tarfile.TarError as e:
    raise DataError(shard, f"not a readable tar file: {e}") from e
  return samples


def index(pattern: str, text_fields=()) -> list[tuple[str, list[dict]]]:
  """[(shard, its samples (`_index_shard`))] for every shard of `pattern`; each process
  reads its block of shards, then the lists are all-gathered (the same on every process)."""
  paths = shards(pattern)
  fields = frozenset(TEXT_FIELDS) | frozenset(text_fields)
  lo, hi = hosts.process_block(len(paths))
  mine = [_index_shard(p, fields) for p in paths[lo:hi]]
  every = [samples for block in hosts.gather_json(mine) for samples in block]
  return list(zip(paths, every))


def _text(shard: str, sample: dict, key: str, position: int) -> str:
  """Text field `key` of a sample: its ``.{key}`` member, else its JSON's field `key`."""
  texts = sample["texts"]
  try:
    if key in texts:
      return require_text(
        shard, texts[key].encode("latin-1").decode("utf-8"), index=position, key=key
      )
    if "json" not in texts:
      raise DataError(
        shard, f"sample {sample['key']!r} has no .{key} and no .json", index=position, key=key
      )
    try:
      obj = json.loads(texts["json"].encode("latin-1").decode("utf-8"))
    except json.JSONDecodeError as e:
      raise DataError(
        shard, f"invalid JSON in {sample['key']}.json: {e}", index=position, key="json"
      ) from e
    return require_text(shard, get_field(shard, obj, key, index=position), index=position, key=key)
  except UnicodeDecodeError as e:
    raise not_utf8(shard, e, index=position) from e


def _image(shard: str, sample: dict, position: int) -> str:
  for field in IMAGE_FIELDS:
    if field in sample["members"]:
      offset, size = sample["members"][field]
      return storage.member(shard, f"{sample['key']}.{field}", offset, size)
  raise DataError(
    shard,
    f"sample {sample['key']!r} has no image (.{', .'.join(IMAGE_FIELDS)})",
    index=position,
    key="image",
  )


def _records(pattern: str, make, keys: tuple[str, str], bad: BadRecords | None):
  bad = bad or BadRecords("raise")
  out, n = [], 0
  for shard, samples in index(pattern, keys):
    for position, sample in enumerate(samples):

      def parse():
        image = _image(shard, sample, position)
        return make(image, *(_text(shard, sample, k, position) for k in keys), index=n)

      record = bad.parse(parse)
      if record is not None:
        out.append(record)
      n += 1
  if not out:
    raise DataError(pattern, "no usable samples in the shards")
  return out


def load_presence(
  pattern: str,
  caption_key: str = "txt",
  negated_key: str = "negated",
  bad: BadRecords | None = None,
) -> list[PresenceRecord]:
  """Presence records (image, caption, negated caption) of the shards of `pattern`."""
  return _records(pattern, PresenceRecord, (caption_key, negated_key), bad)


def load_absence(
  pattern: str,
  caption_key: str = "txt",
  updated_key: str = "updated",
  bad: BadRecords | None = None,
) -> list[AbsenceRecord]:
  """Absence records (image, caption, updated caption) of the shards of `pattern`."""
  return _records(pattern, AbsenceRecord, (caption_key, updated_key), bad)
