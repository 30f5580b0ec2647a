"""Embedding helpers shared by the tasks: tokenize/preprocess, then `Embedder`.

All outputs are L2-normalized float32 [N, D] (the Embedder's default). `protocol`
picks the image preprocessing (`negclip_jax.preprocess.PREPROCESS`: "original" =
OpenAI `clip`'s transform, "hf" = `CLIPImageProcessor`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from negclip_jax.data.records import DataError
from negclip_jax.embed import Embedder
from negclip_jax.preprocess import get_preprocess


def image_size(embedder: Embedder) -> int:
  """Side in pixels of the model's square input images."""
  return embedder.model.config.vision.image_size


def embed_texts(embedder: Embedder, tokenizer, context_length: int, texts: Sequence[str],
                desc: str = "texts") -> np.ndarray:
  """[N, D] embeddings of N texts, tokenized to `context_length`."""
  return embedder.texts(tokenizer(list(texts), context_length), desc=desc)


def image_loader(embedder: Embedder, protocol: str):
  """`load(image) -> [S, S, 3]`: `protocol`'s preprocessing to the model's input size S."""
  return functools.partial(get_preprocess(protocol), image_size=image_size(embedder))


def embed_arrays(embedder: Embedder, images: np.ndarray, desc: str = "images",
                 protocol: str = "hf") -> np.ndarray:
  """[N, D] embeddings of uint8 images [N, H, W, 3], preprocessed to the model's size."""
  return embedder.images(images, image_loader(embedder, protocol), desc=desc)


def gallery(image_paths: Sequence[str]) -> tuple[list[str], list[int]]:
  """(distinct paths in first-seen order, index of each input path among them)."""
  unique = list(dict.fromkeys(image_paths))
  row = {p: i for i, p in enumerate(unique)}
  return unique, [row[p] for p in image_paths]


def embed_files(embedder: Embedder, paths: Sequence[str], desc: str = "images",
                protocol: str = "hf") -> np.ndarray:
  """[N, D] embeddings of N image files; each distinct path is decoded and embedded once.

  A file that cannot be read raises DataError naming it, the first position (record) in
  `paths` that holds it, and the key "image_path".
  """
  unique, rows = gallery(paths)
  first = {p: i for i, p in reversed(list(enumerate(paths)))}
  load = image_loader(embedder, protocol)

  def load_file(path):
    try:
      return load(path)
    except (OSError, ValueError) as e:  # missing, truncated or not an image
      raise DataError(path, f"cannot read the image: {e}", index=first[path],
                      key="image_path") from e
  return embedder.images(unique, load_file, desc=desc)[rows]
