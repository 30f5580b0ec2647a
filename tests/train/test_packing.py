"""Packed text sequences: per-caption features, the packed step, the pipeline and the Embedder."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from negclip_jax.eval import embed
from negclip_jax.model import clip as model_lib
from negclip_jax.train import batch as batch_lib
from negclip_jax.train import packing, param_groups
from negclip_jax.train import step as train_step

TINY = model_lib.get_config("tiny")
# The tiny preset with the real 77-token context, so a full-length caption is tested.
CONFIG = TINY.replace(text=dataclasses.replace(TINY.text, max_position_embeddings=77))
CONTEXT = 77


def captions(n, seed, eos=49407, lengths=None):
  """ids [n, 77]: random tokens, EOT at length - 1, zeros after; one caption of 77 tokens."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, 30, n) if lengths is None else np.asarray(lengths)
  lengths[0] = CONTEXT
  ids = np.zeros((n, CONTEXT), np.int32)
  for i, length in enumerate(lengths):
    ids[i, : length - 1] = rng.integers(1, 49000, length - 1)
    ids[i, length - 1] = eos
  return ids


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(model_lib.CLIP(CONFIG), jax.random.key(0))


@pytest.mark.parametrize("eos_token_id", [49407, model_lib.OPENAI_EOS_TOKEN_ID])
def test_packed_features_equal_unpacked(params, eos_token_id):
  model = model_lib.CLIP(
    CONFIG.replace(text=dataclasses.replace(CONFIG.text, eos_token_id=eos_token_id))
  )
  ids = captions(24, 0)
  ids[3, 20:25] = 7  # tokens after the EOT (ignored by both)
  packed = packing.pack(ids, None, CONTEXT, eos_token_id)
  assert len(packed[packing.PACKED_IDS]) < len(ids) // 2
  want = model.apply({"params": params}, ids, method="get_text_features")
  got = model.apply(
    {"params": params}, *(packed[k] for k in packing.PACKED_KEYS), method="get_packed_text_features"
  )
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_packed_step_loss_and_gradients_equal_unpacked(params):
  """One step with optax.identity: the parameter change is the gradient."""
  model = model_lib.CLIP(CONFIG)
  labels = param_groups.label_params(params, "front")
  tx = optax.identity()
  pmapped = jax.pmap(train_step.make_train_step(model, labels, tx), axis_name=train_step.AXIS)
  one = lambda tree: jax.tree.map(lambda x: np.asarray(x)[None], tree)
  step = lambda state, batch: jax.tree.map(
    lambda x: np.asarray(x)[0], pmapped(one(state), one(batch))
  )
  b = 6
  rng = np.random.default_rng(1)
  ids = {k: captions(b, i) for i, k in enumerate(batch_lib.TEXT_KEYS)}
  images = {
    batch_lib.image_emb_key(p): rng.standard_normal((b, CONFIG.projection_dim), np.float32)
    for p in ("presence", "absence")
  }
  packed = packing.pack_text_batch(ids, 1, CONTEXT, CONFIG.text.eos_token_id)
  packed = {k: v[0] for k, v in packed.items()}
  state = train_step.create_train_state(params, tx)
  new_u, m_u = step(state, {**ids, **images})
  new_p, m_p = step(state, {**packed, **images})
  np.testing.assert_allclose(m_p["total"], m_u["total"], rtol=1e-5)
  np.testing.assert_allclose(m_p["grad_norm"], m_u["grad_norm"], rtol=1e-5)
  grads = lambda new: param_groups.split(
    jax.tree.map(lambda a, p: a - p, new.params, params), labels
  )[0]
  g_u, g_p = grads(new_u), grads(new_p)
  assert float(optax.tree.norm(g_u)) > 0
  diff = float(optax.tree.norm(jax.tree.map(lambda x, y: x - y, g_p, g_u)))
  assert diff <= 1e-5 * float(optax.tree.norm(g_u))
  scale = float(optax.tree.norm(g_u))
  for path, g in jax.tree_util.tree_leaves_with_path(g_u):  # every trainable leaf
    got = g_p
    for key in path:
      got = got[key.key]
    name = jax.tree_util.keystr(path)
    if "k_proj/bias" in name:  # analytically zero (softmax ignores it): float noise only
      assert np.abs(got).max() < 1e-7 * scale and np.abs(g).max() < 1e-7 * scale
      continue
    np.testing.assert_allclose(got, g, rtol=1e-5, atol=1e-5 * float(np.abs(g).max()), err_msg=name)


