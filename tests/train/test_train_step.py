"""The train step: partition, frozen leaves, clamping, device-count invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils, traverse_util

from negclip_jax.model import clip as model_lib
from negclip_jax.train import losses, optim, param_groups
from negclip_jax.train import step as train_step

CONFIG = model_lib.get_config("tiny")
MODEL = model_lib.CLIP(CONFIG)


def make_batch(global_batch, seed=0, pixels=True, distractors=False):
  rng = np.random.default_rng(seed)
  c = CONFIG

  def ids():
    x = rng.integers(1, 1000, (global_batch, c.text.max_position_embeddings)).astype(np.int32)
    for i, e in enumerate(rng.integers(2, c.text.max_position_embeddings, global_batch)):
      x[i, e], x[i, e + 1 :] = 49407, 0
    return x

  def images():
    return rng.standard_normal((global_batch, c.vision.image_size, c.vision.image_size, 3)).astype(
      np.float32
    )

  batch = {
    k: ids()
    for k in (
      "presence_caption_ids",
      "presence_negated_ids",
      "absence_caption_ids",
      "absence_updated_ids",
    )
  }
  emb = lambda: rng.standard_normal((global_batch, c.projection_dim)).astype(np.float32)
  prefixes = ("presence", "absence") + (("presence_distractor",) if distractors else ())
  for prefix in prefixes:
    if pixels:
      batch[f"{prefix}_pixels"] = images()
    else:
      batch[f"{prefix}_image_emb"] = emb()
  return batch


def setup(layers="front", lr=1e-3, **step_kw):
  params = model_lib.init_params(MODEL, jax.random.key(0))
  labels = param_groups.label_params(params, layers)
  tx = optim.make_optimizer(
    labels, learning_rate=lr, warmup_steps=1, total_steps=10, grad_clip_norm=1.0
  )
  step = train_step.make_train_step(MODEL, labels, tx, **step_kw)
  return params, labels, tx, step


def run_pmap(step, params, tx, batches, devices):
  n = len(devices)
  fn = jax.pmap(step, axis_name=train_step.AXIS, devices=devices)
  state = jax_utils.replicate(train_step.create_train_state(params, tx), devices)
  metrics = []
  for b in batches:
    state, m = fn(state, jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), b))
    metrics.append(jax.tree.map(lambda x: np.asarray(x[0]), m))
  return jax.tree.map(lambda x: np.asarray(x[0]), state), metrics


def test_frozen_bitwise_trainable_changed_logit_scale_clamped():
  params, labels, tx, step = setup(lr=1e-2)
  params["logit_scale"] = jnp.asarray(np.log(100.0) - 1e-4, jnp.float32)
  state, metrics = run_pmap(
    step, params, tx, [make_batch(8, s) for s in range(3)], jax.devices()[:1]
  )
  flat_old = traverse_util.flatten_dict(params)
  flat_new = traverse_util.flatten_dict(state.params)
  flat_labels = traverse_util.flatten_dict(labels)
  for path, old in flat_old.items():
    new = flat_new[path]
    if flat_labels[path] == param_groups.FROZEN:
      assert np.array_equal(np.asarray(old), new), path
    elif path != ("logit_scale",):
      assert not np.array_equal(np.asarray(old), new), path
  assert 0.0 <= state.params["logit_scale"] <= np.log(100.0) + 1e-7
  assert all(np.isfinite(m["total"]) for m in metrics)
  assert {"L1", "L2", "L3", "L_neg", "L_orig", "L_text", "total", "logit_scale"} <= set(metrics[0])


def test_layer_presets_and_labels():
  assert param_groups.text_layers("front", 12) == (0, 1, 2, 3, 4, 5)
  assert param_groups.text_layers("middle", 12) == (4, 5, 6, 7)
  assert param_groups.text_layers("back", 12) == (8, 9, 10, 11)
  assert param_groups.text_layers("whole", 12) == tuple(range(12))
  assert param_groups.text_layers([3, 1, 3], 12) == (1, 3)
  with pytest.raises(ValueError, match=r"\[12\] out of range"):
    param_groups.text_layers([12], 12)
  with pytest.raises(ValueError, match="Unknown layer preset 'top'"):
    param_groups.text_layers("top", 12)
  params = model_lib.init_params(MODEL, jax.random.key(0))
  labels = traverse_util.flatten_dict(param_groups.label_params(params, "front"))
  trainable = {"/".join(p) for p, label in labels.items() if label == param_groups.TRAINABLE}
  assert "text_model/embeddings/token_embedding/embedding" in trainable
  assert "text_model/encoder/layers/1/mlp/fc1/kernel" in trainable
  assert "text_model/encoder/layers/2/mlp/fc1/kernel" not in trainable
  assert "logit_scale" in trainable and "text_projection/kernel" in trainable
  assert not any(p.startswith(("vision_model", "visual_projection")) for p in trainable)
  extra = param_groups.label_params(params, "front", extra_trainable=[r"layers/3/layer_norm1"])
  assert (
    traverse_util.flatten_dict(extra)[
      ("text_model", "encoder", "layers", "3", "layer_norm1", "scale")
    ]
    == "trainable"
  )
  with pytest.raises(ValueError, match="vision tower is always frozen"):
    param_groups.label_params(params, "front", extra_trainable=[r"vision_model/.*/fc1"])
  assert "trainable text blocks: [0, 1]" in param_groups.summary(
    params, param_groups.label_params(params, "front")
  )


def test_optimizer_state_only_for_trainable_leaves():
  params, labels, tx, _ = setup()
  state = tx.init(params)
  # Adam keeps mu and nu per trainable leaf (+ a few scalar counts); nothing for frozen leaves.
  sizes = sum(x.size for x in jax.tree.leaves(state))
  trainable_size = sum(v.size for v in param_groups.split(params, labels)[0].values())
  assert 2 * trainable_size <= sizes <= 2 * trainable_size + 8


def _count_weight_grads(layers):
  params, _, tx, step = setup(layers)
  state = train_step.create_train_state(params, tx)
  batch = make_batch(4)
  fn = jax.pmap(step, axis_name=train_step.AXIS, devices=jax.devices()[:1])
  jaxpr = jax.make_jaxpr(fn)(
    jax_utils.replicate(state, jax.devices()[:1]), jax.tree.map(lambda x: x[None], batch)
  )
  return str(jaxpr).count("dot_general")


def test_frozen_weight_gradients_are_not_computed():
  # Each trainable block adds 6 weight-gradient matmuls (q, k, v, out, fc1, fc2);
  # frozen blocks only pass activation gradients through.
  front, whole = _count_weight_grads("front"), _count_weight_grads("whole")
  frozen_blocks = CONFIG.text.num_hidden_layers - len(
    param_groups.text_layers("front", CONFIG.text.num_hidden_layers)
  )
  assert whole - front == 6 * frozen_blocks


@pytest.mark.parametrize(
  "pixels,objective",
  [(True, "omni_negclip"), (False, "omni_negclip"), (False, "conclip"), (False, "paired_choices")],
)
def test_one_and_four_devices_agree(pixels, objective):
  params, _, tx, step = setup(objective=objective)
  batches = [
    make_batch(8, s, pixels, distractors=objective in losses.DISTRACTOR_OBJECTIVES)
    for s in range(2)
  ]
  one, m1 = run_pmap(step, params, tx, batches, jax.devices()[:1])
  four, m4 = run_pmap(step, params, tx, batches, jax.devices()[:4])
  for a, b in zip(m1, m4):
    np.testing.assert_allclose(a["total"], b["total"], rtol=1e-5, atol=1e-5)
  # paired_choices' loss is a mean of per-example terms, so a token seen in one example
  # gets a tiny gradient whose float noise Adam's normalization turns into ~1e-5 of update
  # (measured: 1 of 1.58M token-embedding entries off by 1.03e-5).
  atol = 2e-5 if objective == "paired_choices" else 1e-5
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)


def test_local_negatives_differ_from_global():
  params, _, tx, step = setup(global_negatives=False)
  batches = [make_batch(8, 0)]
  _, m_local = run_pmap(step, params, tx, batches, jax.devices()[:4])
  _, m_one = run_pmap(step, params, tx, batches, jax.devices()[:1])
  assert not np.allclose(m_local[0]["total"], m_one[0]["total"], rtol=1e-4)


def test_shard_map_equals_pmap():
  params, _, tx, step = setup()
  batch = make_batch(8, 3)
  want, m_pmap = run_pmap(step, params, tx, [batch], jax.devices()[:4])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), (train_step.AXIS,))
  fn = train_step.shard_map_train_step(step, mesh)
  state, m = fn(train_step.create_train_state(params, tx), batch)
  np.testing.assert_allclose(np.asarray(m["total"]), m_pmap[0]["total"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7)


def test_conclip_without_distractors_names_the_missing_key():
  params, _, tx, step = setup(objective="conclip")
  with pytest.raises(
    ValueError, match="needs presence_distractor_pixels or presence_distractor_image_emb"
  ):
    run_pmap(step, params, tx, [make_batch(4, pixels=False)], jax.devices()[:1])


def test_bfloat16_step_keeps_float32_state_and_loss_and_follows_the_float32_step():
  """dtype=bfloat16 (`config.dtype`): the matmuls run in bfloat16, the parameters, both AdamW
  moments, the loss and its softmaxes stay float32; three steps track the float32 run."""
  params, labels, tx, _ = setup(layers="whole")
  batches = [make_batch(8, s) for s in range(3)]  # pixels: the image tower runs in bf16 too
  bf16_model = model_lib.CLIP(CONFIG, dtype=jnp.bfloat16)
  bf16_step = train_step.make_train_step(bf16_model, labels, tx)
  f32_state, f32_metrics = run_pmap(
    train_step.make_train_step(MODEL, labels, tx), params, tx, batches, jax.devices()[:2]
  )
  state, metrics = run_pmap(bf16_step, params, tx, batches, jax.devices()[:2])
  leaves = jax.tree.leaves((state.params, state.opt_state))
  assert leaves and {x.dtype for x in leaves if np.ndim(x)} == {np.dtype(np.float32)}
  assert all(v.dtype == np.float32 for m in metrics for v in m.values())
  for got, want in zip(metrics, f32_metrics):  # stated tolerance: 2% of each loss term
    for k in ("total", "L1", "L2", "L3", "L_neg", "L_orig", "L_text"):
      np.testing.assert_allclose(got[k], want[k], rtol=2e-2, atol=1e-3, err_msg=k)
  moved = lambda s: np.concatenate(
    [np.ravel(a - b) for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(params))]
  )
  update, f32_update = moved(state), moved(f32_state)
  cosine = update @ f32_update / np.linalg.norm(update) / np.linalg.norm(f32_update)
  assert cosine > 0.99, cosine  # the same direction of travel after three AdamW steps
  # The compiled step: dots on bfloat16 operands, none on float32 ones but the loss's.
  batch = jax.tree.map(lambda x: x[:4], batches[0])
  jaxpr = str(
    jax.make_jaxpr(lambda s, b: bf16_step(s, b), axis_env=[(train_step.AXIS, 1)])(
      train_step.create_train_state(params, tx), batch
    )
  )
  dots = [line for line in jaxpr.splitlines() if "dot_general" in line]
  assert sum("bf16[" in line for line in dots) > 2 * len(dots) // 3, dots[:5]
