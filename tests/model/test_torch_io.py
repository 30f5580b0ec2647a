"""The safe torch loader: TorchScript archives read without running them, pickles refused."""

import builtins
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from references import openai_clip_model

import negclip_jax
from negclip_jax import torch_io


@pytest.fixture
def no_jit_load(monkeypatch):
  """Fails the test if anything calls torch.jit.load (which would run archive code)."""

  def refuse(*args, **kwargs):
    raise AssertionError("torch.jit.load was called")

  monkeypatch.setattr(torch.jit, "load", refuse)


def _openai_clip(seed=0):
  """A small OpenAI CLIP (width 64, so OpenAI's heads = width / 64 rule gives 1 head)."""
  torch.manual_seed(seed)
  clip = openai_clip_model()
  return clip.CLIP(
    embed_dim=32,
    image_resolution=32,
    vision_layers=2,
    vision_width=64,
    vision_patch_size=8,
    context_length=16,
    vocab_size=1000,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=2,
  ).eval()


def _inputs(n=3, length=16, vocab=1000, seed=0):
  """(pixels [n, 3, 32, 32] f32, ids [n, length] int64 with EOT = vocab - 1 the max id)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab - 2, (n, length))
  for i, e in enumerate(rng.integers(2, length, n)):
    ids[i, e], ids[i, e + 1 :] = vocab - 1, 0
  return rng.standard_normal((n, 3, 32, 32)).astype(np.float32), ids


def test_traced_openai_clip_loads_without_jit_and_matches(tmp_path, no_jit_load):
  ref = _openai_clip()
  pixels, ids = _inputs()
  example = (torch.from_numpy(pixels), torch.from_numpy(ids))
  torch.jit.save(torch.jit.trace(ref, example, check_trace=False), tmp_path / "ViT-tiny.pt")
  model, params = negclip_jax.load_pretrained(tmp_path / "ViT-tiny.pt")
  assert (model.config.text.num_attention_heads, model.config.vision.num_attention_heads) == (1, 1)
  assert model.config.text.hidden_act == "quick_gelu"
  with torch.no_grad():
    want_image, want_text = (
      ref.encode_image(example[0]).numpy(),
      ref.encode_text(example[1]).numpy(),
    )
  image = model.apply({"params": params}, pixels.transpose(0, 2, 3, 1), method="get_image_features")
  text = model.apply({"params": params}, ids.astype(np.int32), method="get_text_features")
  np.testing.assert_allclose(np.asarray(image), want_image, atol=1e-4)
  np.testing.assert_allclose(np.asarray(text), want_text, atol=1e-4)


class _Tower(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.fp16 = torch.nn.Parameter(torch.randn(3, 4).half())
    self.register_buffer("steps", torch.arange(5))
    self.register_buffer("bf16", torch.randn(2, 3).bfloat16())

  def forward(self, x):
    return x + self.fp16.float().sum() + self.steps.sum() + self.bf16.float().sum()


class _Scripted(torch.nn.Module):
  """Dtypes, nesting, views into one storage and a tensor attribute that is not state."""

  def __init__(self):
    super().__init__()
    self.tower = _Tower()
    self.linear = torch.nn.Linear(4, 6)
    base = torch.randn(8, 6)
    self.register_buffer("view", base[2:5, 1::2])  # offset and strides into a shared storage
    self.register_buffer("other_view", base[0])
    self.not_state = torch.ones(2)

  def forward(self, x):
    return (
      self.linear(self.tower(x)).sum()
      + self.view.sum()
      + self.other_view.sum()
      + self.not_state.sum()
    )


def test_read_torchscript_equals_jit_state_dict(tmp_path):
  torch.manual_seed(0)
  torch.jit.save(torch.jit.script(_Scripted()), tmp_path / "scripted.pt")
  want = torch.jit.load(tmp_path / "scripted.pt").state_dict()  # trusted: written just above
  got = torch_io.load(tmp_path / "scripted.pt")
  assert list(got) == list(want)
  for key in want:
    assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


class _Call:
  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return self.fn, (self.arg,)


def _tamper(src, dst, replace):
  """Copies the zip `src` to `dst`, replacing entries by `replace(name, data)`."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for name in zin.namelist():
      zout.writestr(name, replace(name, zin.read(name)))


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec", "code"])
def test_malicious_torchscript_is_refused_without_running(tmp_path, no_jit_load, attack):
  marker = tmp_path / "pwned"
  good = tmp_path / "good.pt"
  torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), good)
  if attack == "os.system":
    payload = pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2)
  elif attack == "builtins.exec":
    payload = pickle.dumps(_Call(builtins.exec, f"open({str(marker)!r}, 'w').close()"), protocol=2)
  bad = tmp_path / "evil.pt"
  if attack == "code":  # a valid pickle, but the class code "declares" its parameters with a call
    _tamper(
      good,
      bad,
      lambda name, data: (
        data.replace(
          b"__parameters__ = [",
          f"__parameters__ = __import__('os').system('touch {marker}') or [".encode(),
        )
        if name.endswith(".py")
        else data
      ),
    )
  else:
    _tamper(good, bad, lambda name, data: payload if name.endswith("/data.pkl") else data)
  for load in (torch_io.load, negclip_jax.load_pretrained):
    with pytest.raises(torch_io.UnreadableTorchFileError) as err:
      load(bad)
    message = str(err.value)
    assert message.startswith(f"{bad}: TorchScript archive refused") and "\n" not in message
  assert not marker.exists()


def test_pickled_objects_are_refused_naming_the_file(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  torch.save({"model": _Call(os.system, f"touch {marker}")}, path)
  with pytest.raises(torch_io.UnreadableTorchFileError) as err:
    torch_io.load(path)
  message = str(err.value)
  assert message.startswith(f"{path}: ") and "weights_only=True" in message
  assert "posix.system" in message or "os.system" in message
  assert "\n" not in message and not marker.exists()
