"""Prepared TFDS datasets (TFRecord or ArrayRecord shards) -> presence / absence records.

``data.presence=tfds:NAME`` / ``data.absence=tfds:NAME`` read split ``data.tfds_split`` of
the dataset NAME (``name[/config][:version]``) prepared under ``data.tfds_data_dir`` (local
or ``gs://``), e.g. by `tfds_builders` or ``tfds build``. Features read: ``image`` (an Image),
the text features the caller names (Text, or a Sequence of Text: one record per element, the
sequences of one example equally long) and, if the dataset has it, ``index`` (int64, or a
Sequence of them): each record's index, and the records' order (TFDS writes examples in a
hashed order; the `tfds_builders` store the annotation file's positions there). Without
``index`` a record's index is its position in the split, and the order the split's.

Each process reads its share of the split, ``tfds.split_for_jax_process`` (TFDS's file
instructions: shard file, examples skipped and taken); the shares are all-gathered
(`hosts.gather_json`), so every process holds the same records and each example is parsed by
one process (a shard file that two shares split is read by both). An image's encoded bytes
lie verbatim in its serialized example, and the record's image is a `storage.member` path of
them, loaded when the image is: in a TFRecord shard (``tfds build``'s default file format;
local or ``gs://``), a byte range of the shard, found by walking the TFRecord framing (one
ranged read); in an ArrayRecord shard (``--file_format=array_record``; compressed records,
read with the ``array_record`` package, which opens local files only), a byte range of the
shard's record, read by random access. The image cache keys either by the shard's size,
mtime and the range. An example without an image or without usable text goes to the
`records.BadRecords` policy as a DataError naming the shard, the example's position in it and
the key, and so does an unreadable example (not a tf.train.Example; an ArrayRecord record
whose chunk fails its checksum); an undecodable image is found where any image is decoded (image cache,
``pipeline.validate(decode=True)``), under the same policy. Any other file format (and
ArrayRecord under ``gs://``) is refused naming the dataset_info.json and the rebuild option.
"""

from __future__ import annotations

import importlib.util
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


_TFRECORD, _ARRAY_RECORD = "tfrecord", "array_record"  # the file formats read
_READ_AT_ONCE = 256  # ArrayRecord records read per call


