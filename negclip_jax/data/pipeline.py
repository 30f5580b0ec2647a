"""Training input pipeline: exact, resumable, host-sharded batches through tf.data.

Tables
  `PresenceTable(images, captions, negated)` and `AbsenceTable(images, captions, updated)`
  hold N examples; `images` is uint8 [N, H, W, 3] (in memory) or N file paths. A presence
  table may also hold `distractors` (same types): per example an image for which the
  negated caption is true, for CoN-CLIP's objective. A table with `image_emb` (and
  `distractor_emb`) float32 [N, D] (`image_cache.embed_table`) feeds `get_image_features`
  outputs instead of pixels. Build tables with `presence_table`, `absence_table` or
  `negshapes_tables`: an empty caption / negated / updated text or a missing image file
  raises `DataError` (record index + field); with ``on_error="skip"`` such examples are
  dropped, logged, and listed in ``table.dropped`` (record index -> reason).

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
  presence_caption_ids, presence_negated_ids, absence_caption_ids, absence_updated_ids:
      int32 [d, b / d, L], L the `embed.bucket_length` of the four global-batch arrays
      together (the same on every host; ``truncate_text=False`` keeps L = context_length)
  presence_pixels, absence_pixels: float32 [d, b / d, S, S, 3] (`preprocess_image`), or
  presence_image_emb, absence_image_emb: float32 [d, b / d, D] for tables with embeddings
  presence_distractor_pixels / presence_distractor_image_emb: the same, if the presence
      table has distractors
  step: int32 [d], the global step (repeated, so the whole dict can go through pmap)

Checkpointing
  The iterator position is the step: the checkpoint stores `TrainPipeline.state_dict()`
  and a restarted run calls `load_state_dict` (or passes ``start_step=next_step``) to get
  exactly the batches an uninterrupted run would have produced next, on any process count.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import ClassVar, Mapping, NamedTuple, Sequence, Union

import jax
import numpy as np

from negclip_jax import storage
from negclip_jax.data.records import AbsenceRecord, DataError, PresenceRecord
from negclip_jax.embed import bucket_length
from negclip_jax.preprocess import preprocess_image

logger = logging.getLogger(__name__)

Images = Union[np.ndarray, Sequence[str]]
STREAMS = {"presence": 0, "absence": 1}
ON_ERROR = ("raise", "skip")
_SHOWN = 5  # dropped examples named in a warning


class ImageColumn(NamedTuple):
  """How a table's image column is embedded, batched and named in errors."""
  emb_field: str   # the table field holding its image-tower embeddings
  batch_stem: str  # batch keys are f"{table prefix}{batch_stem}_pixels" / "..._image_emb"
  path_key: str    # DataError key of a missing file
  image_key: str   # DataError key of an unreadable image


IMAGE_COLUMNS = {"images": ImageColumn("image_emb", "", "image_path", "image"),
                 "distractors": ImageColumn("distractor_emb", "_distractor", "distractor_path",
                                            "distractor_image")}


