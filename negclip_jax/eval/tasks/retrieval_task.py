"""Zero-shot image-text retrieval on a Karpathy split (COCO or Flickr30k)."""

from __future__ import annotations

from negclip_jax.data.karpathy import load_karpathy
from negclip_jax.data.records import RetrievalSet
from negclip_jax.eval import embed, metrics


def evaluate(
  embedder,
  tokenizer,
  context_length: int,
  data: RetrievalSet,
  protocol: str = "original",
  ties: str = "optimistic",
) -> dict:
  """ "{t2i,i2t}_r{1,5,10}", "{t2i,i2t}_mean_rank" (1-based), "n" texts, "n_images"."""
  images = embed.embed_files(embedder, data.image_paths, protocol=protocol)
  texts = embed.embed_texts(embedder, tokenizer, context_length, data.captions, "captions")
  out = metrics.retrieval_metrics(images, texts, data.caption_to_image, mean_rank=True, ties=ties)
  return {**out, "n": len(data.captions), "n_images": len(data.image_paths)}


def run(
  embedder,
  tokenizer,
  context_length: int,
  *,
  data: str,
  image_root: str,
  split: str = "test",
  protocol: str = "original",
  ties: str = "optimistic",
) -> dict:
  """`evaluate` on `split` of dataset_coco.json / dataset_flickr30k.json."""
  return evaluate(
    embedder, tokenizer, context_length, load_karpathy(data, image_root, split), protocol, ties
  )
