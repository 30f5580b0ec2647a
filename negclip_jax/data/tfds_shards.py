"""Prepared TFDS datasets (TFRecord shards) -> presence / absence records, images as byte ranges.

``data.presence=tfds:NAME`` / ``data.absence=tfds:NAME`` read split ``data.tfds_split`` of
the dataset NAME (``name[/config][:version]``) prepared under ``data.tfds_data_dir`` (local
or ``gs://``), e.g. by `tfds_builders`. Features read: ``image`` (an Image), the text features
the caller names (Text, or a Sequence of Text: one record per element, the sequences of one
example equally long) and, if the dataset has it, ``index`` (int64, or a Sequence of them):
each record's index, and the records' order (TFDS writes examples in a hashed order; the
`tfds_builders` store the annotation file's positions there). Without ``index`` a record's
index is its position in the split, and the order the split's.

Each process reads its share of the split, ``tfds.split_for_jax_process`` (TFDS's file
instructions: shard file, examples skipped and taken), walking the TFRecord framing itself
to know where each example lies; the shares are all-gathered (`hosts.gather_json`), so every
process holds the same records and each example is parsed by one process (a shard file that
two shares split is read by both). An image's encoded bytes lie verbatim in its serialized
example: the record's image is a `storage.member` path of that byte range (one ranged read
when loaded; the image cache keys it by the shard's size, mtime and the range), as for
webdataset shards (`webdataset`). An example without an image or without usable text goes to
the `records.BadRecords` policy as a DataError naming the shard, the example's position in
it and the key; an undecodable image is found where any image is decoded (image cache,
``pipeline.validate(decode=True)``), under the same policy. Only the TFRecord file format
(``tfds build``'s default) is read: rebuild an ArrayRecord dataset with ``--file_format
tfrecord``.
"""

from __future__ import annotations

import os
import struct

from negclip_jax import hosts, storage
from negclip_jax.data.records import (
  AbsenceRecord,
  BadRecords,
  DataError,
  PresenceRecord,
  not_utf8,
  require_text,
)
from negclip_jax.data.tfds_source import feature_at, prepared_builder

IMAGE_KEY = "image"
INDEX_KEY = "index"
_HEADER = 12  # uint64 data length, uint32 masked CRC of it; the data's uint32 CRC follows it


def _framed(data: bytes, shard: str):
  """(offset, serialized example) of each record of a TFRecord file's bytes."""
  pos = 0
  while pos < len(data):
    if pos + _HEADER > len(data):
      raise DataError(shard, f"truncated TFRecord file: a record header at byte {pos}")
    (length,) = struct.unpack_from("<Q", data, pos)
    start = pos + _HEADER
    if start + length + 4 > len(data):
      raise DataError(shard, f"truncated TFRecord file: the record at byte {pos}")
    yield start, data[start : start + length]
    pos = start + length + 4


