"""Training input pipeline: exact, resumable, host-sharded batches through tf.data.

Tables
  `PresenceTable(images, captions, negated)` and `AbsenceTable(images, captions, updated)`
  hold N examples; `images` is uint8 [N, H, W, 3] (in memory) or N file paths. A presence
  table may also hold `distractors` (same types): per example an image for which the
  negated caption is true, for CoN-CLIP's objective. A table with `image_emb` (and
  `distractor_emb`) float32 [N, D] (`image_cache.embed_table`) feeds `get_image_features`
  outputs instead of pixels. Build tables with `presence_table`, `absence_table` or
  `negshapes_tables`. `validate` is the one check of a table's records (empty caption /
  negated / updated text, missing image file; each file is `stat`ed once and its size and
  mtime kept for the image cache's key; with ``decode=True`` also undecodable images): each
  problem goes to the `records.BadRecords` policy (raise, or skip: logged, written to
  ``skipped.jsonl``), and skipped examples are listed in ``table.dropped`` (record index ->
  reason).

Sampling (a pure function of the step), as the original's two `DataLoader`s
  Stream k (presence 0, absence 1) of N_k examples has ``n_k = N_k // B`` steps per pass (B the
  global batch, remainder dropped, as ``drop_last=True``). An epoch is ``E = max(n_0, n_1)``
  global steps (`epoch_steps`). Both streams restart, reshuffled, at every epoch; within one
  the shorter stream restarts, reshuffled, whenever it runs out. Step s is step
  ``i = s % E`` of epoch ``e = s // E``; stream k uses pass ``r = i // n_k`` and positions
  ``[(i % n_k) * B, ... + B)`` of ``np.random.default_rng([seed, k, e, r]).permutation(N_k)``.
  Process p of P takes the contiguous slice ``[p * B / P, (p + 1) * B / P)`` of each global
  batch, so over a pass the processes together see every non-dropped example exactly once.

Batches (one step, one host; b = B / P, d local devices)
  The keys of `negclip_jax.batch`, each with a leading [d, b / d] instead of [b]: the four
  token-id arrays, L the `packing.bucket_length` of the four global-batch arrays together
  (the same on every host; ``truncate_text=False`` keeps L = context_length); pixels, or
  image features for tables with embeddings, per image prefix the tables hold; and
  "step": int32 [d], the global step (repeated, so the whole dict can go through pmap).
  With ``pack_text=True`` the four token-id arrays are replaced by the packed layout of
  `negclip_jax.packing` ([d, R, T] rows of T = context_length tokens, [d, 4 b / d] pooled
  indices), R the rung that holds every device's captions of the global batch.

Checkpointing
  The iterator position is the step: the checkpoint stores `TrainPipeline.state_dict()`
  and a restarted run calls `load_state_dict` (or passes ``start_step=next_step``) to get
  exactly the batches an uninterrupted run would have produced next, on any process count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
from typing import ClassVar, Mapping, NamedTuple, Sequence, Union

import jax
import numpy as np
from absl import logging as absl_logging

from negclip_jax import console, hosts, storage
from negclip_jax.data import parallel_read
from negclip_jax.data.records import AbsenceRecord, BadRecords, DataError, PresenceRecord
from negclip_jax.model import clip as model_lib
from negclip_jax.model.preprocess import preprocess_image
from negclip_jax.train import batch as batch_lib
from negclip_jax.train import packing
from negclip_jax.train.packing import bucket_length

logger = logging.getLogger(__name__)

Images = Union[np.ndarray, Sequence[str]]
STREAMS = {"presence": 0, "absence": 1}


class ImageColumn(NamedTuple):
  """How a table's image column is embedded, batched and named in errors."""

  emb_field: str  # the table field holding its image-tower embeddings
  batch_stem: str  # its `batch` image prefix is f"{stream}{batch_stem}"
  path_key: str  # DataError key of a missing file
  image_key: str  # DataError key of an unreadable image