def check_on_error(on_error: str) -> None:
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def load_example_image(images: Images, i: int, image_size: int,
                       record: int | None = None, key: str = "image") -> np.ndarray:
  """Image i preprocessed to float32 [S, S, 3]; an unreadable file -> DataError(path, record, key)."""
  image = images[i]
  try:
    return preprocess_image(image, image_size)
  except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
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
      raise ValueError(f"{self.PREFIX} table: {n} captions, {len(getattr(self, self.SECOND))} "
                       f"{self.SECOND} texts")
    for column in self.image_columns():
      images = getattr(self, column)
      if isinstance(images, np.ndarray) and (images.ndim != 4 or images.dtype != np.uint8):
        raise ValueError(f"{self.PREFIX} table: {column} arrays must be uint8 [N, H, W, 3], "
                         f"got {images.dtype} {images.shape}")
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
    return load_example_image(getattr(self, column), i, image_size, int(self.record_index[i]),
                              key=IMAGE_COLUMNS[column].image_key)

  def drop(self, reasons: Mapping[int, str]):
    """A copy without the examples at positions `reasons` (position -> why), logged."""
    if not reasons:
      return self
    keep = np.array([i for i in range(len(self)) if i not in reasons], np.int64)
    by_record = {int(self.record_index[i]): r for i, r in sorted(reasons.items())}
    shown = "; ".join(f"record {i}: {r}" for i, r in list(by_record.items())[:_SHOWN])
    logger.warning("%s: dropped %d of %d examples (first %d: %s)", self.source, len(reasons),
                   len(self), min(len(reasons), _SHOWN), shown)
    take = lambda seq: seq[keep] if isinstance(seq, np.ndarray) else [seq[i] for i in keep]
    columns = {}
    for column in self.image_columns():
      field = IMAGE_COLUMNS[column].emb_field
      columns[column] = take(getattr(self, column))
      if getattr(self, field) is not None:
        columns[field] = getattr(self, field)[keep]
    return dataclasses.replace(
        self, captions=take(self.captions), **{self.SECOND: take(getattr(self, self.SECOND))},
        **columns, record_index=self.record_index[keep], dropped={**self.dropped, **by_record})

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
  source: str = dataclasses.field(default="absence", kw_only=True)


def _problems(table: _Table, check_images: bool):
  """Yields (position, field, message) for each empty text or missing image file."""
  paths = {IMAGE_COLUMNS[c].path_key: getattr(table, c)
           for c in table.image_columns()
           if check_images and not isinstance(getattr(table, c), np.ndarray)}
  unique = list(dict.fromkeys(p for column in paths.values() for p in column))
  exists = dict(zip(unique, storage.files_exist(unique)))
  for i in range(len(table)):
    for key, texts in table.texts().items():
      if not isinstance(texts[i], str) or not texts[i].strip():
        yield i, key, f"empty or whitespace-only text {texts[i]!r}"
    for key, column in paths.items():
      path = column[i]
      if not exists[path]:
        yield i, key, f"image file not found: {path}"


def validate(table: _Table, on_error: str = "raise", check_images: bool = True) -> _Table:
  """`table` checked for empty texts and missing files: DataError, or dropped if "skip"."""
  check_on_error(on_error)
  bad: dict[int, str] = {}
  for i, key, message in _problems(table, check_images):
    if on_error == "raise":
      raise DataError(table.source, message, index=int(table.record_index[i]), key=key)
    bad.setdefault(i, f"{key}: {message}")
  return table.drop(bad)


def presence_table(records: Sequence[PresenceRecord], *, on_error: str = "raise",
                   check_images: bool = True, source: str = "presence") -> PresenceTable:
  """Validated table of CC-Neg records (record index i = position in `records`).

  Records with `distractor_path` set give a table with distractors; a mix of records
  with and without one raises DataError naming the first record without.
  """
  distractors = [r.distractor_path for r in records]
  if any(p is not None for p in distractors):
    first = next((i for i, p in enumerate(distractors) if p is None), None)
    if first is not None:
      raise DataError(source, "no distractor image, while other records have one",
                      index=first, key="distractor_path")
  else:
    distractors = None
  table = PresenceTable([r.image_path for r in records], [r.caption for r in records],
                        [r.negated for r in records], distractors=distractors, source=source)
  return validate(table, on_error, check_images)


def absence_table(records: Sequence[AbsenceRecord], *, on_error: str = "raise",
                  check_images: bool = True, source: str = "absence") -> AbsenceTable:
  """Validated table of NegationCLIP COCO records (record index i = position in `records`)."""
  table = AbsenceTable([r.image_path for r in records], [r.caption for r in records],
                       [r.updated for r in records], source=source)
  return validate(table, on_error, check_images)


