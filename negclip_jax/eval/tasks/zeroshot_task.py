"""Zero-shot image classification (ImageNet-style): top-1 / top-5 and per-class accuracy.

Each class's embedding is the prompt ensemble of OpenAI's ImageNet notebook: embed every
template filled with the class name, L2-normalize per prompt, average, renormalize
(computed once). An image is assigned the classes of highest cosine similarity.

Images come through TFDS: a dataset prepared under a local ``data_dir`` (``imagenet2012``
with split ``validation``, ``cifar100``, ``caltech101``, ...) or an image folder
``DIR/<split>/<class>/<image>`` (TFDS's ``ImageFolder``) or ``DIR/<class>/<image>``. Class names and templates
(`CLASSNAMES`, `TEMPLATES`: shipped JSON in ``negclip_jax/assets/zeroshot/``, from OpenAI's
published lists) are a shipped name or a JSON file; by default the dataset's own label
names with "_" read as " ", except ``imagenet2012*``, whose WordNet ids map to OpenAI's
1000 class names. Every process reads every image; the `Embedder` splits the embedding.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from typing import Sequence

import numpy as np

from negclip_jax import storage
from negclip_jax.data.records import DataError
from negclip_jax.data.tfds_source import load_tfds_images
from negclip_jax.eval import embed

ASSETS = importlib.resources.files("negclip_jax") / "assets" / "zeroshot"
CLASSNAMES = {"imagenet": "imagenet_classnames.json"}
TEMPLATES = ("openai_imagenet", "simple_imagenet")
_CHUNK = 4096  # images held in memory at once


def shipped_classnames(name: str) -> list[str]:
  return json.loads((ASSETS / CLASSNAMES[name]).read_text())["classnames"]


def load_templates(spec: str) -> list[str]:
  """A shipped template set (`TEMPLATES`) or a JSON file: a list of "...{}..." strings."""
  if spec in TEMPLATES:
    templates = json.loads((ASSETS / "templates.json").read_text())["templates"][spec]
  else:
    templates = _read_list(spec, "templates")
  if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
    raise DataError(spec, "templates must be a non-empty list of strings containing '{}'")
  return templates


def load_classnames(spec: str | None, dataset: str, label_names: Sequence[str]) -> list[str]:
  """Class names in label order: a shipped list, a JSON file, or the dataset's labels."""
  if spec is None and os.path.basename(dataset.rstrip("/")).startswith("imagenet2012"):
    spec = "imagenet"
  if spec is None:
    names = [n.replace("_", " ") for n in label_names]
  elif spec in CLASSNAMES:
    names = shipped_classnames(spec)
  else:
    names = _read_list(spec, "classnames")
  if len(names) != len(label_names):
    raise DataError(
      spec or dataset, f"{len(names)} class names for a dataset with {len(label_names)} labels"
    )
  return names


def _read_list(path: str, key: str) -> list:
  """A JSON list from `path`, or the `key` entry of a JSON object there."""
  if not storage.isfile(path):
    raise DataError(path, f"neither a shipped {key} name nor a JSON file")
  try:
    value = json.loads(storage.path(path).read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(path, f"not valid UTF-8 JSON ({e})") from e
  return value.get(key, []) if isinstance(value, dict) else value


def class_embeddings(
  embedder, tokenizer, context_length: int, classnames: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
  """[C, D] prompt-ensembled, L2-normalized class embeddings."""
  texts = [t.format(c) for c in classnames for t in templates]
  prompts = embed.embed_texts(embedder, tokenizer, context_length, texts, "prompts")
  mean = prompts.reshape(len(classnames), len(templates), -1).mean(axis=1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """[N] bool: label among the k highest scores [N, C] (ties broken by class index)."""
  top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
  return (top == labels[:, None]).any(axis=-1)


def classify(
  embedder,
  tokenizer,
  context_length: int,
  *,
  data: str,
  tfds_data_dir: str | None = None,
  split: str = "test",
  classnames: str | None = None,
  templates: str = "openai_imagenet",
  protocol: str = "original",
  num: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
  """(scores [N, C] cosine similarities, labels [N], example keys, class names)."""
  examples, label_names, count = load_tfds_images(data, split, data_dir=tfds_data_dir)
  names = load_classnames(classnames, data, label_names)
  classes = class_embeddings(embedder, tokenizer, context_length, names, load_templates(templates))
  load = embed.image_loader(embedder, protocol)
  count = count if num is None else min(num, count)
  scores, labels, keys, chunk = [], [], [], []

  def flush():
    images = embedder.images([image for image, _, _ in chunk], load, desc="images")
    scores.append(images @ classes.T)
    labels.extend(label for _, label, _ in chunk)
    keys.extend(key for _, _, key in chunk)
    chunk.clear()

  for i, example in enumerate(examples):
    if i == count:
      break
    chunk.append(example)
    if len(chunk) == _CHUNK:
      flush()
  if chunk:
    flush()
  if not labels:
    raise DataError(data, f"split {split!r} has no images")
  return np.concatenate(scores), np.asarray(labels), keys, names


def run(embedder, tokenizer, context_length: int, **options) -> dict:
  """ "top1"; "top5" only with more than 5 classes (with 5 or fewer it is 1 by
  construction); "top1_class_<name>" (accuracy on each class's images; its class name
  with "_" for " "; NaN for a class with no images); "n" images; "n_classes"."""
  scores, labels, _, names = classify(embedder, tokenizer, context_length, **options)
  top1 = topk_correct(scores, labels, 1)
  out = {"top1": float(top1.mean())}
  if len(names) > 5:
    out["top5"] = float(topk_correct(scores, labels, 5).mean())
  for c, name in enumerate(names):
    key = f"top1_class_{name.replace(' ', '_')}"
    key = f"{key}_{c}" if key in out else key  # two classes of one name
    mine = top1[labels == c]
    out[key] = float(mine.mean()) if mine.size else float("nan")
  return {**out, "n": len(labels), "n_classes": len(names)}