IMAGE_COLUMNS = {
  "images": ImageColumn("image_emb", "", "image_path", "image"),
  "distractors": ImageColumn(
    "distractor_emb", "_distractor", "distractor_path", "distractor_image"
  ),
}


def bad_records(on_error: BadRecords | str) -> BadRecords:
  """The policy itself, or a fresh `BadRecords(on_error)` for "raise" / "skip"."""
  return on_error if isinstance(on_error, BadRecords) else BadRecords(on_error)


def load_example_image(
  images: Images, i: int, image_size: int, record: int | None = None, key: str = "image"
) -> np.ndarray:
  """Image i preprocessed to float32 [S, S, 3]; any fault reading, decoding or resizing a
  file -> DataError(path, record, key), for the bad-record policy."""
  image = images[i]
  try:
    return preprocess_image(image, image_size)
  except Exception as e:  # noqa: BLE001 - whatever one file does is that record's fault
    if isinstance(image, np.ndarray):
      raise
    raise DataError(image, str(e), index=i if record is None else record, key=key) from e


class _Table:
  """Behaviour shared by the two tables; `SECOND` names the second text field."""

  PREFIX: ClassVar[str]
  SECOND: ClassVar[str]

  def __post_init__(self):
    n = len(self.captions)
    if len(getattr(self, self.SECOND)) != n:
      raise ValueError(
        f"{self.PREFIX} table: {n} captions, {len(getattr(self, self.SECOND))} {self.SECOND} texts"
      )
    for column in self.image_columns():
      images = getattr(self, column)
      if isinstance(images, np.ndarray) and (images.ndim != 4 or images.dtype != np.uint8):
        raise ValueError(
          f"{self.PREFIX} table: {column} arrays must be uint8 [N, H, W, 3], "
          f"got {images.dtype} {images.shape}"
        )
      if len(images) != n:
        raise ValueError(f"{self.PREFIX} table: {len(images)} {column}, {n} captions")
      field = IMAGE_COLUMNS[column].emb_field
      if getattr(self, field) is not None:
        emb = np.asarray(getattr(self, field), np.float32)
        if emb.ndim != 2 or len(emb) != n:
          raise ValueError(f"{self.PREFIX} table: {field} must be [{n}, D], got {emb.shape}")
        object.__setattr__(self, field, emb)
    if self.record_index is None:
      object.__setattr__(self, "record_index", np.arange(n))

  def __len__(self) -> int:
    return len(self.captions)

  def texts(self) -> dict[str, Sequence[str]]:
    """Field name -> N texts, in the train step's order ("caption" first)."""
    return {"caption": self.captions, self.SECOND: getattr(self, self.SECOND)}

  def image_columns(self) -> tuple[str, ...]:
    """The image fields this table holds: "images", then "distractors" if set."""
    return tuple(c for c in IMAGE_COLUMNS if getattr(self, c, None) is not None)

  def pixels(self, i: int, image_size: int, column: str = "images") -> np.ndarray:
    """Example i's image (or distractor), float32 [S, S, 3]; DataError naming path and
    record if unreadable."""
    return load_example_image(
      getattr(self, column),
      i,
      image_size,
      int(self.record_index[i]),
      key=IMAGE_COLUMNS[column].image_key,
    )

  def drop(self, reasons: Mapping[int, str]):
    """A copy without the examples at positions `reasons` (position -> why; reported to
    the `BadRecords` policy by the caller)."""
    if not reasons:
      return self
    keep = np.array([i for i in range(len(self)) if i not in reasons], np.int64)
    by_record = {int(self.record_index[i]): r for i, r in sorted(reasons.items())}
    take = lambda seq: seq[keep] if isinstance(seq, np.ndarray) else [seq[i] for i in keep]
    columns = {}
    for column in self.image_columns():
      field = IMAGE_COLUMNS[column].emb_field
      columns[column] = take(getattr(self, column))
      if getattr(self, field) is not None:
        columns[field] = getattr(self, field)[keep]
    return dataclasses.replace(
      self,
      captions=take(self.captions),
      **{self.SECOND: take(getattr(self, self.SECOND))},
      **columns,
      record_index=self.record_index[keep],
      dropped={**self.dropped, **by_record},
    )

  def with_image_emb(self, reasons: Mapping[int, str] | None = None, **embeddings):
    """A copy without the rows `reasons` (position -> why, e.g. an unloadable image) and
    with `embeddings` (`image_emb=` / `distractor_emb=` float32 [K, D] for the kept rows)."""
    return dataclasses.replace(self.drop(reasons or {}), **embeddings)


