"""The paper's run: Omni-NegCLIP on ViT-B/32, CC-Neg + NegationCLIP COCO, front text layers.

python -m negclip_jax.train --config configs/omni_negclip_vitb32.py --workdir runs/vitb32 \
  --config.init=/path/to/clip-vit-base-patch32 \
  --config.data.ccneg_path=ccneg_preprocessed.pt --config.data.ccneg_image_root=/data/cc3m \
  --config.data.coco_json=negationclip_captions_train2014.json \
  --config.data.coco_image_dir=/data/coco/train2014
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Model: `init` is a HF CLIP directory or an OpenAI/PyTorch checkpoint; empty = random
  # weights of the `model` preset (see negclip_jax.model.PRESETS).
  c.init = ""
  c.model = "vit-b-32"
  c.dtype = "float32"  # compute dtype; "bfloat16" on TPU/GPU

  c.data = ml_collections.ConfigDict()
  c.data.presence = "ccneg"          # ccneg | negshapes
  c.data.absence = "coco_negation"   # coco_negation | negshapes
  c.data.ccneg_path = ""             # ccneg_preprocessed.pt or .jsonl
  c.data.ccneg_image_root = ""
  c.data.ccneg_eval_size = 40000     # the last 40k samples are held out
  c.data.coco_json = ""              # NegationCLIP COCO captions with updated_caption
  c.data.coco_image_dir = ""
  c.data.negshapes_num = 20000
  c.data.negshapes_hard_fraction = 0.0  # presence pairs replaced by shortcut-free hard pairs
  # Distractor images, read only for objective "conclip" with presence "ccneg".
  c.data.distractor_mapping = ""     # CoN-CLIP's distractor_image_mapping.pt
  c.data.distractor_coco_json = ""   # captions_train2017.json: the index order of the mapping
  c.data.distractor_image_dir = ""   # COCO train2017 images
  c.data.on_error = "raise"          # raise | skip (skipped examples are counted and reported)
  c.data.image_cache = True          # embed the frozen image tower's inputs once
  c.data.cache_dir = ""              # default: <workdir>/image_cache
  c.data.pack_text = True            # several captions per text-tower row (exact; packing.py)

  # Optimization: the original recipe, exactly (`torch.optim.AdamW(trainable, lr, weight_decay)`
  # with torch's betas/eps, decay on every trainable tensor, and the original `cosine_lr`).
  c.batch_size = 128                 # global, per stream (presence and absence)
  c.num_epochs = 30                  # epochs of max(N1 // B, N2 // B) steps
  c.total_steps = 0                  # > 0 overrides num_epochs
  c.learning_rate = 1e-6
  c.weight_decay = 0.2
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.warmup_steps = 50
  c.schedule = "original"            # original | warmup_cosine (optax's, warm-up from 0)
  c.grad_clip_norm = 0.0             # 0 = off

  # Which parameters learn: front | middle | back | whole, or a list of block indices.
  c.layers = "front"
  c.extra_trainable = ()             # regexes over "/"-joined parameter paths

  # Objective.
  c.objective = "omni_negclip"       # omni_negclip | presence_no_l3 | plain_clip | conclip
  c.lambda_stage2 = 1.0
  c.lambda_orig = 1.0
  c.lambda_text = 1.0
  c.margin = 0.9
  c.global_negatives = True          # gather embeddings over all devices/hosts

  # Bookkeeping.
  c.log_every = 50
  c.save_every = 1000
  c.max_to_keep = 3
  # Evaluators: name -> {task, every (0 = only at the end), task options}; see
  # negclip_jax/evaluators.py, e.g. dict(task="ccneg", every=1000, data=..., image_root=...).
  c.evals = ml_collections.ConfigDict()
  return c
