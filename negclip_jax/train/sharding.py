"""Where the training state and the batch live: `Pmap` (replicas) or `Fsdp` (a sharded mesh).

`config.parallelism` picks one; train.py asks it to place the state, compile the step, place
each host batch, hand Orbax the arrays to save, and describe the restore target.

* "pmap": every device holds the whole state; `train_step.make_train_step`'s per-device
  function runs under `jax.pmap` with `lax.all_gather` / `lax.pmean` over `train_step.AXIS`.
* "fsdp": one `jax.jit` step over a `Mesh` with axes ("data", "fsdp"). The batch is sharded
  over both axes (every device gets B / devices examples); each parameter and its AdamW
  moments are sharded over "fsdp" along their largest dimension that the axis divides, and
  replicated when none does (`param_spec`).

Why sharding annotations, not `shard_map`: the step is written once, on global arrays
(`make_train_step(axis_name=None)`: the global batch is the gather, no `pmean`), and only
its inputs and outputs carry shardings, plus one constraint keeping the text tower's rows
batch-sharded (`row_sharding`). XLA's SPMD partitioner then inserts the per-layer
all-gathers of the parameters, the reduce-scatters of their gradients and the gathers of
the embeddings for global-batch negatives. Under `shard_map` every Flax layer would have to
gather its own weights by hand (the model would need to know the mesh), and the optimizer
would see shards whose global norm (clipping) needs its own collective; the annotated step
keeps the model, the losses and the optimizer unchanged, and the same state runs on any
mesh shape, which is what lets a checkpoint move between meshes.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from negclip_jax.train import packing
from negclip_jax.train import step as train_step

PARALLELISMS = ("pmap", "fsdp")
DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch's leading dimension is split over both mesh axes


def make_mesh(fsdp: int = -1, devices=None) -> Mesh:
  """Mesh (devices / fsdp, fsdp) with axes ("data", "fsdp"); fsdp=-1: every device."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = n if fsdp in (-1, 0) else fsdp
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"config.fsdp={fsdp} must divide the {n} devices (or be -1: all of them)")
  return Mesh(
    np.asarray(devices).reshape(n // fsdp, fsdp),
    (DATA, FSDP),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )


def param_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """PartitionSpec sharding `shape` over "fsdp" on its largest dimension that `fsdp_size`
  divides (the first such on ties); P() (replicated) for scalars and when none divides."""
  if fsdp_size == 1:
    return P()
  fits = [i for i in range(len(shape)) if shape[i] % fsdp_size == 0]
  if not fits:
    return P()
  dim = max(fits, key=lambda i: (shape[i], -i))
  return P(*(FSDP if i == dim else None for i in range(len(shape))))


def state_shardings(abstract_tree, mesh: Mesh):
  """NamedSharding per leaf of a state (or params) tree, by `param_spec` of its shape."""
  return jax.tree.map(
    lambda x: NamedSharding(mesh, param_spec(np.shape(x), mesh.shape[FSDP])), abstract_tree
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying `shardings`: an Orbax restore target / compile input."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), abstract_tree, shardings
  )


def fsdp_train_step(step_fn: Callable, mesh: Mesh, shardings) -> Callable:
  """jit of the global-array step `make_train_step(..., axis_name=None)`: state in and out
  with `shardings`, batch sharded over every device, metrics replicated."""
  return jax.jit(
    step_fn,
    in_shardings=(shardings, batch_sharding(mesh)),
    out_shardings=(shardings, NamedSharding(mesh, P())),
    donate_argnums=(0,),
  )


class Pmap:
  """The state replicated on every local device ([devices, ...]), the per-device step."""

  step_options = {"axis_name": train_step.AXIS}  # for `train_step.make_train_step`
  mesh = None  # `Embedder` replicates

  def __init__(self):
    self.replicated = NamedSharding(Mesh(np.asarray(jax.devices()), ("replica",)), P())

  def init_state(self, params, tx):
    return train_step.replicate(train_step.create_train_state(params, tx))

  def place(self, state):
    """A restored (replicated global) state -> the pmapped layout."""
    return train_step.replicate(state)

  def restore_target(self, abstract_state):
    return with_shardings(abstract_state, jax.tree.map(lambda _: self.replicated, abstract_state))

  def compile(self, step_fn, state):
    del state  # pmap specializes on its first call
    return train_step.pmap_train_step(step_fn)

  def batch(self, host_batch: dict) -> dict:
    return host_batch  # [local devices, b, ...]

  def to_save(self, rstate):
    """One replicated global jax.Array per leaf, built from the device copies (no host copy;
    Orbax writes replica 0)."""

    def global_replica(x):
      shards = [s.data.reshape(x.shape[1:]) for s in x.addressable_shards]
      return jax.make_array_from_single_device_arrays(x.shape[1:], self.replicated, shards)

    return jax.tree.map(global_replica, rstate)

  def host(self, tree):
    """Host copy of local device 0's replica (`train_step.unreplicate`)."""
    return train_step.unreplicate(tree)

  eval_params = host  # what `Embedder(mesh=None)` replicates


class Fsdp:
  """State sharded over the mesh's "fsdp" axis, batch over all devices, one jitted step."""

  def __init__(self, mesh: Mesh):
    self.mesh = mesh
    self.step_options = {"axis_name": None, "row_sharding": batch_sharding(mesh)}

  def shardings(self, abstract_tree):
    return state_shardings(abstract_tree, self.mesh)

  def init_state(self, params, tx):
    """The state created sharded: the optimizer moments never exist unsharded. `params`
    (host or one device, the same on every process) are cut into this process's shards."""
    params = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x[i])),
      params,
      self.shardings(params),
    )
    create = lambda p: train_step.create_train_state(p, tx)
    abstract = jax.eval_shape(create, params)
    return jax.jit(create, out_shardings=self.shardings(abstract))(params)

  def place(self, state):
    return jax.device_put(state, self.shardings(state))

  def restore_target(self, abstract_state):
    return with_shardings(abstract_state, self.shardings(abstract_state))

  def compile(self, step_fn, state):
    """`fsdp_train_step` for states shaped like `state` (arrays or ShapeDtypeStructs)."""
    return fsdp_train_step(step_fn, self.mesh, self.shardings(state))

  def batch(self, host_batch: dict) -> dict:
    """This process's [local devices, b, ...] rows -> global arrays sharded over the mesh.
    A packed text pool keeps its device axis ([devices, 4 b]: in-group indices, one group
    of packed rows per device; `train_step.text_embeddings`)."""
    sharding = batch_sharding(self.mesh)
    flat = lambda k, v: v if k == packing.PACKED_POOL else v.reshape((-1,) + v.shape[2:])
    return {
      k: jax.make_array_from_process_local_data(sharding, flat(k, v)) for k, v in host_batch.items()
    }

  def to_save(self, state):
    return state  # the sharded arrays: each process writes the shards it holds

  def eval_params(self, params):
    return params  # `Embedder(mesh=self.mesh)` uses the shards in place

  def host(self, tree):
    """Host copy of the global value on every process (a gather across processes for
    sharded leaves; replicated ones are read from a local device)."""

    def one(x):
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)


def for_config(config) -> Pmap | Fsdp:
  """`config.parallelism` ("pmap" | "fsdp", with `config.fsdp` devices per fsdp group)."""
  kind = config.get("parallelism", "pmap")
  assert kind in PARALLELISMS, kind  # `trainer.validate_config` says so to the user
  return Pmap() if kind == "pmap" else Fsdp(make_mesh(config.get("fsdp", -1)))
