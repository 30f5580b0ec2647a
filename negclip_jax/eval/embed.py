"""Jitted, pmapped embedding of many texts or images with static shapes.

Inputs are split across processes (contiguous blocks), then into fixed-size batches
of `batch_size` per process (a multiple of the local device count); the last batch is
padded and its padding dropped, so every example counts exactly once on any number of
devices and hosts. Every process returns the full [N, D] result.

With `mesh` (`sharding.make_mesh`), the parameters are sharded over its "fsdp" axis and
each batch over all its devices, as `config.parallelism="fsdp"` trains (one jitted call,
the compiler gathers the weights layer by layer), so a model too big to replicate is
evaluated where it was trained.

`dtype` sets the inference precision (`DTYPES`): the model computes in it with
float32 parameters cast per layer (LayerNorm statistics and attention softmax stay
float32); features are returned, normalized, in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils

from negclip_jax import console, hosts
from negclip_jax.data import parallel_read
from negclip_jax.data.records import DataError
from negclip_jax.model import clip as model_lib
from negclip_jax.model.preprocess import get_preprocess
from negclip_jax.train import losses, packing, sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def features(model, kind: str, normalize: bool):
  """fn(params, x) -> features [b, D] of one device's batch x: ids [b, L] ("text"), pixels
  [b, S, S, 3] ("image") or (packed rows, slots) ("packed_text"); what the Embedder runs."""
  method = "get_text_features" if kind == "text" else "get_image_features"

  def fn(params, x):
    if kind == "packed_text":  # x: (packed rows [r, T] without the pool, slots [r, K])
      rows, slots = x
      r, length = rows[packing.PACKED_IDS].shape
      pool = jnp.arange(r)[:, None] * length + slots
      out = model.apply(
        {"params": params},
        *(rows[k] for k in packing.PACKED_KEYS[:3]),
        pool,
        method="get_packed_text_features",
      )
    else:
      out = model.apply({"params": params}, x, method=method)
    return losses.l2_normalize(out) if normalize else out.astype(jnp.float32)

  return fn


@functools.lru_cache(maxsize=None)
def _pmapped(model, kind: str, normalize: bool):
  return jax.pmap(features(model, kind, normalize))


@functools.lru_cache(maxsize=None)
def _sharded(model, kind: str, normalize: bool, mesh):
  """jit on the inputs' shardings (params placed by `Embedder`, batch over all devices)."""
  return jax.jit(features(model, kind, normalize), out_shardings=sharding.batch_sharding(mesh))


