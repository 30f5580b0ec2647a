"""Round trips and strictness of weight conversion (HF and OpenAI naming)."""

import argparse
import pickle

import numpy as np
import pytest
import torch
import transformers

import jax.numpy as jnp

import negclip_jax
from negclip_jax import convert, model as model_lib

# head_dim 64 so OpenAI's width // 64 head rule infers the same architecture.
OPENAI_SHAPED = model_lib.CLIPConfig(
    text=model_lib.TextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=1, max_position_embeddings=16, eos_token_id=2),
    vision=model_lib.VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=32, patch_size=8),
    projection_dim=32)


def _hf(config, seed=0):
  torch.manual_seed(seed)
  return transformers.CLIPModel(transformers.CLIPConfig(**convert.config_to_hf(config))).eval()


def _ids(n=3, length=16, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 49000, (n, length))
  ids[:, 0] = 49406
  for i, e in enumerate(rng.integers(2, length, n)):
    ids[i, e], ids[i, e + 1:] = 49407, 0
  return ids.astype(np.int32)


def _hf_text(hf, ids):
  with torch.no_grad():
    out = hf.get_text_features(input_ids=torch.from_numpy(ids).long())
  return (out if torch.is_tensor(out) else out.pooler_output).numpy()


def test_hf_round_trip_is_bitwise_and_from_pretrained_matches(tmp_path):
  config = model_lib.get_config("tiny")
  hf = _hf(config)
  src = hf.state_dict()
  hf.save_pretrained(tmp_path / "src")
  model, params = negclip_jax.load_pretrained(tmp_path / "src")
  assert model.config == config
  out = negclip_jax.save_pretrained(model, params, tmp_path / "out")
  from safetensors.numpy import load_file
  written = load_file(str(out / "model.safetensors"))
  want = {k: v.numpy() for k, v in src.items() if not k.endswith("position_ids")}
  assert set(written) == set(want)
  for k in want:
    assert written[k].dtype == want[k].dtype and np.array_equal(written[k], want[k]), k
  reloaded = transformers.CLIPModel.from_pretrained(out).eval()
  ids = _ids()
  np.testing.assert_array_equal(_hf_text(reloaded, ids), _hf_text(hf, ids))
  ours = model.apply({"params": params}, jnp.asarray(ids), method="get_text_features")
  np.testing.assert_allclose(np.asarray(ours), _hf_text(hf, ids), atol=1e-5)


def _openai_encode_text(sd, ids):
  """Independent reference: OpenAI `CLIP.encode_text` written with nn.MultiheadAttention."""
  t = {k: torch.as_tensor(v) for k, v in sd.items()}
  width = t["ln_final.weight"].shape[0]
  x = t["token_embedding.weight"][torch.from_numpy(ids).long()] + t["positional_embedding"][:ids.shape[1]]
  mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
  ln = lambda x, p: torch.nn.functional.layer_norm(x, (width,), t[p + ".weight"], t[p + ".bias"])
  i = 0
  while f"transformer.resblocks.{i}.ln_1.weight" in t:
    p = f"transformer.resblocks.{i}."
    attn = torch.nn.MultiheadAttention(width, width // 64, batch_first=True)
    attn.load_state_dict({k[len(p) + 5:]: v for k, v in t.items() if k.startswith(p + "attn.")})
    h = ln(x, p + "ln_1")
    x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = torch.nn.functional.linear(ln(x, p + "ln_2"), t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)
    x = x + torch.nn.functional.linear(h, t[p + "mlp.c_proj.weight"], t[p + "mlp.c_proj.bias"])
    i += 1
  x = ln(x, "ln_final")
  return (x[torch.arange(len(ids)), torch.from_numpy(ids).long().argmax(-1)] @ t["text_projection"]).detach().numpy()


def test_openai_round_trip_and_reference_forward(tmp_path):
  hf = _hf(OPENAI_SHAPED)
  openai_sd = convert.hf_to_openai({k: v.numpy() for k, v in hf.state_dict().items()})
  assert openai_sd["transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
  torch.save({k: torch.from_numpy(v) for k, v in openai_sd.items()}, tmp_path / "openai.pt")
  model, params = negclip_jax.load_pretrained(tmp_path / "openai.pt")
  assert model.config == OPENAI_SHAPED
  ids = _ids()
  ours = model.apply({"params": params}, jnp.asarray(ids), method="get_text_features")
  np.testing.assert_allclose(np.asarray(ours), _openai_encode_text(openai_sd, ids), atol=1e-5)
  out = negclip_jax.save_pretrained(model, params, tmp_path / "export", format="openai")
  back = torch.load(out / "model.pt", weights_only=True)
  assert set(back) == set(openai_sd)
  for k, v in openai_sd.items():
    assert np.array_equal(back[k].numpy(), v), k


def test_omni_negclip_training_checkpoint_loads(tmp_path):
  hf = _hf(OPENAI_SHAPED)
  openai_sd = convert.hf_to_openai({k: v.numpy() for k, v in hf.state_dict().items()})
  ckpt = {"model": {"module." + k: torch.from_numpy(v) for k, v in openai_sd.items()},
          "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6}]},
          "args": argparse.Namespace(lr=1e-6, batch_size=128)}
  torch.save(ckpt, tmp_path / "best.pt")
  model, params = negclip_jax.load_pretrained(tmp_path / "best.pt")
  ids = _ids()
  np.testing.assert_allclose(
      np.asarray(model.apply({"params": params}, ids, method="get_text_features")),
      _hf_text(hf, ids), atol=1e-5)


class Evil:
  def __reduce__(self):
    return (print, ("arbitrary code ran",))


def test_pickle_with_arbitrary_globals_is_refused(tmp_path, capsys):
  path = tmp_path / "evil.pt"
  with open(path, "wb") as f:
    pickle.dump({"model": Evil()}, f)
  with pytest.raises(ValueError, match="weights_only=True"):
    negclip_jax.load_pretrained(path)
  assert "arbitrary code ran" not in capsys.readouterr().out


def test_mismatches_name_the_key_and_shapes(tmp_path):
  config = model_lib.get_config("tiny")
  sd = {k: v.numpy() for k, v in _hf(config).state_dict().items()}
  bad = dict(sd)
  bad["text_projection.weight"] = np.zeros((8, 32), np.float32)
  with pytest.raises(convert.CheckpointMismatchError, match=r"text_projection.weight.*\(8, 32\).*\(16, 32\)"):
    convert.state_dict_to_params(bad, config)
  missing = {k: v for k, v in sd.items() if "layers.1.mlp.fc2.bias" not in k}
  with pytest.raises(convert.CheckpointMismatchError, match="text_model.encoder.layers.1.mlp.fc2.bias"):
    convert.state_dict_to_params(missing, config)
  with pytest.raises(convert.CheckpointMismatchError, match="unexpected keys.*extra.weight"):
    convert.state_dict_to_params({**sd, "extra.weight": np.zeros(1)}, config)


def test_missing_files_and_unknown_architectures(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing_here.pt"):
    negclip_jax.load_pretrained(tmp_path / "nothing_here.pt")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    negclip_jax.load_pretrained(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text('{"model_type": "siglip"}')
  with pytest.raises(ValueError, match="siglip"):
    negclip_jax.load_pretrained(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text('{"model_type": "clip"}')
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    negclip_jax.load_pretrained(tmp_path / "empty")
