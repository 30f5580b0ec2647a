"""Feature parity of our Flax CLIP with transformers' PyTorch `CLIPModel`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from negclip_jax.model import clip as model_lib
from negclip_jax.model import convert


def _hf_model(config, seed=0):
  torch.manual_seed(seed)
  hf = transformers.CLIPModel(transformers.CLIPConfig(**convert.config_to_hf(config))).eval()
  with torch.no_grad():  # random LayerNorms/biases so every parameter matters
    for name, p in hf.named_parameters():
      if name.endswith("bias") or "layer_norm" in name or "layrnorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return hf


def _inputs(config, n=3, seed=0):
  rng = np.random.default_rng(seed)
  length = config.text.max_position_embeddings
  ids = rng.integers(1, 49000, (n, length))
  ids[:, 0] = 49406
  eot = rng.integers(2, length, n)
  for i, e in enumerate(eot):
    ids[i, e] = 49407
    ids[i, e + 1 :] = 0
  pix = rng.standard_normal((n, config.vision.image_size, config.vision.image_size, 3))
  return ids.astype(np.int32), pix.astype(np.float32)


def _features(hf, ids, pix):
  with torch.no_grad():
    t = hf.get_text_features(input_ids=torch.from_numpy(ids).long())
    v = hf.get_image_features(pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2)))
  pool = lambda o: (o if torch.is_tensor(o) else o.pooler_output).numpy()
  return pool(t), pool(v)


@pytest.mark.parametrize("preset,eos", [("tiny", 49407), ("tiny", 2), ("vit-b-32", 2)])
def test_features_match_transformers(preset, eos):
  config = model_lib.get_config(preset)
  config = config.replace(
    text=config.text.__class__(**{**config.text.__dict__, "eos_token_id": eos})
  )
  hf = _hf_model(config)
  params = convert.state_dict_to_params(hf.state_dict(), config)
  model = model_lib.CLIP(config)
  ids, pix = _inputs(config, n=2 if preset == "vit-b-32" else 4)
  want_text, want_image = _features(hf, ids, pix)
  text = model.apply({"params": params}, jnp.asarray(ids), method="get_text_features")
  image = model.apply({"params": params}, jnp.asarray(pix), method="get_image_features")
  assert np.abs(np.asarray(text) - want_text).max() <= 1e-4
  assert np.abs(np.asarray(image) - want_image).max() <= 1e-4


def test_hidden_states_match_transformers():
  config = model_lib.get_config("tiny")
  hf = _hf_model(config)
  params = convert.state_dict_to_params(hf.state_dict(), config)
  ids, _ = _inputs(config)
  with torch.no_grad():
    want = hf.text_model(
      input_ids=torch.from_numpy(ids).long(), output_hidden_states=True
    ).hidden_states
  got = model_lib.CLIP(config).apply({"params": params}, ids, method="get_text_hidden_states")
  assert len(got) == len(want) == config.text.num_hidden_layers + 1
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=1e-4)


def test_truncating_after_eot_does_not_change_text_features():
  config = model_lib.get_config("tiny")
  model = model_lib.CLIP(config)
  params = model_lib.init_params(model, jax.random.key(1))
  ids, _ = _inputs(config, n=6)
  ids[:, 6:] = 0
  ids[:, 5] = 49407
  full = model.apply({"params": params}, ids, method="get_text_features")
  short = model.apply({"params": params}, ids[:, :8], method="get_text_features")
  # Same math on fewer rows; XLA may tile the matmuls differently (last-ulp changes).
  np.testing.assert_allclose(np.asarray(full), np.asarray(short), rtol=0, atol=1e-6)


def test_bf16_compute_is_close_to_fp32():
  config = model_lib.get_config("tiny")
  params = model_lib.init_params(model_lib.CLIP(config), jax.random.key(0))
  ids, pix = _inputs(config)
  f32 = model_lib.CLIP(config).apply({"params": params}, ids, pix)
  bf16 = model_lib.CLIP(config, dtype=jnp.bfloat16).apply({"params": params}, ids, pix)
  for a, b in zip(f32[:2], bf16[:2]):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-2, rtol=5e-2)


def test_bad_inputs_raise_clear_errors():
  config = model_lib.get_config("tiny")
  model = model_lib.CLIP(config)
  params = model_lib.init_params(model, jax.random.key(0))
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model.apply({"params": params}, np.zeros((1, 40), np.int32), method="get_text_features")
  with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\] \(NHWC"):
    model.apply(
      {"params": params}, np.zeros((1, 3, 32, 32), np.float32), method="get_image_features"
    )
  with pytest.raises(KeyError, match="Unknown CLIP preset"):
    model_lib.get_config("vit-h-15")


def test_dot_product_attention_matches_einsum_and_transformers():
  """`attention="dot_product"` (jax.nn.dot_product_attention): the same features as the
  einsum attention and as transformers' CLIPModel, unpacked and packed (segment masks)."""
  from negclip_jax.train import packing

  config = model_lib.get_config("tiny")
  hf = _hf_model(config)
  params = convert.state_dict_to_params(hf.state_dict(), config)
  ids, pix = _inputs(config, n=6)
  want_text, want_image = _features(hf, ids, pix)
  einsum = model_lib.CLIP(config)
  fused = model_lib.CLIP(config, attention="dot_product")
  for model in (einsum, fused):
    text = model.apply({"params": params}, ids, method="get_text_features")
    image = model.apply({"params": params}, pix, method="get_image_features")
    assert np.abs(np.asarray(text) - want_text).max() <= 1e-4
    assert np.abs(np.asarray(image) - want_image).max() <= 1e-4
  apply = lambda model, *args, method: np.asarray(
    model.apply({"params": params}, *args, method=method)
  )
  for method, x in (("get_text_features", ids), ("get_image_features", pix)):
    np.testing.assert_allclose(
      apply(fused, x, method=method), apply(einsum, x, method=method), rtol=0, atol=1e-5
    )
  packed = packing.pack(ids, None, config.text.max_position_embeddings, config.text.eos_token_id)
  assert len(packed[packing.PACKED_IDS]) < len(ids)  # captions share rows
  args = [packed[k] for k in packing.PACKED_KEYS]
  got = apply(fused, *args, method="get_packed_text_features")
  np.testing.assert_allclose(got, want_text, rtol=0, atol=1e-4)
  np.testing.assert_allclose(
    got, apply(einsum, *args, method="get_packed_text_features"), rtol=0, atol=1e-5
  )
  with pytest.raises(ValueError, match="attention implementation 'flash'"):
    model_lib.CLIP(config, attention="flash").apply({"params": params}, ids, pix)


