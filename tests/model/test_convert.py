"""Round trips and strictness of weight conversion (HF and OpenAI naming)."""

import argparse
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from references import open_clip_model

import negclip_jax
from negclip_jax.model import clip as model_lib
from negclip_jax.model import convert

# head_dim 64 so OpenAI's width // 64 head rule infers the same architecture.
OPENAI_SHAPED = model_lib.CLIPConfig(
  text=model_lib.TextConfig(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=1,
    max_position_embeddings=16,
    eos_token_id=2,
  ),
  vision=model_lib.VisionConfig(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
  ),
  projection_dim=32,
)


def _hf(config, seed=0):
  torch.manual_seed(seed)
  return transformers.CLIPModel(transformers.CLIPConfig(**convert.config_to_hf(config))).eval()


def _ids(n=3, length=16, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 49000, (n, length))
  ids[:, 0] = 49406
  for i, e in enumerate(rng.integers(2, length, n)):
    ids[i, e], ids[i, e + 1 :] = 49407, 0
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
  assert (tmp_path / "out/model.safetensors").stat().st_mode & 0o777 == 0o644
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
  x = (
    t["token_embedding.weight"][torch.from_numpy(ids).long()]
    + t["positional_embedding"][: ids.shape[1]]
  )
  mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
  ln = lambda x, p: torch.nn.functional.layer_norm(x, (width,), t[p + ".weight"], t[p + ".bias"])
  i = 0
  while f"transformer.resblocks.{i}.ln_1.weight" in t:
    p = f"transformer.resblocks.{i}."
    attn = torch.nn.MultiheadAttention(width, width // 64, batch_first=True)
    attn.load_state_dict({k[len(p) + 5 :]: v for k, v in t.items() if k.startswith(p + "attn.")})
    h = ln(x, p + "ln_1")
    x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = torch.nn.functional.linear(
      ln(x, p + "ln_2"), t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"]
    )
    h = h * torch.sigmoid(1.702 * h)
    x = x + torch.nn.functional.linear(h, t[p + "mlp.c_proj.weight"], t[p + "mlp.c_proj.bias"])
    i += 1
  x = ln(x, "ln_final")
  return (
    (x[torch.arange(len(ids)), torch.from_numpy(ids).long().argmax(-1)] @ t["text_projection"])
    .detach()
    .numpy()
  )


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
  ckpt = {
    "model": {"module." + k: torch.from_numpy(v) for k, v in openai_sd.items()},
    "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6}]},
    "args": argparse.Namespace(lr=1e-6, batch_size=128),
  }
  torch.save(ckpt, tmp_path / "best.pt")
  model, params = negclip_jax.load_pretrained(tmp_path / "best.pt")
  ids = _ids()
  np.testing.assert_allclose(
    np.asarray(model.apply({"params": params}, ids, method="get_text_features")),
    _hf_text(hf, ids),
    atol=1e-5,
  )


class Evil:
  def __reduce__(self):
    return (print, ("arbitrary code ran",))


def test_pickle_with_arbitrary_globals_is_refused(tmp_path, capsys):
  path = tmp_path / "evil.pt"
  with open(path, "wb") as f:
    pickle.dump({"model": Evil()}, f)
  with pytest.raises(ValueError, match=r"evil.pt: .*weights_only=True"):
    negclip_jax.load_pretrained(path)
  assert "arbitrary code ran" not in capsys.readouterr().out


def test_mismatches_name_the_key_and_shapes(tmp_path):
  config = model_lib.get_config("tiny")
  sd = {k: v.numpy() for k, v in _hf(config).state_dict().items()}
  bad = dict(sd)
  bad["text_projection.weight"] = np.zeros((8, 32), np.float32)
  with pytest.raises(
    convert.CheckpointMismatchError, match=r"text_projection.weight.*\(8, 32\).*\(16, 32\)"
  ):
    convert.state_dict_to_params(bad, config)
  missing = {k: v for k, v in sd.items() if "layers.1.mlp.fc2.bias" not in k}
  with pytest.raises(
    convert.CheckpointMismatchError, match="text_model.encoder.layers.1.mlp.fc2.bias"
  ):
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


@pytest.mark.parametrize(
  "config_bytes", [b'{"model_type": "clip",', b'["clip"]', b'{"model_type": "cl\xffip"}']
)
def test_a_malformed_config_json_is_one_line_naming_the_file(tmp_path, config_bytes):
  (tmp_path / "config.json").write_bytes(config_bytes)
  with pytest.raises(
    ValueError,
    match=r"config.json: (not valid UTF-8 JSON|expected a JSON "
    r"object, got a list)",
  ) as e:
    negclip_jax.load_pretrained(tmp_path)
  assert "\n" not in str(e.value)


def test_a_truncated_safetensors_file_names_the_file(tmp_path):
  from safetensors.numpy import save_file

  save_file({"w": np.zeros((64, 64), np.float32)}, str(tmp_path / "model.safetensors"))
  data = (tmp_path / "model.safetensors").read_bytes()
  (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"model.safetensors: unreadable safetensors file"):
    convert.read_state_dict(tmp_path / "model.safetensors")


# ------------------------------------------------------------------ exports and presets


def _random_params(config, seed=0):
  """Random float32 params for `config`, without compiling `init`."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: rng.standard_normal(x.shape).astype(x.dtype), convert._abstract_params(config)
  )


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_openai_export_round_trips_every_cheap_preset_exactly(tmp_path, name):
  config = model_lib.get_config(name)
  model = model_lib.CLIP(config)
  params = _random_params(config)
  out = negclip_jax.save_pretrained(model, params, tmp_path, format="openai")
  assert json.loads((out / convert.EXPORT_CONFIG).read_text())["weights"] == "model.pt"
  for source in (out, out / "model.pt"):
    loaded, loaded_params = negclip_jax.load_pretrained(source)
    assert loaded.config == config, source
    jax.tree.map(np.testing.assert_array_equal, loaded_params, params)


@pytest.mark.parametrize("name", sorted(set(model_lib.PRESETS) - {"tiny", "small"}))
def test_export_config_round_trips_big_presets(name):
  """Big presets: the config (all `load_pretrained` reads besides the weights) round-trips."""
  config = model_lib.get_config(name)
  back = model_lib.config_from_dict(json.loads(json.dumps(model_lib.config_to_dict(config))))
  assert back == config


def test_a_model_pt_without_its_config_uses_openai_conventions(tmp_path):
  model = model_lib.CLIP(OPENAI_SHAPED)
  out = negclip_jax.save_pretrained(model, _random_params(OPENAI_SHAPED), tmp_path, format="openai")
  (out / "model.pt").rename(out / "renamed.pt")  # model_config.json names model.pt only
  assert negclip_jax.load_pretrained(out / "renamed.pt")[0].config == OPENAI_SHAPED


# ------------------------------------------------------------------------- open_clip

# Widths that OpenAI's width / 64 rule cannot explain: text 96 wide with 3 heads,
# vision 64 wide with head_width 32 (2 heads), MLP ratios other than 4.
OPEN_CLIP_CFG = {
  "embed_dim": 32,
  "vision_cfg": {
    "image_size": [32, 32],
    "layers": 2,
    "width": 64,
    "head_width": 32,
    "mlp_ratio": 2.0,
    "patch_size": 8,
    "patch_dropout": 0.0,
  },
  "text_cfg": {
    "context_length": 16,
    "vocab_size": 1000,
    "width": 96,
    "heads": 3,
    "layers": 2,
    "mlp_ratio": 3.0,
  },
}


def _open_clip(quick_gelu, seed=0):
  cfg = dict(OPEN_CLIP_CFG, **({} if quick_gelu is None else {"quick_gelu": quick_gelu}))
  torch.manual_seed(seed)
  model = open_clip_model().CLIP(**cfg).eval()
  with torch.no_grad():  # open_clip zero-inits some tensors; make every one matter
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return cfg, model


def _open_clip_inputs(n=3, seed=0):
  """(pixels [n, 3, 32, 32] f32, ids [n, 16] int64 with EOT = 999 the max id)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 998, (n, 16))
  for i, e in enumerate(rng.integers(2, 16, n)):
    ids[i, e], ids[i, e + 1 :] = 999, 0
  return rng.standard_normal((n, 3, 32, 32)).astype(np.float32), ids