@dataclasses.dataclass(frozen=True, eq=False)
class PresenceTable(_Table):
  """CC-Neg-style examples: image i, its true caption, a negated (false) caption, and
  optionally a distractor image for which the negated caption is true."""

  PREFIX: ClassVar[str] = "presence"
  SECOND: ClassVar[str] = "negated"
  images: Images
  captions: Sequence[str]
  negated: Sequence[str]
  distractors: Images | None = dataclasses.field(default=None, kw_only=True)
  image_emb: np.ndarray | None = dataclasses.field(default=None, kw_only=True)
  distractor_emb: np.ndarray | None = dataclasses.field(default=None, kw_only=True)
  record_index: np.ndarray | None = dataclasses.field(default=None, kw_only=True)  # int [N]
  dropped: Mapping[int, str] = dataclasses.field(default_factory=dict, kw_only=True)
  file_stamps: Mapping[str, str] | None = dataclasses.field(default=None, kw_only=True)
  source: str = dataclasses.field(default="presence", kw_only=True)


@dataclasses.dataclass(frozen=True, eq=False)
class AbsenceTable(_Table):
  """NegationCLIP-style examples: image i, its caption, the updated (absence) caption."""

  PREFIX: ClassVar[str] = "absence"
  SECOND: ClassVar[str] = "updated"
  images: Images
  captions: Sequence[str]
  updated: Sequence[str]
  image_emb: np.ndarray | None = dataclasses.field(default=None, kw_only=True)
  record_index: np.ndarray | None = dataclasses.field(default=None, kw_only=True)  # int [N]
  dropped: Mapping[int, str] = dataclasses.field(default_factory=dict, kw_only=True)
  file_stamps: Mapping[str, str] | None = dataclasses.field(default=None, kw_only=True)
  source: str = dataclasses.field(default="absence", kw_only=True)


def _problems(table: _Table, check_images: bool, stamps: dict[str, str | None]):
  """Yields (position, key, message) for each empty text or missing image file; fills
  `stamps` (path -> `storage.file_stamp`), one stat per distinct path."""
  paths = {
    IMAGE_COLUMNS[c].path_key: getattr(table, c)
    for c in table.image_columns()
    if check_images and not isinstance(getattr(table, c), np.ndarray)
  }
  for i in range(len(table)):
    for key, texts in table.texts().items():
      if not isinstance(texts[i], str) or not texts[i].strip():
        yield i, key, f"empty or whitespace-only text {texts[i]!r}"
    for key, column in paths.items():
      path = column[i]
      if path not in stamps:
        stamps[path] = storage.file_stamp(path)
      if stamps[path] is None:
        yield i, key, f"image file not found: {path}"


def _undecodable(table: _Table, image_size: int):
  """Yields (position, key, message) for each image that cannot be decoded; with several
  processes each decodes its block and the failures are all-gathered."""
  for column in table.image_columns():
    images = getattr(table, column)
    if isinstance(images, np.ndarray):
      continue
    failed = {}
    lo, hi = hosts.process_block(len(images))

    def check(i):
      try:
        load_example_image(images, i, image_size)
      except DataError as e:
        failed[i] = e.reason

    for _ in console.progress(
      parallel_read.read_ahead(check, range(lo, hi)),
      total=hi - lo,
      desc=f"check {column}",
      disable=jax.process_index() != 0,
      leave=False,
    ):
      pass
    for i, reason in sorted(hosts.gather_failures(failed, len(images)).items()):
      yield i, IMAGE_COLUMNS[column].image_key, reason


