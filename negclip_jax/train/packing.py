"""Packed text sequences: several captions share one row of the text tower (host side, numpy).

The layout of a packed text batch, in one place (R rows of T tokens, P pooled captions):

  PACKED_IDS       int32 [R, T]  token ids, captions back to back, 0 after the last one
  PACKED_POSITIONS int32 [R, T]  each caption's positions, restarting at 0 (0 on padding)
  PACKED_SEGMENTS  int32 [R, T]  1, 2, ... per caption within its row, 0 on padding
  PACKED_POOL      int32 [P]     flat index r * T + t of each caption's pooled (EOT) token

A packed training batch holds these four keys instead of `batch.TEXT_KEYS` (with the
leading device axis), P = 4 b captions in TEXT_KEYS order (`pack_text_batch`). The fsdp
step gets every device's rows stacked ([devices R, T]) and the pool with its device axis
([devices, P], in-group indices; `sharding.Fsdp.batch`, `step.text_embeddings`).

`model.TextTransformer` runs such rows with a block-diagonal causal mask (a token attends
to earlier tokens of its own segment only) and pools at PACKED_POOL, so every caption's
feature is the one it gets alone in an [1, L] batch (the causal mask makes tokens after
the EOT irrelevant, so a caption occupies only its first `pooled_lengths` tokens).

Shape: T is the row length (the text context, so any caption fits a row); R is the
smallest rung of `ROWS_LADDER` >= the rows first-fit-decreasing packing needs. Batches of
i.i.d. captions differ little in total tokens, so a run compiles one or two shapes, and
the ladder's rungs are at most 12.5% apart; a rung close to one caption per row takes that
full shape (`batch_rows`), so short contexts compile once. Fallback: a batch that does not fit a rung
takes the next rung up (one more compile), up to one caption per row; nothing is ever
truncated, and a caption longer than T is an error.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from negclip_jax.model.clip import OPENAI_EOS_TOKEN_ID
from negclip_jax.train import batch as batch_lib

PACKED_IDS = "packed_ids"
PACKED_POSITIONS = "packed_positions"
PACKED_SEGMENTS = "packed_segments"
PACKED_POOL = "packed_pool"
PACKED_KEYS = (PACKED_IDS, PACKED_POSITIONS, PACKED_SEGMENTS, PACKED_POOL)


def _ladder(limit: int = 1 << 20) -> tuple[int, ...]:
  """1..16, then 8 rungs per octave: 18, 20, ..., 32, 36, ..., 64, 72, ..."""
  rungs, step = list(range(1, 17)), 2
  while rungs[-1] < limit:
    rungs += [rungs[-1] + step * i for i in range(1, 9)]
    step *= 2
  return tuple(rungs)


ROWS_LADDER = _ladder()


def ladder_rows(needed: int) -> int:
  """The smallest `ROWS_LADDER` rung >= needed."""
  return ROWS_LADDER[int(np.searchsorted(ROWS_LADDER, max(1, needed)))]


def pooled_lengths(ids: np.ndarray, eos_token_id: int) -> np.ndarray:
  """ids [N, L] -> int [N]: tokens up to and including the pooled one, picked as
  `model.eot_positions` picks it (argmax of ids for OpenAI configs, else the first EOS)."""
  ids = np.asarray(ids)
  if eos_token_id == OPENAI_EOS_TOKEN_ID:
    return np.argmax(ids, axis=-1) + 1
  return np.argmax(ids == eos_token_id, axis=-1) + 1


def first_fit_decreasing(lengths: np.ndarray, row_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Assigns items of `lengths` to rows of `row_length` -> (row [N], offset [N]).

  Longest first, each into the first row with room (deterministic; ties by index).
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and lengths.max() > row_length:
    raise ValueError(
      f"a caption of {lengths.max()} tokens does not fit a packed row of {row_length} tokens"
    )
  row, offset = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
  free = np.zeros(0, np.int64)
  for i in np.argsort(-lengths, kind="stable"):
    fits = np.flatnonzero(free >= lengths[i])
    r = int(fits[0]) if fits.size else len(free)
    if r == len(free):
      free = np.append(free, row_length)
    row[i], offset[i] = r, row_length - free[r]
    free[r] -= lengths[i]
  return row, offset


def rows_needed(ids: np.ndarray, row_length: int, eos_token_id: int) -> int:
  """Rows first-fit-decreasing packing uses for the captions ids [N, L]."""
  row, _ = first_fit_decreasing(pooled_lengths(ids, eos_token_id), row_length)
  return int(row.max()) + 1 if row.size else 1


def pack(
  ids: np.ndarray, rows: int | None, row_length: int, eos_token_id: int
) -> dict[str, np.ndarray]:
  """Captions ids [N, L] -> the packed layout (module doc) with R = rows, T = row_length.

  PACKED_POOL lists the captions in input order. rows=None: as many as needed;
  ValueError if they need more than `rows`.
  """
  ids = np.asarray(ids)
  lengths = pooled_lengths(ids, eos_token_id)
  row, offset = first_fit_decreasing(lengths, row_length)
  rows = (int(row.max()) + 1 if row.size else 1) if rows is None else rows
  if row.size and row.max() >= rows:
    raise ValueError(
      f"{len(ids)} captions ({lengths.sum()} tokens) need {row.max() + 1} "
      f"packed rows of {row_length}; the shape has {rows}"
    )
  out = {
    k: np.zeros((rows, row_length), np.int32)
    for k in (PACKED_IDS, PACKED_POSITIONS, PACKED_SEGMENTS)
  }
  segment = np.zeros(rows, np.int32)
  for i in np.argsort(row * row_length + offset, kind="stable"):  # left to right per row
    r, o, n = row[i], offset[i], lengths[i]
    segment[r] += 1
    out[PACKED_IDS][r, o : o + n] = ids[i, :n]
    out[PACKED_POSITIONS][r, o : o + n] = np.arange(n)
    out[PACKED_SEGMENTS][r, o : o + n] = segment[r]
  out[PACKED_POOL] = (row * row_length + offset + lengths - 1).astype(np.int32)
  return out


def pack_shards(
  shards: list[np.ndarray], row_length: int, eos_token_id: int, rows: int | None = None
) -> dict[str, np.ndarray]:
  """Each of S caption arrays [n, L] packed alike -> layout arrays with a leading [S].

  rows: the common R; default the ladder rung of the largest need among the shards.
  """
  if rows is None:
    rows = ladder_rows(max(rows_needed(s, row_length, eos_token_id) for s in shards))
  packed = [pack(s, rows, row_length, eos_token_id) for s in shards]
  return {k: np.stack([p[k] for p in packed]) for k in PACKED_KEYS}


def padding_fraction(packed: dict[str, np.ndarray]) -> float:
  """Share of the packed rows' token slots that hold no caption token."""
  return float(np.mean(packed[PACKED_SEGMENTS] == 0))


