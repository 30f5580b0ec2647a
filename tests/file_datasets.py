"""Small training datasets in the original file formats, written by the tests."""

import json
from pathlib import Path


def write_file_datasets(root: Path, n: int, size: int) -> dict:
  """NegShapes written as CC-Neg (.pt), NegationCLIP COCO (json) and CoN-CLIP's distractor
  mapping over a COCO-train2017-like folder, all PNG; returns the config.data overrides."""
  import torch
  from PIL import Image

  from negclip_jax.data import negshapes

  data = negshapes.generate_pairs(n, seed=1, image_size=size, distractors=True)
  for sub in ("cc3m/images", "coco"):
    (root / sub).mkdir(parents=True)
  for i in range(n):
    Image.fromarray(data["images"][i]).save(root / "cc3m/images" / f"{i}.png")
    Image.fromarray(data["distractor_images"][i]).save(root / "coco" / f"{1000 + i}.png")
  torch.save({"image_paths": [f"/workspace/datasets/cc3m/images/{i}.png" for i in range(n)],
              "annotations": [{"json": {"caption": c}, "sop_data": {"negative-prompt": m}}
                              for c, m in zip(data["captions"], data["negated"])]},
             root / "ccneg_preprocessed.pt")
  ids = [1000 + i for i in range(n)][::-1]  # listed out of order; the mapping uses sorted ids
  (root / "captions_train2017.json").write_text(json.dumps(
      {"images": [{"id": k, "file_name": f"{k}.png"} for k in ids], "annotations": []}))
  torch.save([[i, (i + 1) % n] for i in range(n)], root / "distractor_image_mapping.pt")
  (root / "negation_coco.json").write_text(json.dumps({
      "images": [{"id": i, "file_name": f"{i}.png"} for i in range(n)],
      "annotations": [{"image_id": i, "caption": c, "updated_caption": u}
                      for i, (c, u) in enumerate(zip(data["captions"], data["updated"]))]}))
  return dict(presence="ccneg", absence="coco_negation", ccneg_path=str(root / "ccneg_preprocessed.pt"),
              ccneg_image_root=str(root / "cc3m"), ccneg_eval_size=0,
              coco_json=str(root / "negation_coco.json"), coco_image_dir=str(root / "cc3m/images"),
              distractor_mapping=str(root / "distractor_image_mapping.pt"),
              distractor_coco_json=str(root / "captions_train2017.json"),
              distractor_image_dir=str(root / "coco"))