def _assert_matches_torch(model, params, torch_model, atol=1e-4):
  pixels, ids = _open_clip_inputs()
  with torch.no_grad():
    want_image = torch_model.encode_image(torch.from_numpy(pixels)).numpy()
    want_text = torch_model.encode_text(torch.from_numpy(ids)).numpy()
  image = model.apply({"params": params}, pixels.transpose(0, 2, 3, 1), method="get_image_features")
  text = model.apply({"params": params}, ids.astype(np.int32), method="get_text_features")
  np.testing.assert_allclose(np.asarray(image), want_image, atol=atol)
  np.testing.assert_allclose(np.asarray(text), want_text, atol=atol)


@pytest.mark.parametrize(
  "quick_gelu, weights",
  [(None, "open_clip_pytorch_model.bin"), (True, "open_clip_model.safetensors")],
)
def test_open_clip_directory_matches_open_clip(tmp_path, quick_gelu, weights):
  cfg, ref = _open_clip(quick_gelu)
  (tmp_path / "open_clip_config.json").write_text(
    json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073]}})
  )
  sd = ref.state_dict()
  if weights.endswith(".bin"):
    torch.save(sd, tmp_path / weights)
  else:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / weights))
  model, params = negclip_jax.load_pretrained(tmp_path)
  c = model.config
  assert (c.text.num_attention_heads, c.vision.num_attention_heads) == (3, 2)
  assert (c.text.intermediate_size, c.vision.intermediate_size) == (288, 128)
  assert c.text.hidden_act == c.vision.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
  _assert_matches_torch(model, params, ref)