class Embedder:
  """Embeds with `model`/`params` replicated on local devices.

  texts(ids [N, L] int32) -> [N, D]; images(items, load) -> [N, D] where `load(item)`
  returns one preprocessed float32 [S, S, 3] image (items may be arrays or paths).
  Outputs are L2-normalized float32 unless normalize=False. `dtype` (a `DTYPES` name;
  None keeps the model's) is the compute precision. `mesh`: shard as fsdp training does
  (module docstring); None replicates on local devices (pmap). With `pack` (default, and
  only without a mesh) texts are packed several to a row of L tokens (`negclip_jax.packing`;
  the same features to float rounding) and a call embeds up to batch_size rows; otherwise
  batch_size texts cut to their bucket. Packed features depend on a text's place in its row
  at float rounding, so the Embedder keeps each packed text's feature and reuses it for the
  same ids in later calls: equal texts always get bitwise equal features (the tasks count
  ties as wrong). A model that overrides `get_text_features` is never packed.
  `read_threads` (`parallel_read.read_threads`; 0: from the CPU count, 1: serial) load the
  images of `images` ahead of the device, in order, at most `read_window` images ahead: a
  batch plus two per thread, so that images read but not yet consumed (waiting behind a
  slow one) never leave readers idle.
  """

  def __init__(
    self,
    model,
    params,
    batch_size: int = 256,
    normalize: bool = True,
    progress: bool = True,
    dtype: str | None = None,
    mesh=None,
    pack: bool = True,
    read_threads: int = 0,
  ):
    if dtype is not None and dtype not in DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
    self.model = model if dtype is None else model.clone(dtype=DTYPES[dtype])
    self.n_local = jax.local_device_count()
    self.batch_size = math.ceil(batch_size / self.n_local) * self.n_local
    self.normalize = normalize
    self.read_threads = parallel_read.read_threads(read_threads)
    self.read_window = self.batch_size + 2 * self.read_threads
    self.progress = progress and jax.process_index() == 0
    self.mesh = mesh
    if mesh is None:
      self.params = jax_utils.replicate(params)
    else:
      self.params = jax.device_put(params, sharding.state_shardings(params, mesh))
    self.pack = (
      pack
      and mesh is None
      and type(self.model).get_text_features is model_lib.CLIP.get_text_features
    )
    self._packed_features: dict[bytes, np.ndarray] = {}  # ids row -> feature

  def texts(self, ids: np.ndarray, desc: str = "texts") -> np.ndarray:
    ids = np.asarray(ids, np.int32)
    if self.pack and len(ids):
      return self._packed_texts(ids, desc)
    ids = ids[:, : packing.bucket_length(ids)]
    return self._run("text", len(ids), lambda lo, hi: ids[lo:hi], desc)

  def forget_texts(self) -> None:
    """Drops the kept packed text features (benchmarks: time every pass from scratch)."""
    self._packed_features.clear()

  def _packed_texts(self, ids: np.ndarray, desc: str) -> np.ndarray:
    """The texts not embedded before, each once, packed into rows of L tokens; the rows are
    the items of `_run`, up to batch_size (a `packing.ladder_rows` rung, a multiple of the
    devices) per call."""
    keys = [row.tobytes() for row in ids]
    new = {k: i for i, k in enumerate(keys) if k not in self._packed_features}
    if new:
      idx = np.fromiter(new.values(), np.int64, len(new))
      for k, f in zip(new, self._embed_packed(ids[idx], desc)):
        self._packed_features[k] = f
    return np.stack([self._packed_features[k] for k in keys])

  def _embed_packed(self, ids: np.ndarray, desc: str) -> np.ndarray:
    packed = packing.pack(ids, None, ids.shape[1], self.model.config.text.eos_token_id)
    slots, where = packing.row_slots(packed)
    rows = {k: packed[k] for k in packing.PACKED_KEYS[:3]}
    per_call = min(self.batch_size, packing.ladder_rows(hosts.block_size(len(slots))))
    per_call = math.ceil(per_call / self.n_local) * self.n_local
    out = self._run(
      "packed_text",
      len(slots),
      lambda lo, hi: ({k: v[lo:hi] for k, v in rows.items()}, slots[lo:hi]),
      desc,
      batch_size=per_call,
    )
    return out.reshape(-1, out.shape[-1])[where]

  def images(
    self, items: Sequence, load: Callable | None = None, desc: str = "images", gather: bool = True
  ) -> np.ndarray:
    """gather=False: only this process's `hosts.process_block` rows [hi - lo, D].

    `load(items[i])` runs on `read_threads` threads (`parallel_read.read_ahead`), at most
    `read_window` items ahead of the batch being embedded; an exception it raises is raised
    when its item's batch is built, as a serial loop would.
    """
    load = load or (lambda x: x)
    lo, hi = hosts.process_block(len(items))
    ahead = parallel_read.read_ahead(
      lambda i: load(items[i]), range(lo, hi), self.read_threads, self.read_window
    )
    position = [lo]  # the next item `ahead` yields

    def get(a, b):  # _run asks for consecutive blocks of [lo, hi), then filler (0, 1)
      if a == position[0] and a < b <= hi:
        position[0] = b
        return np.stack([next(ahead) for _ in range(a, b)])
      return np.stack([load(items[i]) for i in range(a, b)])

    try:
      return self._run("image", len(items), get, desc, gather)
    finally:
      ahead.close()

  def _run(self, kind, n, get, desc, gather: bool = True, batch_size=None) -> np.ndarray:
    if n == 0:
      raise ValueError(f"Nothing to embed: no {desc}")
    batch_size = batch_size or self.batch_size
    fn = (
      _pmapped(self.model, kind, self.normalize)
      if self.mesh is None
      else _sharded(self.model, kind, self.normalize, self.mesh)
    )
    lo, hi = hosts.process_block(n)
    steps = max(1, math.ceil(hosts.block_size(n) / batch_size))  # same count on every process
    outs = []
    for s in console.progress(range(steps), desc=f"embed {desc}", disable=not self.progress):
      a, b = min(hi, lo + s * batch_size), min(hi, lo + (s + 1) * batch_size)
      # A process past its last example still joins the collective batch (with filler).
      x = get(a, b) if b > a else get(0, 1)
      outs.append(self._apply(fn, x, b - a, batch_size))
    local = np.concatenate(outs)[: hi - lo]
    return hosts.gather_blocks(local, n) if gather else local

  def _apply(self, fn, x, count, batch_size):
    """x: an array (or, packed, a tree of arrays) of <= batch_size items, padded by
    repeating the first."""

    def pad(a):  # a full batch as it is: no copy of the pixels
      if len(a) == batch_size:
        return a
      return np.concatenate([a, np.repeat(a[:1], batch_size - len(a), axis=0)])

    if self.mesh is not None:  # this process's rows of one global batch (never packed)
      out = fn(
        self.params,
        jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh), pad(x)),
      )
      shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
      return np.concatenate([np.asarray(s.data) for s in shards])[:count]
    shard = lambda a: pad(a).reshape((self.n_local, -1) + a.shape[1:])
    out = np.asarray(fn(self.params, jax.tree.map(shard, x)))
    return out.reshape((batch_size,) + out.shape[2:])[:count]


