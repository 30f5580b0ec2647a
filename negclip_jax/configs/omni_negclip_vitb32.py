"""The paper's run: Omni-NegCLIP on ViT-B/32, CC-Neg + NegationCLIP COCO, front text layers.

python -m negclip_jax.train --config omni_negclip_vitb32 --workdir runs/vitb32 \
  --config.init=/path/to/clip-vit-base-patch32 \
  --config.data.ccneg_path=ccneg_preprocessed.pt --config.data.ccneg_image_root=/data/cc3m \
  --config.data.coco_json=negationclip_captions_train2014.json \
  --config.data.coco_image_dir=/data/coco/train2014
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0  # data order, random init and NegShapes generation
  # Model.
  c.init = ""  # HF dir, OpenAI checkpoint, Hub id, run dir; "" = random
  c.model = "vit-b-32"  # preset used when `init` is empty (negclip_jax.model.PRESETS)
  c.dtype = "float32"  # compute dtype (params, AdamW state, loss: float32); bfloat16 on TPU/GPU
  c.attention = "einsum"  # einsum | dot_product (jax.nn.dot_product_attention)
  c.remat = False  # recompute each transformer block in the backward pass (activation memory)

  c.data = ml_collections.ConfigDict()
  c.data.presence = "ccneg"  # ccneg | negshapes | wds:SHARDS (webdataset tar shards) | tfds:NAME
  c.data.absence = "coco_negation"  # coco_negation | negshapes | wds:SHARDS | tfds:NAME
  c.data.ccneg_path = ""  # ccneg_preprocessed.pt or .jsonl
  c.data.ccneg_image_root = ""  # CC-Neg image folder
  c.data.ccneg_eval_size = 40000  # the last 40k samples are held out
  c.data.coco_json = ""  # NegationCLIP COCO captions with updated_caption
  c.data.coco_image_dir = ""  # folder of the COCO images of coco_json
  c.data.negshapes_num = 20000  # generated examples when a stream is negshapes
  c.data.negshapes_hard_fraction = 0.0  # presence pairs replaced by shortcut-free hard pairs
  c.data.negshapes_image_hard_fraction = 0.0  # image-hard presence examples (distractor objectives)
  c.data.negshapes_image_hard_affirmed_fraction = 0.0  # of those, affirmed ("A and Y" vs "A and X")
  # Distractor images, read only for distractor objectives with presence "ccneg".
  c.data.distractor_mapping = ""  # CoN-CLIP's distractor_image_mapping.pt
  c.data.distractor_coco_json = ""  # captions_train2017.json: the index order of the mapping
  c.data.distractor_image_dir = ""  # COCO train2017 images
  c.data.on_error = "raise"  # raise | skip (skipped examples are counted and reported)
  c.data.max_image_pixels = 89478485  # larger images are bad records (PIL's default limit)
  c.data.image_cache = True  # embed the frozen image tower's inputs once
  c.data.pack_text = True  # several captions per text row (exact; pmap and fsdp)
  c.data.cache_dir = ""  # default: <workdir>/image_cache
  c.data.wds_caption_key = "txt"  # wds: a sample's .txt member, or this field of its .json
  c.data.wds_negated_key = "negated"  # wds presence: the negated caption's member or field
  c.data.wds_updated_key = "updated"  # wds absence: the updated caption's member or field
  c.data.tfds_data_dir = ""  # tfds:NAME: the TFDS data_dir it is prepared in (local or gs://)
  c.data.tfds_split = "train"  # tfds:NAME: the split read (TFDS syntax: "train[:90%]" too)
  c.data.read_threads = 0  # image reader threads (0: max(32, 4 * CPUs), up to 128; 1: serial)
  c.data.decode_processes = 0  # processes decoding for the readers (0: none; -1: 1 per CPU, <= 16)

  # Optimization: the original recipe, exactly (`torch.optim.AdamW(trainable, lr, weight_decay)`
  # with torch's betas/eps, decay on every trainable tensor, and the original `cosine_lr`).
  c.batch_size = 128  # global, per stream (presence and absence)
  c.num_epochs = 30  # epochs of max(N1 // B, N2 // B) steps
  c.total_steps = 0  # > 0 overrides num_epochs
  c.learning_rate = 1e-6  # AdamW peak learning rate
  c.weight_decay = 0.2  # AdamW decoupled decay, on every trainable tensor
  c.b1 = 0.9  # AdamW first-moment decay
  c.b2 = 0.999  # AdamW second-moment decay
  c.eps = 1e-8  # AdamW epsilon
  c.warmup_steps = 50  # linear warm-up length in steps
  c.schedule = "original"  # original | warmup_cosine (optax's, warm-up from 0)
  c.grad_clip_norm = 0.0  # 0 = off

  # Which parameters learn.
  c.layers = "front"  # text blocks: front|middle|back|whole or (0, 2)
  c.extra_trainable = ()  # regexes over "/"-joined parameter paths

  # Objective.
  c.objective = "omni_negclip"  # the paper's; or an ablation of losses.OBJECTIVES (README)
  c.lambda_stage2 = 1.0  # weight of the absence loss in the total
  c.lambda_orig = 1.0  # weight of CLIP(image, caption) in the absence loss
  c.lambda_text = 1.0  # weight of the caption-vs-updated text margin term L_text
  c.margin = 0.9  # margin of L_text
  c.global_negatives = True  # gather embeddings over all devices/hosts

  # Parallelism (may change on resume; docs/performance.md has the memory per device).
  c.parallelism = "pmap"  # pmap: state replicated per device; fsdp: params and optimizer state sharded, one jitted step
  c.fsdp = -1  # fsdp: devices the state is sharded over (-1: all)

  # Bookkeeping.
  c.log_every = 50  # steps between metric logs
  c.save_every = 1000  # steps between Orbax checkpoints
  c.max_to_keep = 3  # checkpoints kept
  c.restart = False  # start over at step 0 when every checkpoint is unreadable (else stop)
  c.evals = ml_collections.ConfigDict()  # name -> dict(task, every (0 = at the end), options)
  return c