def validate(
  table: _Table,
  on_error: BadRecords | str = "raise",
  check_images: bool = True,
  decode: bool = False,
  image_size: int | None = None,
) -> _Table:
  """`table` without its bad examples (see the module doc), each reported to the
  `on_error` policy (which raises, or skips); keeps `file_stamps` for the image cache.

  decode: also decode every image file at `image_size` (for runs without the image cache,
  which would otherwise find a corrupt image only when its batch is built).
  """
  bad = bad_records(on_error)
  stamps: dict[str, str | None] = {}
  problems = list(_problems(table, check_images, stamps))
  table = dataclasses.replace(table, file_stamps=stamps if check_images else None)
  reasons = _report(table, problems, bad)
  table = table.drop(reasons)
  if decode:
    table = table.drop(_report(table, list(_undecodable(table, image_size)), bad))
  return table


def _report(table: _Table, problems, bad: BadRecords) -> dict[int, str]:
  """{position: reason} of `problems` [(position, key, message)], each given to `bad`."""
  reasons: dict[int, str] = {}
  for i, key, message in problems:
    bad(DataError(table.source, message, index=int(table.record_index[i]), key=key))
    reasons.setdefault(i, f"{key}: {message}")
  return reasons


def _record_index(records) -> np.ndarray:
  """int64 [N]: each record's index in its file (`record.index`; default its position)."""
  return np.array([i if r.index is None else r.index for i, r in enumerate(records)], np.int64)


def presence_table(
  records: Sequence[PresenceRecord],
  *,
  on_error: BadRecords | str = "raise",
  check_images: bool = True,
  source: str = "presence",
  decode: bool = False,
  image_size: int | None = None,
) -> PresenceTable:
  """Validated table of CC-Neg records (`validate`; record index = `record.index`, default
  the position in `records`).

  Records with `distractor_path` set give a table with distractors; a mix of records
  with and without one raises DataError naming the first record without.
  """
  distractors = [r.distractor_path for r in records]
  if any(p is not None for p in distractors):
    first = next((i for i, p in enumerate(distractors) if p is None), None)
    if first is not None:
      raise DataError(
        source,
        "no distractor image, while other records have one",
        index=first,
        key="distractor_path",
      )
  else:
    distractors = None
  table = PresenceTable(
    [r.image_path for r in records],
    [r.caption for r in records],
    [r.negated for r in records],
    distractors=distractors,
    source=source,
    record_index=_record_index(records),
  )
  return validate(table, on_error, check_images, decode, image_size)


def absence_table(
  records: Sequence[AbsenceRecord],
  *,
  on_error: BadRecords | str = "raise",
  check_images: bool = True,
  source: str = "absence",
  decode: bool = False,
  image_size: int | None = None,
) -> AbsenceTable:
  """Validated table of NegationCLIP COCO records (as `presence_table`)."""
  table = AbsenceTable(
    [r.image_path for r in records],
    [r.caption for r in records],
    [r.updated for r in records],
    source=source,
    record_index=_record_index(records),
  )
  return validate(table, on_error, check_images, decode, image_size)


