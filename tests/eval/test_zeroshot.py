"""Zero-shot classification equals an independent transformers `CLIPModel` computation, on
an image folder and a TFDS dataset in a data_dir, both built here and read through TFDS."""

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
import transformers
from PIL import Image

from negclip_jax.data.records import DataError
from negclip_jax.eval import registry
from negclip_jax.eval.tasks import zeroshot_task
from negclip_jax.model import clip as model_lib
from negclip_jax.model import convert
from negclip_jax.model.preprocess import get_preprocess
from negclip_jax.model.tokenizer import ClipTokenizer

CLASSES = ["black_dog", "blue car", "green frog", "red apple", "white cat", "yellow sun"]  # sorted,
#                                          as ImageFolder numbers its class folders
TEMPLATES = ["a photo of a {}.", "a drawing of the {}", "{}"]
PER_CLASS = 2
SIZE = 40


def _image(c, k):
  rng = np.random.default_rng(10 * c + k)
  pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  pixels[: SIZE // 2] = rng.integers(0, 256, 3)  # a flat half per image
  return pixels


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(image folder, TFDS data_dir, templates JSON, [(file, label)]) with the same images."""
  root = tmp_path_factory.mktemp("zeroshot")
  folder, files = root / "folder", []
  for c, name in enumerate(CLASSES):
    (folder / "test" / name).mkdir(parents=True)
    for k in range(PER_CLASS):
      path = folder / "test" / name / f"{k}.png"
      Image.fromarray(_image(c, k)).save(path)
      files.append((path, c))
  tfds.disable_progress_bar()

  class ZeroshotTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
            "label": tfds.features.ClassLabel(names=CLASSES),
            "image/filename": tfds.features.Text(),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, (path, c) in enumerate(files):
        yield i, {"image": np.asarray(Image.open(path)), "label": c, "image/filename": str(path)}

  ZeroshotTest(data_dir=str(root / "tfds")).download_and_prepare()
  (root / "templates.json").write_text(json.dumps(TEMPLATES))
  return folder, root / "tfds", root / "templates.json", files


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(our model, params, tokenizer, transformers CLIPModel and tokenizer from its export)."""
  model = model_lib.CLIP(model_lib.get_config("tiny"))
  params = model_lib.init_params(model, jax.random.key(3))
  out = convert.save_pretrained(
    model, params, tmp_path_factory.mktemp("hf"), tokenizer=ClipTokenizer()
  )
  return (
    model,
    params,
    ClipTokenizer(),
    transformers.CLIPModel.from_pretrained(out).eval(),
    transformers.CLIPTokenizer.from_pretrained(out),
  )


def _reference(hf, hf_tokenizer, files, context):
  """Scores [N, C] as OpenAI's notebook, in PyTorch: per-prompt normalized, averaged,
  renormalized class embeddings; images read with PIL, preprocessed as CLIPImageProcessor."""
  names = [c.replace("_", " ") for c in CLASSES]
  with torch.no_grad():
    weights = []
    for name in names:
      ids = hf_tokenizer(
        [t.format(name) for t in TEMPLATES],
        padding="max_length",
        max_length=context,
        return_tensors="pt",
      )["input_ids"]
      e = hf.get_text_features(input_ids=ids)
      e = getattr(e, "pooler_output", e)
      e = e / e.norm(dim=-1, keepdim=True)
      e = e.mean(dim=0)
      weights.append(e / e.norm())
    weights = torch.stack(weights, dim=1)
    pixels = np.stack(
      [get_preprocess("hf")(np.asarray(Image.open(p).convert("RGB")), 32) for p, _ in files]
    )
    image = hf.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    image = getattr(image, "pooler_output", image)
    image = image / image.norm(dim=-1, keepdim=True)
    return (image @ weights).numpy()


def test_folder_and_tfds_data_dir_equal_pytorch_clipmodel(data, models):
  folder, data_dir, templates, files = data
  model, params, tokenizer, hf, hf_tokenizer = models
  want = _reference(hf, hf_tokenizer, files, model.config.text.max_position_embeddings)
  labels = np.array([c for _, c in files])
  want_top = {
    k: float(
      np.mean(
        [labels[i] in torch.topk(torch.from_numpy(want[i]), k).indices for i in range(len(files))]
      )
    )
    for k in (1, 5)
  }
  assert 0 < want_top[1] < want_top[5] < 1  # the check can tell right from wrong
  key_row = {str(p): i for i, (p, _) in enumerate(files)}
  embedder = registry.Embedder(model, params, batch_size=8, progress=False)
  context = model.config.text.max_position_embeddings
  for source in ({"data": str(folder)}, {"data": "zeroshot_test", "tfds_data_dir": str(data_dir)}):
    scores, got_labels, keys, names = zeroshot_task.classify(
      embedder, tokenizer, context, **source, templates=str(templates), protocol="hf"
    )
    rows = [key_row[k] for k in keys]
    assert sorted(rows) == list(range(len(files)))
    np.testing.assert_array_equal(got_labels, labels[rows])
    np.testing.assert_allclose(scores, want[rows], atol=1e-5)
    assert names[0] == "black dog"
    result = registry.run_task(
      "zeroshot",
      model,
      params,
      tokenizer,
      progress=False,
      batch_size=8,
      **source,
      templates=str(templates),
      protocol="hf",
    )
    per_class = {
      f"top1_class_{name.replace(' ', '_')}": float(np.mean(want[labels == c].argmax(-1) == c))
      for c, name in enumerate(CLASSES)
    }
    assert len(set(per_class.values())) > 1  # classes differ: a per-class mix-up shows
    assert result == {
      "top1": want_top[1],
      "top5": want_top[5],
      **per_class,
      "n": len(files),
      "n_classes": len(CLASSES),
    }


def test_a_plain_class_folder_reads_as_its_split_and_few_classes_have_no_top5(
  data, models, tmp_path
):
  """DIR/<class>/<image> (no split level) is read as DIR/<split>/<class>/<image> is; with
  3 classes top-5 would be 1 by construction, so it is not reported."""
  folder, _, templates, _ = data
  model, params, tokenizer, _, _ = models
  run = lambda **o: registry.run_task(
    "zeroshot", model, params, tokenizer, progress=False, batch_size=8, protocol="hf", **o
  )
  full = run(data=str(folder), templates=str(templates))
  assert run(data=str(folder / "test"), templates=str(templates)) == full
  for name in CLASSES[:3]:
    shutil.copytree(folder / "test" / name, tmp_path / name)
  few = run(data=str(tmp_path), templates=str(templates))
  assert "top5" not in few and few["n_classes"] == 3 and few["n"] == 3 * PER_CLASS
  assert set(few) == {"top1", "n", "n_classes"} | {
    f"top1_class_{n.replace(' ', '_')}" for n in CLASSES[:3]
  }
  (tmp_path / CLASSES[0] / "0.png").write_bytes(b"not a png")
  with pytest.raises(DataError, match=r"0\.png.*not a readable image"):
    run(data=str(tmp_path), templates=str(templates))


def test_shipped_imagenet_lists_are_openais():
  spec = importlib.util.find_spec("open_clip")
  path = Path(list(spec.submodule_search_locations)[0]) / "zero_shot_metadata.py"
  module_spec = importlib.util.spec_from_file_location("_zero_shot_metadata", path)
  metadata = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(metadata)
  assert zeroshot_task.shipped_classnames("imagenet") == list(metadata.IMAGENET_CLASSNAMES)
  assert len(zeroshot_task.shipped_classnames("imagenet")) == 1000
  openai = zeroshot_task.load_templates("openai_imagenet")
  assert openai == [t("{}") for t in metadata.OPENAI_IMAGENET_TEMPLATES] and len(openai) == 80
  assert zeroshot_task.load_classnames(None, "imagenet2012", [f"n{i:08d}" for i in range(1000)])[
    :2
  ] == ["tench", "goldfish"]


def test_bad_inputs_fail_in_one_line(data, models, tmp_path):
  folder, data_dir, _, _ = data
  model, params, tokenizer, _, _ = models
  run = lambda **o: registry.run_task("zeroshot", model, params, tokenizer, progress=False, **o)
  with pytest.raises(DataError, match="4 class names for a dataset with 6 labels"):
    (tmp_path / "names.json").write_text(json.dumps(CLASSES[:4]))
    run(data=str(folder), classnames=str(tmp_path / "names.json"))
  with pytest.raises(DataError, match="containing '{}'"):
    (tmp_path / "t.json").write_text(json.dumps(["a photo"]))
    run(data=str(folder), templates=str(tmp_path / "t.json"))
  with pytest.raises(DataError, match="not prepared|neither a registered"):
    run(data="cifar100", tfds_data_dir=str(data_dir))
  with pytest.raises(DataError, match="cannot read split 'validation'"):
    run(data=str(folder), split="validation")
