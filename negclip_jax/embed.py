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
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from negclip_jax import losses, sharding

TEXT_BUCKETS = (16, 32, 48, 64, 77)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def process_block(n: int, process: int | None = None) -> tuple[int, int]:
  """[lo, hi): the contiguous block of n inputs that `process` (default: this one) embeds."""
  per_proc = math.ceil(n / jax.process_count())
  p = jax.process_index() if process is None else process
  return min(n, p * per_proc), min(n, (p + 1) * per_proc)


def gather_blocks(local: np.ndarray, n: int) -> np.ndarray:
  """Every process's `process_block` rows `local` [hi - lo, ...] -> all n rows, on every
  process (one all-gather when multi-process)."""
  procs = jax.process_count()
  if procs == 1:
    return local
  per_proc = math.ceil(n / procs)
  padded = np.zeros((per_proc,) + local.shape[1:], local.dtype)
  padded[:len(local)] = local
  every = multihost_utils.process_allgather(padded)  # [procs, per_proc, D]
  return np.concatenate([every[p][:max(0, min(n, (p + 1) * per_proc) - p * per_proc)]
                         for p in range(procs)])


def bucket_length(ids: np.ndarray, buckets: Sequence[int] = TEXT_BUCKETS) -> int:
  """Smallest bucket >= the longest sequence (last non-zero token) in ids [N, L].

  The causal mask makes every token's features depend only on earlier tokens, so
  running the text tower on ids[:, :bucket] gives the same EOT features.
  """
  length = ids.shape[-1]
  nonzero = ids != 0
  used = int((length - np.argmax(nonzero[..., ::-1], axis=-1)).max()) if ids.size else 1
  return next((b for b in buckets if b >= used and b <= length), length)


def _features(model, kind: str, normalize: bool):
  method = "get_text_features" if kind == "text" else "get_image_features"

  def fn(params, x):
    out = model.apply({"params": params}, x, method=method)
    return losses.l2_normalize(out) if normalize else out.astype(jnp.float32)
  return fn


@functools.lru_cache(maxsize=None)
def _pmapped(model, kind: str, normalize: bool):
  return jax.pmap(_features(model, kind, normalize))


@functools.lru_cache(maxsize=None)
def _sharded(model, kind: str, normalize: bool, mesh):
  """jit on the inputs' shardings (params placed by `Embedder`, batch over all devices)."""
  return jax.jit(_features(model, kind, normalize),
                 out_shardings=sharding.batch_sharding(mesh))


class Embedder:
  """Embeds with `model`/`params` replicated on local devices.

  texts(ids [N, L] int32) -> [N, D]; images(items, load) -> [N, D] where `load(item)`
  returns one preprocessed float32 [S, S, 3] image (items may be arrays or paths).
  Outputs are L2-normalized float32 unless normalize=False. `dtype` (a `DTYPES` name;
  None keeps the model's) is the compute precision. `mesh`: shard as fsdp training does
  (module docstring); None replicates on local devices (pmap).
  """

  def __init__(self, model, params, batch_size: int = 256, normalize: bool = True,
               progress: bool = True, dtype: str | None = None, mesh=None):
    if dtype is not None and dtype not in DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
    self.model = model if dtype is None else model.clone(dtype=DTYPES[dtype])
    self.n_local = jax.local_device_count()
    self.batch_size = math.ceil(batch_size / self.n_local) * self.n_local
    self.normalize = normalize
    self.progress = progress and jax.process_index() == 0
    self.mesh = mesh
    if mesh is None:
      self.params = jax_utils.replicate(params)
    else:
      self.params = jax.device_put(params, sharding.state_shardings(params, mesh))

  def texts(self, ids: np.ndarray, desc: str = "texts") -> np.ndarray:
    ids = np.asarray(ids, np.int32)
    ids = ids[:, :bucket_length(ids)]
    return self._run("text", len(ids), lambda lo, hi: ids[lo:hi], desc)

  def images(self, items: Sequence, load: Callable | None = None, desc: str = "images",
             gather: bool = True) -> np.ndarray:
    """gather=False: only this process's `process_block` rows [hi - lo, D]."""
    load = load or (lambda x: x)
    return self._run("image", len(items),
                     lambda lo, hi: np.stack([load(items[i]) for i in range(lo, hi)]), desc,
                     gather)

  def _run(self, kind, n, get, desc, gather: bool = True) -> np.ndarray:
    if n == 0:
      raise ValueError(f"Nothing to embed: no {desc}")
    fn = (_pmapped(self.model, kind, self.normalize) if self.mesh is None else
          _sharded(self.model, kind, self.normalize, self.mesh))
    lo, hi = process_block(n)
    per_proc = math.ceil(n / jax.process_count())
    steps = max(1, math.ceil(per_proc / self.batch_size))  # same count on every process
    outs = []
    for s in tqdm(range(steps), desc=f"embed {desc}", disable=not self.progress):
      a, b = min(hi, lo + s * self.batch_size), min(hi, lo + (s + 1) * self.batch_size)
      # A process past its last example still joins the collective batch (with filler).
      x = get(a, b) if b > a else get(0, 1)
      outs.append(self._apply(fn, x, b - a))
    local = np.concatenate(outs)[:hi - lo]
    return gather_blocks(local, n) if gather else local

  def _apply(self, fn, x, count):
    pad = self.batch_size - len(x)
    x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) if pad else x
    if self.mesh is not None:  # this process's rows of one global batch
      out = fn(self.params, jax.make_array_from_process_local_data(
          sharding.batch_sharding(self.mesh), x))
      shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
      return np.concatenate([np.asarray(s.data) for s in shards])[:count]
    x = x.reshape((self.n_local, -1) + x.shape[1:])
    out = np.asarray(fn(self.params, x))
    return out.reshape((self.batch_size,) + out.shape[2:])[:count]