def negshapes_tables(
  data: Mapping, *, on_error: BadRecords | str = "raise", distractors: bool = False
) -> tuple[PresenceTable, AbsenceTable]:
  """`negshapes.generate_pairs` output -> (presence, absence) tables sharing its images;
  with `distractors`, the presence table holds `data["distractor_images"]` (generate the
  data with ``distractors=True``). The presence pairs are `data["presence_captions"]` /
  `data["presence_negated"]` when present (hard negatives), else captions / negated."""
  if distractors and "distractor_images" not in data:
    raise ValueError(
      "the NegShapes data has no distractor_images: generate it with "
      "generate_pairs(..., distractors=True)"
    )
  images = np.asarray(data["images"])
  presence = PresenceTable(
    images,
    list(data.get("presence_captions", data["captions"])),
    list(data.get("presence_negated", data["negated"])),
    distractors=data["distractor_images"] if distractors else None,
    source="negshapes presence",
  )
  absence = AbsenceTable(
    images, list(data["captions"]), list(data["updated"]), source="negshapes absence"
  )
  return validate(presence, on_error), validate(absence, on_error)


def epoch_steps(sizes: Sequence[int], global_batch: int) -> int:
  """Global steps per epoch: the longer stream's ``N // global_batch`` (the original's
  ``max(len(loader1), len(loader2))`` with ``drop_last=True``)."""
  steps = [n // global_batch for n in sizes]
  if min(steps) == 0:
    raise ValueError(f"a stream has {min(sizes)} examples, fewer than global_batch={global_batch}")
  return max(steps)


@functools.lru_cache(maxsize=8)
def pass_permutation(n: int, seed: int, stream: int, epoch: int, pass_index: int) -> np.ndarray:
  """int64 [n] read-only: the order of stream `stream`'s examples in pass `pass_index` of
  epoch `epoch`."""
  perm = np.random.default_rng([seed, stream, epoch, pass_index]).permutation(n)
  perm.flags.writeable = False
  return perm


def step_indices(
  step: int, n: int, global_batch: int, seed: int, stream: int, steps_per_epoch: int | None = None
) -> np.ndarray:
  """int64 [global_batch]: the examples of global step `step` of a stream of n examples.

  `steps_per_epoch` is the run's epoch (`epoch_steps`; default: this stream's own
  ``n // global_batch``); a shorter stream restarts within it (see the module doc).
  """
  stream_steps = n // global_batch
  if stream_steps == 0:
    raise ValueError(f"stream {stream} has {n} examples, fewer than global_batch={global_batch}")
  steps_per_epoch = steps_per_epoch or stream_steps
  if steps_per_epoch < stream_steps:
    raise ValueError(
      f"steps_per_epoch={steps_per_epoch} is shorter than stream {stream}'s "
      f"pass of {stream_steps} steps"
    )
  epoch, i = divmod(step, steps_per_epoch)
  pass_index, position = divmod(i, stream_steps)
  return pass_permutation(n, seed, stream, epoch, pass_index)[
    position * global_batch : (position + 1) * global_batch
  ]


def _tensorflow():
  """TensorFlow, imported on first use and kept off accelerators (JAX owns them).

  Its C++ start-up notices (oneDNN, CPU features) go to stderr through absl's C++ log,
  which TF_CPP_MIN_LOG_LEVEL no longer silences; they are hidden unless absl's verbosity
  is INFO or more (`-v 0` / `--verbosity=0` on the command line).
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  if "tensorflow" not in sys.modules and absl_logging.get_verbosity() < absl_logging.INFO:
    with _stderr_to_devnull():
      import tensorflow  # noqa: F401
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialized its devices elsewhere in this process.
    if tf.config.get_visible_devices("GPU"):
      logger.warning("TensorFlow was initialized with GPUs visible; tf.data may use GPU memory")
  return tf


@contextlib.contextmanager
def _stderr_to_devnull():
  """File descriptor 2 (C++ writes too) to /dev/null for the duration of the block."""
  saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


class TrainPipeline:
  """Batches of global steps start_step .. num_steps - 1 for this host (see the module doc).

  Texts are tokenized once here (`tokenizer(texts, context_length)`). Iterating runs
  `build_host_batch` in tf.data (parallel, deterministic order, prefetched); an error
  while building step s's batch (e.g. a DataError for a corrupt image) is raised unchanged
  when step s is reached. Without image features, a batch's images are read by
  `read_threads` threads (`parallel_read.read_threads`; 0: from the CPU count, 1: serial),
  in order, while tf.data builds the next batches. process_index / process_count /
  local_devices default to jax's values; global_batch must divide by process_count *
  local_devices. `context_length` is the text tower's max_position_embeddings (or less).
  """

  def __init__(
    self,
    presence: PresenceTable,
    absence: AbsenceTable,
    *,
    tokenizer,
    context_length: int,
    global_batch: int,
    seed: int,
    image_size: int,
    num_steps: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    local_devices: int | None = None,
    truncate_text: bool = True,
    prefetch: int = 2,
    pack_text: bool = False,
    eos_token_id: int = model_lib.EOT_TOKEN_ID,
    read_threads: int = 0,
  ):
    self.tables = {"presence": presence, "absence": absence}
    self.context_length, self.global_batch = context_length, global_batch
    self.seed, self.image_size, self.num_steps = seed, image_size, num_steps
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.local_devices = jax.local_device_count() if local_devices is None else local_devices
    self.truncate_text, self.prefetch = truncate_text, prefetch
    self.pack_text, self.eos_token_id = pack_text, eos_token_id
    self.read_threads = parallel_read.read_threads(read_threads)
    if seed < 0 or start_step < 0:
      raise ValueError(f"seed and start_step must be >= 0, got {seed} and {start_step}")
    if global_batch % (self.process_count * self.local_devices):
      raise ValueError(
        f"global_batch={global_batch} must be divisible by process_count * "
        f"local_devices = {self.process_count} * {self.local_devices}"
      )
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index={self.process_index} not in [0, {self.process_count})")
    for name, table in self.tables.items():
      if len(table) < global_batch:
        raise ValueError(
          f"the {name} table has {len(table)} examples, fewer than global_batch={global_batch}"
        )
    self._ids = {
      batch_lib.text_key(name, field): tokenizer(list(texts), context_length)
      for name, table in self.tables.items()
      for field, texts in table.texts().items()
    }
    self._streams = {
      batch_lib.text_key(name, field): name
      for name in self.tables
      for field in batch_lib.STREAM_TEXTS[name]
    }
    self._next_step = start_step

  @property
  def steps_per_epoch(self) -> dict[str, int]:
    """Stream name -> N // global_batch: the steps of one pass over that stream."""
    return {name: len(t) // self.global_batch for name, t in self.tables.items()}

  @property
  def epoch_steps(self) -> int:
    """Global steps per epoch: the longer stream's pass."""
    return epoch_steps([len(t) for t in self.tables.values()], self.global_batch)

  def global_indices(self, step: int) -> dict[str, np.ndarray]:
    """Stream name -> int64 [global_batch] table positions used by global step `step`."""
    return {
      name: step_indices(
        step, len(t), self.global_batch, self.seed, STREAMS[name], self.epoch_steps
      )
      for name, t in self.tables.items()
    }

  def host_indices(self, step: int) -> dict[str, np.ndarray]:
    """Stream name -> int64 [global_batch / process_count]: this process's share."""
    return {
      name: hosts.host_slice(idx, self.process_index, self.process_count)
      for name, idx in self.global_indices(step).items()
    }

  def build_host_batch(self, step: int) -> dict[str, np.ndarray]:
    """This host's batch of global step `step` (keys and shapes in the module doc)."""
    glob = self.global_indices(step)
    ids = {key: table_ids[glob[self._streams[key]]] for key, table_ids in self._ids.items()}
    mine = lambda idx: hosts.host_slice(idx, self.process_index, self.process_count)
    if self.pack_text:
      d = self.local_devices
      batch = packing.pack_text_batch(
        ids,
        self.process_count * d,
        self.context_length,
        self.eos_token_id,
        slice(self.process_index * d, (self.process_index + 1) * d),
      )
      batch = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}  # reshaped below
    else:
      length = (
        bucket_length(np.concatenate(list(ids.values())))
        if self.truncate_text
        else self.context_length
      )
      batch = {key: np.ascontiguousarray(mine(v)[:, :length]) for key, v in ids.items()}
    for name, table in self.tables.items():
      idx = mine(glob[name])
      for column in table.image_columns():
        key = self._image_keys[name, column]
        field = IMAGE_COLUMNS[column].emb_field
        if getattr(table, field) is not None:
          batch[key] = getattr(table, field)[idx]
        else:
          load = functools.partial(table.pixels, image_size=self.image_size, column=column)
          batch[key] = np.stack(list(parallel_read.read_ahead(load, idx, self.read_threads)))
    batch = {k: v.reshape((self.local_devices, -1) + v.shape[1:]) for k, v in batch.items()}
    batch[batch_lib.STEP_KEY] = np.full(self.local_devices, step, np.int32)
    return batch

  @functools.cached_property
  def _image_keys(self) -> dict[tuple[str, str], str]:
    """(stream, image column) -> its batch key: features if the table has them, else pixels."""
    keys = {}
    for name, table in self.tables.items():
      for column in table.image_columns():
        prefix = name + IMAGE_COLUMNS[column].batch_stem
        embedded = getattr(table, IMAGE_COLUMNS[column].emb_field) is not None
        keys[name, column] = (batch_lib.image_emb_key if embedded else batch_lib.pixels_key)(prefix)
    return keys

  def _output_dtypes(self) -> dict[str, type]:
    """Batch key -> dtype, in `build_host_batch`'s key order."""
    texts = packing.PACKED_KEYS if self.pack_text else self._ids
    return {
      **{key: batch_lib.TEXT_DTYPE for key in texts},
      **{key: batch_lib.IMAGE_DTYPE for key in self._image_keys.values()},
      batch_lib.STEP_KEY: np.int32,
    }

  def __iter__(self):
    tf = _tensorflow()
    start = self._next_step
    spec = self._output_dtypes()
    keys, dtypes = list(spec), [tf.as_dtype(d) for d in spec.values()]
    errors: dict[int, Exception] = {}

    def build(step):
      try:
        batch = self.build_host_batch(int(step))
      except Exception as e:  # raised by the loop below, in step order, without TF's wrapping
        errors[int(step)] = e
        return [np.zeros(0, d) for d in spec.values()]
      return [batch[k] for k in keys]

    def to_dict(step):
      return dict(zip(keys, tf.numpy_function(build, [step], dtypes)))

    dataset = (
      tf.data.Dataset.range(start, self.num_steps)
      .map(to_dict, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      .prefetch(self.prefetch)
    )
    for step, batch in zip(range(start, self.num_steps), dataset.as_numpy_iterator()):
      if step in errors:
        raise errors[step]
      self._next_step = step + 1
      yield batch

  def state_dict(self) -> dict:
    """{"next_step": the step after the last batch handed out, "seed", "global_batch",
    "presence_size", "absence_size"}: what a checkpoint stores to resume exactly."""
    return {
      "next_step": self._next_step,
      "seed": self.seed,
      "global_batch": self.global_batch,
      "presence_size": len(self.tables["presence"]),
      "absence_size": len(self.tables["absence"]),
    }

  def load_state_dict(self, state: Mapping) -> None:
    """Resume at state["next_step"]; ValueError if the sampling would differ from the saved run."""
    mine = self.state_dict()
    for key in mine.keys() - {"next_step"}:
      if state[key] != mine[key]:
        raise ValueError(
          f"cannot resume exactly: the checkpoint's pipeline has {key}="
          f"{state[key]}, this one {mine[key]}"
        )
    self._next_step = int(state["next_step"])