def negshapes_tables(data: Mapping, *, on_error: str = "raise",
                     distractors: bool = False) -> tuple[PresenceTable, AbsenceTable]:
  """`negshapes.generate_pairs` output -> (presence, absence) tables sharing its images;
  with `distractors`, the presence table holds `data["distractor_images"]` (generate the
  data with ``distractors=True``). The presence pairs are `data["presence_captions"]` /
  `data["presence_negated"]` when present (hard negatives), else captions / negated."""
  if distractors and "distractor_images" not in data:
    raise ValueError("the NegShapes data has no distractor_images: generate it with "
                     "generate_pairs(..., distractors=True)")
  images = np.asarray(data["images"])
  presence = PresenceTable(images, list(data.get("presence_captions", data["captions"])),
                           list(data.get("presence_negated", data["negated"])),
                           distractors=data["distractor_images"] if distractors else None,
                           source="negshapes presence")
  absence = AbsenceTable(images, list(data["captions"]), list(data["updated"]),
                         source="negshapes absence")
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


def step_indices(step: int, n: int, global_batch: int, seed: int, stream: int,
                 steps_per_epoch: int | None = None) -> np.ndarray:
  """int64 [global_batch]: the examples of global step `step` of a stream of n examples.

  `steps_per_epoch` is the run's epoch (`epoch_steps`; default: this stream's own
  ``n // global_batch``); a shorter stream restarts within it (see the module doc).
  """
  stream_steps = n // global_batch
  if stream_steps == 0:
    raise ValueError(f"stream {stream} has {n} examples, fewer than global_batch={global_batch}")
  steps_per_epoch = steps_per_epoch or stream_steps
  if steps_per_epoch < stream_steps:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} is shorter than stream {stream}'s "
                     f"pass of {stream_steps} steps")
  epoch, i = divmod(step, steps_per_epoch)
  pass_index, position = divmod(i, stream_steps)
  return pass_permutation(n, seed, stream, epoch, pass_index)[position * global_batch:
                                                               (position + 1) * global_batch]