def test_open_clip_options_we_do_not_implement_are_refused(tmp_path):
  cfg = json.loads(json.dumps(OPEN_CLIP_CFG))
  cfg["vision_cfg"]["ls_init_value"] = 0.1
  with pytest.raises(ValueError, match=r"cfg.json: .*vision_cfg.ls_init_value=0.1"):
    convert.config_from_open_clip({"model_cfg": cfg}, "cfg.json")
  cfg = json.loads(json.dumps(OPEN_CLIP_CFG))
  cfg["text_cfg"]["pool_type"] = "last"
  with pytest.raises(ValueError, match="pool_type"):
    convert.config_from_open_clip({"model_cfg": cfg}, "cfg.json")


# ------------------------------------------------------- bare state dicts and overrides


def test_bare_state_dict_needs_overrides_when_conventions_do_not_fit(tmp_path):
  _, ref = _open_clip(quick_gelu=None)
  path = tmp_path / "open_clip_pytorch_model.bin"
  torch.save(ref.state_dict(), path)
  with pytest.raises(
    ValueError,
    match=r"open_clip_pytorch_model.bin: text width 96 is not a "
    r"multiple of 64.*text_heads=",
  ):
    negclip_jax.load_pretrained(path)
  with pytest.raises(ValueError, match=r"text_heads=5 does not divide the text width 96"):
    negclip_jax.load_pretrained(path, text_heads=5, vision_heads=2)
  with pytest.raises(ValueError, match="hidden_act"):
    negclip_jax.load_pretrained(path, text_heads=3, vision_heads=2, activation="swish")
  model, params = negclip_jax.load_pretrained(path, text_heads=3, vision_heads=2, activation="gelu")
  _assert_matches_torch(model, params, ref)
  config = model.config
  assert negclip_jax.load_pretrained(path, config=config)[0].config == config
  with pytest.raises(ValueError, match="either config="):
    negclip_jax.load_pretrained(path, config=config, text_heads=3)
  (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
  with pytest.raises(ValueError, match="states its architecture"):
    negclip_jax.load_pretrained(tmp_path, text_heads=3)
