"""Hub ids resolve from a local Hugging Face cache; nothing here touches the network."""

import json

import jax
import numpy as np
import pytest
from huggingface_hub import constants

import negclip_jax
from negclip_jax import ClipTokenizer, rundir
from negclip_jax.model import clip as model_lib
from negclip_jax.model import convert, hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
  """An empty offline HF cache at tmp_path/hub (huggingface_hub reads its env at import)."""
  cache = tmp_path / "hub"
  cache.mkdir()
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return cache


def _cache_repo(cache, repo_id):
  """The snapshot directory of `repo_id` in the cache layout huggingface_hub writes."""
  repo = cache / f"models--{repo_id.replace('/', '--')}"
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(COMMIT)
  return repo / "snapshots" / COMMIT


def test_hub_id_loads_model_and_tokenizer_from_the_cache(hf_cache):
  config = model_lib.get_config("tiny")
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda x: rng.standard_normal(x.shape).astype(x.dtype), convert._abstract_params(config)
  )
  snapshot = _cache_repo(hf_cache, "someone/tiny-clip")
  negclip_jax.save_pretrained(model_lib.CLIP(config), params, snapshot, tokenizer=ClipTokenizer())
  model, loaded = negclip_jax.load_pretrained("someone/tiny-clip")
  assert model.config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  vocab = json.loads((snapshot / "vocab.json").read_text(encoding="utf-8"))
  vocab["a</w>"], vocab["photo</w>"] = vocab["photo</w>"], vocab["a</w>"]
  (snapshot / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  bundled = ClipTokenizer()
  own = ClipTokenizer.for_model_dir("someone/tiny-clip")  # reads the snapshot's vocab.json
  assert own(["a photo"])[0, 1] == bundled(["photo"])[0, 1]
  model, _, tokenizer = rundir.load_model("someone/tiny-clip")  # what `--model` passes
  assert model.config == config and tokenizer(["a photo"])[0, 1] == bundled(["photo"])[0, 1]


def test_missing_hub_id_fails_in_one_line_naming_the_cache(hf_cache):
  with pytest.raises(FileNotFoundError) as err:
    negclip_jax.load_pretrained("someone/not-cached")
  message = str(err.value)
  assert "'someone/not-cached'" in message and str(hf_cache) in message
  assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_local_paths_are_never_hub_ids(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "runs" / "export").mkdir(parents=True)
  assert hub.resolve("runs/export") == tmp_path.joinpath("runs", "export").relative_to(tmp_path)
  assert not hub.is_hub_id(tmp_path / "missing.pt") and not hub.is_hub_id("/abs/path")
  assert hub.is_hub_id("openai/clip-vit-base-patch32")