def test_remat_gives_the_same_features_and_gradients():
  config = model_lib.get_config("tiny")
  params = model_lib.init_params(model_lib.CLIP(config), jax.random.key(2))
  ids, pix = _inputs(config)

  def loss(model, params):
    image, text, scale = model.apply({"params": params}, ids, pix)
    return jnp.sum(image @ text.T) * jnp.exp(scale)

  plain = jax.jit(jax.value_and_grad(lambda p: loss(model_lib.CLIP(config), p)))(params)
  remat = jax.jit(jax.value_and_grad(lambda p: loss(model_lib.CLIP(config, remat=True), p)))(params)
  np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
  leaves = jax.tree_util.tree_leaves_with_path(plain[1])
  assert len(leaves) == len(jax.tree.leaves(remat[1]))
  for (path, g), r in zip(leaves, jax.tree.leaves(remat[1])):
    # Remat reorders float32 sums: an element's error scales with its leaf's largest terms
    # (gradients up to ~20 here), not with the element itself.
    atol = 1e-6 * max(1.0, float(np.abs(g).max()))
    np.testing.assert_allclose(r, g, rtol=1e-5, atol=atol, err_msg=jax.tree_util.keystr(path))
  # The backward pass recomputes the blocks: the jaxpr holds remat (checkpoint) calls.
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(model_lib.CLIP(config, remat=True), p)))(params)
  assert "checkpoint" in str(jaxpr) or "remat" in str(jaxpr)