def text_shards(ids: dict[str, np.ndarray], shards: int) -> list[np.ndarray]:
  """The `batch_lib.TEXT_KEYS` arrays [B, L] -> `shards` arrays [4 B / shards, L]: shard s
  holds examples [s B / shards, (s + 1) B / shards) of each key, keys in TEXT_KEYS order."""
  parts = [np.split(np.asarray(ids[k]), shards) for k in batch_lib.TEXT_KEYS]
  return [np.concatenate([p[s] for p in parts]) for s in range(shards)]


def pack_text_batch(
  ids: dict[str, np.ndarray],
  shards: int,
  row_length: int,
  eos_token_id: int,
  mine: slice = slice(None),
) -> dict[str, np.ndarray]:
  """A global batch's TEXT_KEYS arrays [B, L] -> the packed layout with a leading [shards]
  axis (one shard per device, contiguous examples), sliced to `mine` (this host's devices).

  All shards get the same rows (`batch_rows` of the largest need over the *global* batch,
  so every host picks the same shape).
  """
  every = text_shards(ids, shards)
  needed = max(rows_needed(s, row_length, eos_token_id) for s in every)
  rows = batch_rows(needed, len(every[0]))
  return pack_shards(every[mine], row_length, eos_token_id, rows)


# A rung at least this fraction of one-caption-per-row takes that full shape instead: packing
# there saves little, and batches of short contexts (e.g. 16 tokens) then compile one shape.
FULL_ROWS_FRACTION = 0.75


def batch_rows(needed: int, captions: int) -> int:
  """R of a training batch of `captions` captions per shard that needs `needed` rows: the
  `ladder_rows` rung, or `captions` (the most rows any batch needs, one caption per row)
  when that rung is at least FULL_ROWS_FRACTION of it."""
  rung = ladder_rows(needed)
  return captions if rung >= FULL_ROWS_FRACTION * captions else rung


def row_slots(packed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Per-row pooling of an unbatched packed layout (evaluation: rows are the items) ->
  (slots int32 [R, K]: in-row positions of each row's pooled tokens, left to right, 0 in
  unused slots, K the `ladder_rows` rung of the most captions in a row;
  where int64 [N]: caption i's pooled feature is slot where[i] of the flattened [R * K])."""
  rows, length = packed[PACKED_IDS].shape
  row, pos = np.divmod(packed[PACKED_POOL].astype(np.int64), length)
  slot = packed[PACKED_SEGMENTS][row, pos].astype(np.int64) - 1
  k = ladder_rows(int(slot.max()) + 1 if slot.size else 1)
  slots = np.zeros((rows, k), np.int32)
  slots[row, slot] = pos
  return slots, row * k + slot


TEXT_BUCKETS = (16, 32, 48, 64, 77)


def bucket_length(ids: np.ndarray, buckets: Sequence[int] = TEXT_BUCKETS) -> int:
  """Smallest bucket >= the longest sequence (last non-zero token) in ids [N, L].

  The causal mask makes every token's features depend only on earlier tokens, so
  running the text tower on ids[:, :bucket] gives the same EOT features.
  """
  length = ids.shape[-1]
  nonzero = ids != 0
  used = int((length - np.argmax(nonzero[..., ::-1], axis=-1)).max()) if ids.size else 1
  return next((b for b in buckets if b >= used and b <= length), length)