def host_slice(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """Process p's contiguous share [p * B / P, (p + 1) * B / P) of a global batch [B]."""
  b = len(indices) // process_count
  return indices[process_index * b:(process_index + 1) * b]


def _tensorflow():
  """TensorFlow, imported on first use and kept off accelerators (JAX owns them)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialized its devices elsewhere in this process.
    if tf.config.get_visible_devices("GPU"):
      logger.warning("TensorFlow was initialized with GPUs visible; tf.data may use GPU memory")
  return tf


class TrainPipeline:
  """Batches of global steps start_step .. num_steps - 1 for this host (see the module doc).

  Texts are tokenized once here (`tokenizer(texts, context_length)`). Iterating runs
  `build_host_batch` in tf.data (parallel, deterministic order, prefetched); an error
  while building step s's batch (e.g. a DataError for a corrupt image) is raised unchanged
  when step s is reached. process_index / process_count / local_devices default to jax's
  values; global_batch must divide by process_count * local_devices. `context_length` is
  the text tower's max_position_embeddings (or less).
  """

  def __init__(self, presence: PresenceTable, absence: AbsenceTable, *, tokenizer,
               context_length: int, global_batch: int, seed: int, image_size: int,
               num_steps: int, start_step: int = 0, process_index: int | None = None,
               process_count: int | None = None, local_devices: int | None = None,
               truncate_text: bool = True, prefetch: int = 2):
    self.tables = {"presence": presence, "absence": absence}
    self.context_length, self.global_batch = context_length, global_batch
    self.seed, self.image_size, self.num_steps = seed, image_size, num_steps
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.local_devices = jax.local_device_count() if local_devices is None else local_devices
    self.truncate_text, self.prefetch = truncate_text, prefetch
    if seed < 0 or start_step < 0:
      raise ValueError(f"seed and start_step must be >= 0, got {seed} and {start_step}")
    if global_batch % (self.process_count * self.local_devices):
      raise ValueError(f"global_batch={global_batch} must be divisible by process_count * "
                       f"local_devices = {self.process_count} * {self.local_devices}")
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index={self.process_index} not in [0, {self.process_count})")
    for name, table in self.tables.items():
      if len(table) < global_batch:
        raise ValueError(f"the {name} table has {len(table)} examples, fewer than "
                         f"global_batch={global_batch}")
    self._ids = {f"{name}_{field}_ids": tokenizer(list(texts), context_length)
                 for name, table in self.tables.items() for field, texts in table.texts().items()}
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
    return {name: step_indices(step, len(t), self.global_batch, self.seed, STREAMS[name],
                               self.epoch_steps)
            for name, t in self.tables.items()}

  def host_indices(self, step: int) -> dict[str, np.ndarray]:
    """Stream name -> int64 [global_batch / process_count]: this process's share."""
    return {name: host_slice(idx, self.process_index, self.process_count)
            for name, idx in self.global_indices(step).items()}

  def build_host_batch(self, step: int) -> dict[str, np.ndarray]:
    """This host's batch of global step `step` (keys and shapes in the module doc)."""
    glob = self.global_indices(step)
    ids = {key: table_ids[glob[key.split("_")[0]]] for key, table_ids in self._ids.items()}
    length = (bucket_length(np.concatenate(list(ids.values()))) if self.truncate_text
              else self.context_length)
    mine = lambda idx: host_slice(idx, self.process_index, self.process_count)
    batch = {key: np.ascontiguousarray(mine(v)[:, :length]) for key, v in ids.items()}
    for name, table in self.tables.items():
      idx = mine(glob[name])
      for column in table.image_columns():
        field, stem = IMAGE_COLUMNS[column][:2]
        if getattr(table, field) is not None:
          batch[f"{name}{stem}_image_emb"] = getattr(table, field)[idx]
        else:
          batch[f"{name}{stem}_pixels"] = np.stack(
              [table.pixels(i, self.image_size, column) for i in idx])
    batch = {k: v.reshape((self.local_devices, -1) + v.shape[1:]) for k, v in batch.items()}
    batch["step"] = np.full(self.local_devices, step, np.int32)
    return batch

  def _output_dtypes(self) -> dict[str, type]:
    """Batch key -> dtype, in `build_host_batch`'s key order."""
    images = {f"{name}{stem}_{'image_emb' if getattr(t, field) is not None else 'pixels'}":
              np.float32
              for name, t in self.tables.items() for column in t.image_columns()
              for field, stem in [IMAGE_COLUMNS[column][:2]]}
    return {**{key: np.int32 for key in self._ids}, **images, "step": np.int32}

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

    dataset = (tf.data.Dataset.range(start, self.num_steps)
               .map(to_dict, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .prefetch(self.prefetch))
    for step, batch in zip(range(start, self.num_steps), dataset.as_numpy_iterator()):
      if step in errors:
        raise errors[step]
      self._next_step = step + 1
      yield batch

  def state_dict(self) -> dict:
    """{"next_step": the step after the last batch handed out, "seed", "global_batch",
    "presence_size", "absence_size"}: what a checkpoint stores to resume exactly."""
    return {"next_step": self._next_step, "seed": self.seed, "global_batch": self.global_batch,
            "presence_size": len(self.tables["presence"]),
            "absence_size": len(self.tables["absence"])}

  def load_state_dict(self, state: Mapping) -> None:
    """Resume at state["next_step"]; ValueError if the sampling would differ from the saved run."""
    mine = self.state_dict()
    for key in mine.keys() - {"next_step"}:
      if state[key] != mine[key]:
        raise ValueError(f"cannot resume exactly: the checkpoint's pipeline has {key}="
                         f"{state[key]}, this one {mine[key]}")
    self._next_step = int(state["next_step"])
