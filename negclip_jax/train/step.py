"""The Omni-NegCLIP training step: one presence batch + one absence batch -> one update.

`make_train_step` returns a per-device function written with named-axis collectives
(`lax.all_gather`, `lax.pmean` over `axis_name`), so the same code runs under
`jax.pmap` (`pmap_train_step`) and under `jax.shard_map` on a `Mesh` (`shard_map_train_step`).

The batch (per device) is laid out as `negclip_jax.batch` says: four token-id arrays
[b, L] and, per image prefix, pixels [b, S, S, 3] or cached image features [b, D].

Global-batch negatives: embeddings are all-gathered over `axis_name` (across hosts too),
so every device evaluates the loss of the whole global batch. The gradient of
`all_gather` is a reduce-scatter, so each device's local shard receives D times its
share of d(loss)/d(embedding); `pmean` of the parameter gradients then gives exactly the
single-device gradient of the global loss. With `global_negatives=False` each device uses
only its own b examples as negatives (what a per-GPU PyTorch loss without gather does):
the loss is then the mean of per-device losses, a different (easier) objective.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from negclip_jax.train import batch as batch_lib
from negclip_jax.train import losses, packing, param_groups

MAX_LOGIT_SCALE = math.log(100.0)
AXIS = "batch"


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 []
  params: Any  # full CLIP params (nested dict)
  opt_state: Any  # optax.multi_transform state; adam moments for trainable leaves only


def create_train_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def image_embeddings(model, params, batch) -> dict:
  """Raw (un-normalized) image features per prefix, from the cache or the frozen tower."""
  out = {}
  for prefix in batch_lib.IMAGE_PREFIXES:
    if batch_lib.image_emb_key(prefix) in batch:
      out[prefix] = batch[batch_lib.image_emb_key(prefix)]
    elif batch_lib.pixels_key(prefix) in batch:
      out[prefix] = model.apply(
        {"params": params}, batch[batch_lib.pixels_key(prefix)], method="get_image_features"
      )
  return out


def text_embeddings(model, params, batch, rows=lambda x: x) -> jax.Array:
  """Raw text features [4, b, D] in `batch_lib.TEXT_KEYS` order, from the four id arrays
  or from a packed text batch (`negclip_jax.packing`, the same features to float rounding).
  `rows`: a sharding constraint for the text tower's input and output rows.

  A packed batch is one device's rows (pool [4 b], under pmap) or, for the global-array
  step (fsdp), G devices' rows stacked: rows [G R, T] and pool [G, 4 b / G] of in-group
  indices, group g holding examples [g b / G, (g + 1) b / G) of every key. The groups run
  as a batch (vmap), so each stays on its device, pooling included."""
  if packing.PACKED_POOL in batch and batch[packing.PACKED_POOL].ndim == 2:
    groups = batch[packing.PACKED_POOL].shape[0]
    packed = [
      rows(batch[k].reshape((groups, -1) + batch[k].shape[1:])) for k in packing.PACKED_KEYS
    ]
    text = rows(
      jax.vmap(
        lambda *group: model.apply({"params": params}, *group, method="get_packed_text_features")
      )(*packed)
    )  # [G, 4 b / G, D]: per group, TEXT_KEYS-major
    text = text.reshape(groups, len(batch_lib.TEXT_KEYS), -1, text.shape[-1]).swapaxes(0, 1)
  elif packing.PACKED_POOL in batch:
    text = model.apply(
      {"params": params},
      *(batch[k] for k in packing.PACKED_KEYS),
      method="get_packed_text_features",
    )
  else:
    text = rows(
      model.apply(
        {"params": params},
        rows(jnp.concatenate([batch[k] for k in batch_lib.TEXT_KEYS], axis=0)),
        method="get_text_features",
      )
    )
  return text.reshape(len(batch_lib.TEXT_KEYS), -1, text.shape[-1])


def make_train_step(
  model,
  labels,
  tx: optax.GradientTransformation,
  *,
  objective="omni_negclip",
  lambda_stage2=1.0,
  lambda_orig=1.0,
  lambda_text=1.0,
  margin=0.9,
  global_negatives=True,
  axis_name=AXIS,
  row_sharding=None,
):
  """Returns step(state, batch) -> (state, metrics), to run under pmap/shard_map.

  axis_name=None: the step sees the global batch as one array (`jax.jit` over a sharded
  mesh, `negclip_jax.sharding.Fsdp`): no collectives; the compiler inserts them. Needs
  global_negatives (the whole batch is the negatives). `row_sharding` (with axis_name=None):
  where the rows of the text tower's input and output live, the batch's sharding; without
  it the partitioner may replicate the concatenated texts and their activations.
  """
  assert axis_name is not None or global_negatives, "the global-array step sees every negative"

  def gather(x):
    if axis_name is None or not global_negatives:
      return x
    return lax.all_gather(x, axis_name, axis=0, tiled=True)

  def step(state: TrainState, batch):
    trainable, frozen = param_groups.split(state.params, labels)
    # The image tower is frozen: its features are computed outside the differentiated function.
    images = {
      k: gather(losses.l2_normalize(v))
      for k, v in image_embeddings(model, state.params, batch).items()
    }
    if objective in losses.DISTRACTOR_OBJECTIVES and "presence_distractor" not in images:
      raise ValueError(
        f"objective {objective!r} needs presence_distractor_pixels or "
        f"presence_distractor_image_emb in the batch; got keys {sorted(batch)}"
      )
    rows = (
      (lambda x: x)
      if row_sharding is None
      else (lambda x: jax.lax.with_sharding_constraint(x, row_sharding))
    )

    def loss_fn(trainable):
      params = param_groups.merge(trainable, frozen)
      text = gather_rows(losses.l2_normalize(text_embeddings(model, params, batch, rows)))
      emb = {
        "presence_image": images["presence"],
        "absence_image": images["absence"],
        **{k.removesuffix("_ids"): t for k, t in zip(batch_lib.TEXT_KEYS, text)},
      }
      if "presence_distractor" in images:
        emb["presence_distractor"] = images["presence_distractor"]
      scale = jnp.exp(losses.at_least_float32(params["logit_scale"]))
      loss, metrics = losses.total_loss(
        emb, scale, objective, lambda_stage2, lambda_orig, lambda_text, margin
      )
      return loss, {**metrics, "logit_scale": scale}

    def gather_rows(text):  # [4, b, D] -> [4, B, D]
      return jax.vmap(gather)(text) if global_negatives else text

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    if axis_name is not None:
      grads = lax.pmean(grads, axis_name)
      metrics = lax.pmean(metrics, axis_name)
    # Frozen leaves get scalar zero "gradients": nothing is computed or stored for them.
    full_grads = param_groups.merge(grads, {k: jnp.zeros((), v.dtype) for k, v in frozen.items()})
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    new_trainable = optax.apply_updates(trainable, param_groups.split(updates, labels)[0])
    if "logit_scale" in new_trainable:
      new_trainable["logit_scale"] = jnp.clip(new_trainable["logit_scale"], 0.0, MAX_LOGIT_SCALE)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(
      step=state.step + 1, opt_state=opt_state, params=param_groups.merge(new_trainable, frozen)
    )
    return new_state, metrics

  return step


def make_pretrain_step(model, tx):
  """Plain CLIP pretraining step (all parameters, global-batch negatives), per device."""

  def step(state, pixels, ids):
    def loss_fn(params):
      img = losses.l2_normalize(
        model.apply({"params": params}, pixels, method="get_image_features")
      )
      txt = losses.l2_normalize(model.apply({"params": params}, ids, method="get_text_features"))
      gather = lambda x: lax.all_gather(x, AXIS, axis=0, tiled=True)
      loss, _ = losses.clip_loss(gather(img), gather(txt), jnp.exp(params["logit_scale"]))
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), lax.pmean(
      loss, AXIS
    )

  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,))


def replicate(tree):
  """Copies `tree` to every local device ([devices, ...]) as the pmapped step returns it.

  Unlike `flax.jax_utils.replicate`, the arrays land on a mesh named after `AXIS`, the
  sharding the step's outputs have, so the second step does not recompile.
  """
  n = jax.local_device_count()
  stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)
  return jax.pmap(lambda x: x, axis_name=AXIS)(stacked)


def unreplicate(tree):
  """Host copy of local device 0's replica of a `replicate`d tree.

  Reads the device buffer; `x[0]` would compile and run a gather over the local devices
  (a gloo collective on multi-process CPU, and the XLA abort seen in CI).
  """
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def pmap_train_step(step_fn):
  """jax.pmap over local devices; state replicated [devices, ...], batch [devices, b, ...]."""
  return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,))


def shard_map_train_step(step_fn, mesh):
  """The same step under jax.shard_map: state replicated, batch sharded on its leading axis."""
  P = jax.sharding.PartitionSpec
  mapped = jax.shard_map(
    step_fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False
  )
  return jax.jit(mapped, donate_argnums=(0,))
