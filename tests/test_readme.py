"""README's "Using it" block runs as it stands on a model that is not ViT-B/32, and the HF
directory it writes loads into transformers' processor with our tokenization."""

import dataclasses
import re

import jax
import pytest
import transformers
from helpers import ROOT

import negclip_jax
from negclip_jax.model import clip as model_lib
from negclip_jax.model.tokenizer import ClipTokenizer

HUB_ID = '"openai/clip-vit-base-patch32"'


def readme_snippet() -> str:
  """The first python block of README's "## Using it" section."""
  section = (ROOT / "README.md").read_text().split("## Using it", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  """A tiny model (16 tokens, 32 px) exported as HF with the bundled tokenizer."""
  model = model_lib.CLIP(model_lib.get_config("tiny"))
  params = model_lib.init_params(model, jax.random.key(0))
  out = tmp_path_factory.mktemp("tiny") / "hf"
  negclip_jax.save_pretrained(model, params, out, tokenizer=ClipTokenizer())
  return model, params, out


def test_readme_snippet_runs_on_a_tiny_model(tiny_export, tmp_path, monkeypatch):
  _, _, export = tiny_export
  code = readme_snippet()
  assert code.count(HUB_ID) == 1  # the model is named once; everything else follows from it
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(code.replace(HUB_ID, repr(str(export))), scope)
  assert scope["ids"].shape == (2, 16) and scope["pixels"].shape == (1, 32, 32, 3)
  projection = scope["model"].config.projection_dim
  assert scope["text"].shape == (2, projection) and scope["image_emb"].shape == (1, projection)
  # The HF directory it wrote: transformers' processor tokenizes as our tokenizer does.
  processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "out/hf")
  ours = ClipTokenizer()("a dog, not a cat", context_length=16)[0]
  want = [int(i) for i in ours if i]
  assert processor.tokenizer("a dog, not a cat")["input_ids"] == want
  assert processor.tokenizer.model_max_length == 16
  assert processor.image_processor.crop_size == {"height": 32, "width": 32}


def test_hf_export_without_tokenizer_writes_the_bundled_one_or_fails(tiny_export, tmp_path):
  model, params, _ = tiny_export
  negclip_jax.save_pretrained(model, params, tmp_path / "default")
  hf = transformers.CLIPTokenizer.from_pretrained(tmp_path / "default")
  ids = [int(i) for i in ClipTokenizer()("a dog, not a cat", 16)[0] if i]
  assert hf("a dog, not a cat")["input_ids"] == ids and len(hf) == 49408
  small = dataclasses.replace(
    model.config, text=dataclasses.replace(model.config.text, vocab_size=1000)
  )
  with pytest.raises(
    ValueError,
    match=r"tokenizer has 49408 tokens but the model's vocabulary 1000; pass save_pretrained\(\.\.\., tokenizer=\)",
  ):
    negclip_jax.save_pretrained(model_lib.CLIP(small), params, tmp_path / "small")
  assert not (tmp_path / "small").exists()
