"""Ablation: CoN-CLIP's distractor-image objective on the presence batch (+ the absence loss).

Each CC-Neg example also needs its distractor image (a COCO image for which the negated
caption is true), read from CoN-CLIP's mapping:

python -m negclip_jax.train --config configs/ablation_conclip.py --workdir runs/conclip \
  ... (the data keys of omni_negclip_vitb32.py) \
  --config.data.distractor_mapping=ccneg_dataset/distractor_image_mapping.pt \
  --config.data.distractor_coco_json=/data/coco/annotations/captions_train2017.json \
  --config.data.distractor_image_dir=/data/coco/train2017
"""

from negclip_jax.configs import omni_negclip_vitb32


def get_config():
  c = omni_negclip_vitb32.get_config()
  c.objective = "conclip"
  return c