def _read(shard: str, skip: int, take: int, keys: tuple[str, ...]) -> list[list]:
  """[position, [image offset, size] or None, {key: [latin-1 text, ...]}, [index, ...] or
  None] for examples skip .. skip + take - 1 of a shard."""
  from tensorflow.core.example import example_pb2

  try:
    with storage.open(shard, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise DataError(shard, "shard not found; the TFDS dataset is incomplete") from e
  out = []
  for position, (start, serialized) in enumerate(_framed(data, shard)):
    if position >= skip + take:
      break
    if position < skip:
      continue
    feature = example_pb2.Example.FromString(serialized).features.feature
    image = None
    if IMAGE_KEY in feature and feature[IMAGE_KEY].bytes_list.value:
      encoded = feature[IMAGE_KEY].bytes_list.value[0]
      image = [start + serialized.find(encoded), len(encoded)]
    texts = {
      k: [t.decode("latin-1") for t in feature[k].bytes_list.value] if k in feature else []
      for k in keys
    }
    index = list(feature[INDEX_KEY].int64_list.value) if INDEX_KEY in feature else None
    out.append([position, image, texts, index])
  return out


def _builder(name: str, data_dir: str, keys: tuple[str, ...]):
  """The prepared builder, its features checked: a TFRecord dataset with an Image and
  Text (or Sequence of Text) features `keys`."""
  import tensorflow_datasets as tfds

  how = (
    "build it with `python -m negclip_jax.data.tfds_builders` (CC-Neg, NegationCLIP COCO) "
    f"or `tfds build {name} --data_dir {data_dir}`"
  )
  builder = prepared_builder(name, data_dir, how)
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise DataError(
      builder.data_dir,
      f"TFDS dataset {name!r} is stored as {builder.info.file_format.value}; only TFRecord "
      "shards are read: rebuild it with `tfds build --file_format tfrecord`",
    )
  if not isinstance(feature_at(builder, (IMAGE_KEY,)), tfds.features.Image):
    raise DataError(builder.data_dir, "expected an Image feature", key=IMAGE_KEY)
  for key in keys:
    feature = feature_at(builder, (key,))
    if isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
    if not isinstance(feature, tfds.features.Text):
      raise DataError(
        builder.data_dir,
        f"expected a Text feature (or a Sequence of them), got {feature!r}",
        key=key,
      )
  return builder


def index(name: str, split: str, data_dir: str, keys: tuple[str, ...]) -> list[tuple[str, list]]:
  """[(shard, `_read`'s entry)] of every example of the split, in split order; each process
  reads its `tfds.split_for_jax_process` share, then the shares are all-gathered."""
  import tensorflow_datasets as tfds

  builder = _builder(name, os.fspath(data_dir), keys)
  if split not in builder.info.splits and "[" not in split:
    raise DataError(
      builder.data_dir, f"no split {split!r}; available: {sorted(builder.info.splits)}"
    )
  try:
    instructions = builder.info.splits[tfds.split_for_jax_process(split)].file_instructions
  except (KeyError, ValueError, AssertionError) as e:
    raise DataError(builder.data_dir, f"cannot read split {split!r}: {e}") from e
  mine = [
    [i.filename, entry]
    for i in instructions
    for entry in _read(os.fspath(i.filename), i.skip, i.take, keys)
  ]
  return [(shard, entry) for share in hosts.gather_json(mine) for shard, entry in share]


def _text(shard: str, texts: dict, key: str, j: int, position: int) -> str:
  values = texts[key]
  if j >= len(values):
    raise DataError(
      shard,
      f"example has {len(values)} {key!r} texts, fewer than its other text features",
      index=position,
      key=key,
    )
  try:
    return require_text(shard, values[j].encode("latin-1").decode("utf-8"), index=position, key=key)
  except UnicodeDecodeError as e:
    raise not_utf8(shard, e, index=position) from e


def _records(name, split, data_dir, make, keys: tuple[str, str], bad: BadRecords | None):
  bad = bad or BadRecords("raise")
  out, n = [], 0
  for shard, (position, image, texts, indices) in index(name, split, data_dir, keys):
    for j in range(max(1, len(texts[keys[0]]))):
      record_index = indices[j] if indices and j < len(indices) else n

      def parse():
        if image is None:
          raise DataError(shard, "example has no image", index=position, key=IMAGE_KEY)
        path = storage.member(shard, f"{position}.{IMAGE_KEY}", *image)
        return make(path, *(_text(shard, texts, k, j, position) for k in keys), index=record_index)

      record = bad.parse(parse)
      if record is not None:
        out.append(record)
      n += 1
  if not out:
    raise DataError(f"tfds:{name}", f"no usable examples in split {split!r}")
  return sorted(out, key=lambda r: r.index)


def load_presence(
  name: str,
  split: str = "train",
  *,
  data_dir: str | os.PathLike,
  caption_key: str = "caption",
  negated_key: str = "negated",
  bad: BadRecords | None = None,
) -> list[PresenceRecord]:
  """Presence records (image, caption, negated caption) of a prepared TFDS split."""
  return _records(name, split, data_dir, PresenceRecord, (caption_key, negated_key), bad)


def load_absence(
  name: str,
  split: str = "train",
  *,
  data_dir: str | os.PathLike,
  caption_key: str = "caption",
  updated_key: str = "updated",
  bad: BadRecords | None = None,
) -> list[AbsenceRecord]:
  """Absence records (image, caption, updated caption) of a prepared TFDS split."""
  return _records(name, split, data_dir, AbsenceRecord, (caption_key, updated_key), bad)