def test_fsdp_packed_step_equals_unpacked(params):
  """The global-array (fsdp) step on mesh (2, 2) fed as `Fsdp.batch` feeds it: packed rows,
  one group per device (pool [4, 4 b]), give the unpacked step's loss and gradients."""
  from negclip_jax.train import sharding

  model = model_lib.CLIP(CONFIG)
  labels = param_groups.label_params(params, "front")
  tx = optax.identity()
  fsdp = sharding.Fsdp(sharding.make_mesh(2, jax.devices()[:4]))
  step = fsdp.compile(
    train_step.make_train_step(model, labels, tx, **fsdp.step_options),
    jax.eval_shape(lambda p: train_step.create_train_state(p, tx), params),
  )
  devices, b = 4, 3  # per device
  rng = np.random.default_rng(2)
  ids = {k: captions(devices * b, 10 + i) for i, k in enumerate(batch_lib.TEXT_KEYS)}
  per_device = lambda x: x.reshape((devices, b) + x.shape[1:])
  images = {
    batch_lib.image_emb_key(p): per_device(
      rng.standard_normal((devices * b, CONFIG.projection_dim), np.float32)
    )
    for p in ("presence", "absence")
  }
  packed = packing.pack_text_batch(ids, devices, CONTEXT, CONFIG.text.eos_token_id)
  assert packed[packing.PACKED_IDS].shape[1] < 4 * b  # captions share rows
  runs = {}
  for name, text in (("unpacked", {k: per_device(v) for k, v in ids.items()}), ("packed", packed)):
    batch = fsdp.batch({**text, **images})
    if name == "packed":
      assert batch[packing.PACKED_POOL].shape == (devices, 4 * b)
    state = fsdp.init_state(params, tx)
    new, metrics = step(state, batch)
    runs[name] = (fsdp.host(new).params, fsdp.host(metrics))
  (new_u, m_u), (new_p, m_p) = runs["unpacked"], runs["packed"]
  np.testing.assert_allclose(m_p["total"], m_u["total"], rtol=1e-5)
  np.testing.assert_allclose(m_p["grad_norm"], m_u["grad_norm"], rtol=1e-5)
  grads = lambda new: param_groups.split(jax.tree.map(lambda a, p: a - p, new, params), labels)[0]
  g_u, g_p = grads(new_u), grads(new_p)
  scale = float(optax.tree.norm(g_u))
  assert scale > 0
  assert float(optax.tree.norm(jax.tree.map(lambda x, y: x - y, g_p, g_u))) <= 1e-5 * scale


def test_pack_layout_and_fallback():
  lengths = np.array([77, 30, 40, 5, 9, 2, 76, 1])
  ids = captions(8, 0, lengths=lengths.copy())
  packed = packing.pack(ids, None, CONTEXT, 49407)
  rows, pool = packed[packing.PACKED_IDS], packed[packing.PACKED_POOL]
  assert rows.shape == (4, CONTEXT)  # 77 | 76 + 1 | 40 + 30 + 5 + 2 | 9
  np.testing.assert_array_equal(rows.reshape(-1)[pool], 49407)  # every caption's EOT
  seg, pos = packed[packing.PACKED_SEGMENTS], packed[packing.PACKED_POSITIONS]
  for i, n in enumerate(lengths):  # each caption contiguous, positions 0..n-1, one segment
    r, end = divmod(int(pool[i]), CONTEXT)
    np.testing.assert_array_equal(rows[r, end - n + 1 : end + 1], ids[i, :n])
    np.testing.assert_array_equal(pos[r, end - n + 1 : end + 1], np.arange(n))
    assert len(set(seg[r, end - n + 1 : end + 1])) == 1 and seg[r, end] > 0
  assert packing.padding_fraction(packed) == pytest.approx(1 - lengths.sum() / rows.size)
  with pytest.raises(ValueError, match="need 4 packed rows of 77; the shape has 3"):
    packing.pack(ids, 3, CONTEXT, 49407)
  with pytest.raises(ValueError, match="77 tokens does not fit a packed row of 64"):
    packing.pack(ids, None, 64, 49407)
  ladder = np.array(packing.ROWS_LADDER[15:60])  # from 16 on, rungs at most 12.5% apart
  assert (ladder[1:] / ladder[:-1]).max() == 1.125
  assert [packing.ladder_rows(n) for n in (1, 16, 17, 33, 37, 64, 65)] == [
    1,
    16,
    18,
    36,
    40,
    64,
    72,
  ]


def test_pipeline_packs_every_hosts_devices_alike():
  from negclip_jax.data import negshapes
  from negclip_jax.model.tokenizer import ClipTokenizer
  from negclip_jax.train import pipeline

  presence, absence = pipeline.negshapes_tables(negshapes.generate_pairs(32, 0, image_size=32))
  kw = dict(
    tokenizer=ClipTokenizer(),
    context_length=CONTEXT,
    global_batch=8,
    seed=0,
    image_size=32,
    num_steps=3,
    process_count=2,
    local_devices=2,
  )
  plain = pipeline.TrainPipeline(presence, absence, **kw, process_index=0, truncate_text=False)
  for step in range(3):
    hosts = [
      pipeline.TrainPipeline(
        presence, absence, **kw, process_index=p, pack_text=True
      ).build_host_batch(step)
      for p in range(2)
    ]
    assert hosts[0][packing.PACKED_IDS].shape == hosts[1][packing.PACKED_IDS].shape
    assert not set(batch_lib.TEXT_KEYS) & set(hosts[0])
    want = plain.build_host_batch(step)
    for dev in range(2):  # device d's pooled tokens are its captions' EOTs, TEXT_KEYS order
      got = hosts[0][packing.PACKED_IDS][dev].reshape(-1)[hosts[0][packing.PACKED_POOL][dev]]
      assert (got == 49407).all() and len(got) == 4 * 2
      lengths = packing.pooled_lengths(
        np.concatenate([want[k][dev] for k in batch_lib.TEXT_KEYS]), 49407
      )
      assert (hosts[0][packing.PACKED_SEGMENTS][dev] > 0).sum() == lengths.sum()


def test_embedder_packed_equals_unpacked(params):
  model = model_lib.CLIP(CONFIG)
  ids = captions(37, 2)
  packed = embed.Embedder(model, params, batch_size=4, progress=False).texts(ids)
  plain = embed.Embedder(model, params, batch_size=4, progress=False, pack=False).texts(ids)
  np.testing.assert_allclose(packed, plain, rtol=0, atol=1e-5)


def test_embedder_equal_texts_get_bitwise_equal_features_across_calls(params):
  model = model_lib.CLIP(CONFIG)
  ids = captions(9, 3)
  embedder = embed.Embedder(model, params, batch_size=4, progress=False)
  first = embedder.texts(ids[:5])
  second = embedder.texts(np.concatenate([ids[5:], ids[2:4]]))  # two texts again, new rows
  np.testing.assert_array_equal(second[-2:], first[2:4])