# ------------------------------------------------ helpers the tasks share
# Tokenize / preprocess, then embed; outputs are L2-normalized float32 [N, D]. `protocol`
# picks the image preprocessing (`preprocess.PREPROCESS`: "original" = OpenAI `clip`'s
# transform, "hf" = `CLIPImageProcessor`).


def image_size(embedder: Embedder) -> int:
  """Side in pixels of the model's square input images."""
  return embedder.model.config.vision.image_size


def embed_texts(
  embedder: Embedder, tokenizer, context_length: int, texts: Sequence[str], desc: str = "texts"
) -> np.ndarray:
  """[N, D] embeddings of N texts, tokenized to `context_length`."""
  return embedder.texts(tokenizer(list(texts), context_length), desc=desc)


def image_loader(embedder: Embedder, protocol: str):
  """`load(image) -> [S, S, 3]`: `protocol`'s preprocessing to the model's input size S."""
  return functools.partial(get_preprocess(protocol), image_size=image_size(embedder))


def embed_arrays(
  embedder: Embedder, images: np.ndarray, desc: str = "images", protocol: str = "hf"
) -> np.ndarray:
  """[N, D] embeddings of uint8 images [N, H, W, 3], preprocessed to the model's size."""
  return embedder.images(images, image_loader(embedder, protocol), desc=desc)


def gallery(image_paths: Sequence[str]) -> tuple[list[str], list[int]]:
  """(distinct paths in first-seen order, index of each input path among them)."""
  unique = list(dict.fromkeys(image_paths))
  row = {p: i for i, p in enumerate(unique)}
  return unique, [row[p] for p in image_paths]


def embed_files(
  embedder: Embedder, paths: Sequence[str], desc: str = "images", protocol: str = "hf"
) -> np.ndarray:
  """[N, D] embeddings of N image files; each distinct path is decoded and embedded once.

  A file that cannot be read raises DataError naming it, the first position (record) in
  `paths` that holds it, and the key "image_path".
  """
  unique, rows = gallery(paths)
  first = {p: i for i, p in reversed(list(enumerate(paths)))}
  load = image_loader(embedder, protocol)

  def load_file(path):
    try:
      return load(path)
    except (OSError, ValueError) as e:  # missing, truncated or not an image
      raise DataError(
        path, f"cannot read the image: {e}", index=first[path], key="image_path"
      ) from e

  return embedder.images(unique, load_file, desc=desc)[rows]