def _tfrecord_examples(shard: str, skip: int, take: int):
  """(position, serialized example, its offset in the shard) of examples skip .. skip +
  take - 1 of a TFRecord shard."""
  try:
    with storage.open(shard, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise DataError(shard, "shard not found; the TFDS dataset is incomplete") from e
  for position, (start, serialized) in enumerate(_framed(data, shard)):
    if position >= skip + take:
      break
    if position >= skip:
      yield position, serialized, start


def _array_record_examples(shard: str, skip: int, take: int):
  """(position, serialized example or the reason it is unreadable, None) of records skip ..
  skip + take - 1 of an ArrayRecord shard (a local file)."""
  try:
    reader = storage.array_record_reader(shard)
  except FileNotFoundError as e:
    raise DataError(shard, "shard not found; the TFDS dataset is incomplete") from e
  except OSError as e:
    raise DataError(shard, "not a readable ArrayRecord file") from e
  try:
    if skip + take > reader.num_records():
      raise DataError(
        shard,
        f"holds {reader.num_records()} records, dataset_info.json at least {skip + take}: "
        "the TFDS dataset is incomplete",
      )
    for lo in range(skip, skip + take, _READ_AT_ONCE):
      hi = min(lo + _READ_AT_ONCE, skip + take)
      try:
        yield from ((lo + i, x, None) for i, x in enumerate(reader.read(lo, hi)))
      except RuntimeError:  # a damaged chunk: which record is it?
        for position in range(lo, hi):
          try:
            (serialized,) = reader.read([position])
          except RuntimeError as e:
            serialized = f"unreadable record: {e}"
          yield position, serialized, None
  finally:
    reader.close()


def _read(shard: str, skip: int, take: int, keys: tuple[str, ...], file_format: str) -> list[list]:
  """[position, image or None, {key: [latin-1 text, ...]}, [index, ...] or None, why the
  example is unreadable or None] for examples skip .. skip + take - 1 of a shard; the image is
  `storage.member`'s [offset, size] in a TFRecord shard, [offset, size, record] in an
  ArrayRecord one."""
  from google.protobuf.message import DecodeError
  from tensorflow.core.example import example_pb2

  array_record = file_format == _ARRAY_RECORD
  examples = (_array_record_examples if array_record else _tfrecord_examples)(shard, skip, take)
  out = []
  for position, serialized, start in examples:
    unreadable = serialized if isinstance(serialized, str) else None
    if not unreadable:
      try:
        feature = example_pb2.Example.FromString(serialized).features.feature
      except DecodeError as e:
        unreadable = f"not a tf.train.Example ({e})"
    if unreadable:
      out.append([position, None, {k: [] for k in keys}, None, unreadable])
      continue
    image = None
    if IMAGE_KEY in feature and feature[IMAGE_KEY].bytes_list.value:
      encoded = feature[IMAGE_KEY].bytes_list.value[0]
      at = serialized.find(encoded)
      image = [at, len(encoded), position] if array_record else [start + at, len(encoded)]
    texts = {
      k: [t.decode("latin-1") for t in feature[k].bytes_list.value] if k in feature else []
      for k in keys
    }
    index = list(feature[INDEX_KEY].int64_list.value) if INDEX_KEY in feature else None
    out.append([position, image, texts, index, None])
  return out


def _builder(name: str, data_dir: str, keys: tuple[str, ...]):
  """The prepared builder, its features checked: a TFRecord or (local) ArrayRecord dataset
  with an Image and Text (or Sequence of Text) features `keys`."""
  import tensorflow_datasets as tfds

  how = (
    "build it with `python -m negclip_jax.data.tfds_builders` (CC-Neg, NegationCLIP COCO) "
    f"or `tfds build {name} --data_dir {data_dir}`"
  )
  builder = prepared_builder(name, data_dir, how)
  file_format = builder.info.file_format.value
  info = os.path.join(os.fspath(builder.data_dir), "dataset_info.json")
  if file_format not in (_TFRECORD, _ARRAY_RECORD):
    raise DataError(
      info,
      f"TFDS dataset {name!r} has file_format {file_format}; tfds:NAME reads {_TFRECORD} and "
      f"{_ARRAY_RECORD} shards: rebuild it with `tfds build --file_format={_TFRECORD}`",
    )
  if file_format == _ARRAY_RECORD and storage.is_remote(builder.data_dir):
    raise DataError(
      info,
      f"TFDS dataset {name!r} has file_format {file_format}, which is read from a local "
      f"data_dir only (the array_record reader opens local files): rebuild it with "
      f"`tfds build --file_format={_TFRECORD}` to read it from gs://, or copy it to a local disk",
    )
  if file_format == _ARRAY_RECORD and importlib.util.find_spec("array_record") is None:
    raise DataError(
      info,
      f"TFDS dataset {name!r} has file_format {file_format}, which needs the array_record "
      f"package: `pip install array-record==0.8.6`, or rebuild it with "
      f"`tfds build --file_format={_TFRECORD}`",
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
  file_format = builder.info.file_format.value
  mine = [
    [i.filename, entry]
    for i in instructions
    for entry in _read(os.fspath(i.filename), i.skip, i.take, keys, file_format)
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
  for shard, (position, image, texts, indices, unreadable) in index(name, split, data_dir, keys):
    for j in range(max(1, len(texts[keys[0]]))):
      record_index = indices[j] if indices and j < len(indices) else n

      def parse():
        if unreadable:
          raise DataError(shard, unreadable, index=position)
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
