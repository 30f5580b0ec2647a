"""NegationCLIP COCO: retrieval with negation-updated captions next to the originals."""

from __future__ import annotations

from typing import Sequence

from negclip_jax.data.coco_negation import load_coco_negation
from negclip_jax.data.records import AbsenceRecord
from negclip_jax.eval import embed, metrics


def evaluate(
  embedder,
  tokenizer,
  context_length: int,
  records: Sequence[AbsenceRecord],
  protocol: str = "original",
  ties: str = "optimistic",
) -> dict:
  """R@1/5/10 both ways: keys "{updated,original}_{t2i,i2t}_r{1,5,10}", "n", "n_images".

  The gallery is the records' distinct images; one text per record (n texts).
  """
  paths, caption_to_image = embed.gallery([r.image_path for r in records])
  images = embed.embed_files(embedder, paths, protocol=protocol)
  out = {}
  for name, texts in (
    ("updated", [r.updated for r in records]),
    ("original", [r.caption for r in records]),
  ):
    text_emb = embed.embed_texts(embedder, tokenizer, context_length, texts, f"{name} captions")
    out.update(
      {
        f"{name}_{k}": v
        for k, v in metrics.retrieval_metrics(images, text_emb, caption_to_image, ties=ties).items()
      }
    )
  return {**out, "n": len(records), "n_images": len(paths)}


def run(
  embedder,
  tokenizer,
  context_length: int,
  *,
  data: str,
  image_root: str,
  protocol: str = "original",
  ties: str = "optimistic",
) -> dict:
  """`evaluate` on a COCO-captions JSON with `updated_caption`s."""
  return evaluate(
    embedder, tokenizer, context_length, load_coco_negation(data, image_root), protocol, ties
  )
