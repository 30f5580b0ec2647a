"""Evaluation tasks: JAX results equal an independent PyTorch + numpy evaluation.

Every fixture is written in the original's file format; the reference side uses
transformers' `CLIPModel` on the same token ids, pixels from an independent PIL + torch
implementation of OpenAI `clip`'s transform (the "original" protocol) or from
`preprocess_image` (the "hf" protocol, itself tested against transformers), and the
original scripts' decision rules written out in numpy / torch.
"""

import csv
import functools
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from helpers import NEGBENCH_MCQ_HEADER, ROOT
from PIL import Image

from negclip_jax.data import negshapes, parallel_read, tfds_builders
from negclip_jax.data.records import DataError
from negclip_jax.eval import cli as eval_cli
from negclip_jax.eval import embed, metrics, registry
from negclip_jax.eval import results as eval_results
from negclip_jax.eval.embed import Embedder
from negclip_jax.eval.tasks import layers_task
from negclip_jax.model import clip as model_lib
from negclip_jax.model import convert
from negclip_jax.model.preprocess import preprocess_image
from negclip_jax.model.tokenizer import ClipTokenizer

CONFIG = model_lib.get_config("tiny")
CONTEXT = CONFIG.text.max_position_embeddings
SIZE = CONFIG.vision.image_size
PREFIX = "/workspace/datasets/cc3m/"

# (file, (width, height), left colour, right colour, corner square colour)
IMAGES = [
  ("img0.jpg", (40, 32), (220, 30, 30), (30, 30, 220), (250, 250, 250)),
  ("img1.jpg", (32, 48), (30, 200, 60), (240, 220, 40), (10, 10, 10)),
  ("img2.jpg", (36, 36), (160, 60, 210), (250, 250, 250), (220, 30, 30)),
  ("img3.jpg", (50, 30), (20, 20, 20), (240, 140, 20), (30, 200, 60)),
  ("img4.jpg", (44, 40), (90, 90, 90), (30, 30, 220), (240, 220, 40)),
  ("img5.jpg", (30, 40), (240, 220, 40), (160, 60, 210), (30, 30, 220)),
  ("val2014/img6.jpg", (40, 40), (30, 30, 220), (220, 30, 30), (90, 90, 90)),
  ("val2014/img7.jpg", (48, 32), (250, 250, 250), (20, 20, 20), (240, 140, 20)),
  ("val2014/img8.jpg", (32, 40), (240, 140, 20), (30, 200, 60), (160, 60, 210)),
  ("val2014/img9.jpg", (38, 34), (30, 200, 60), (220, 30, 30), (250, 250, 250)),
]
CAPTIONS = [
  "a red square and a blue square",
  "a green field with a yellow sun",
  "a purple wall, a white door",
  "a black road next to an orange car",
  "a gray stone on blue water",
  "a yellow banana and a purple plum",
  "a blue sky over a red roof",
  "a white cat sleeping on a black sofa",
  "an orange fox in green grass",
  "a green frog on a red leaf",
]
NEGATED = [
  "a red square, but not a blue square",
  "a green field with no yellow sun",
  "a purple wall without a white door",
  "no black road, no orange car",
  "a gray stone not on blue water",
  "a yellow banana but no purple plum",
  "a blue sky over no red roof",
  "not a white cat on a black sofa",
  "an orange fox, not in green grass",
  "a green frog without a red leaf",
]

# CC-Neg negated captions: record 6's raw "not," is not the word " not " (matched on the
# raw text, commas kept); record 8 is its own caption, a tie (counted correct).
CCNEG_NEGATED = [
  *NEGATED[:6],
  "not, a blue sky over a red roof",
  NEGATED[7],
  CAPTIONS[8],
  NEGATED[9],
]
CCNEG = [(i if i < 6 else PREFIX + IMAGES[i][0], CAPTIONS[i], CCNEG_NEGATED[i]) for i in range(10)]
CCNEG_EVAL = 7
# num_ops field: k -> file indices (unsorted; out of the eval split; more than CCNEG_EVAL).
NUM_OPS = {1: [5, 0, 8], 2: [9, 0, 1, 2, 4, 6, 3, 7], 3: [1]}
CCNEG2 = [(0, 3, 0, 0), (2, 5, 2, 5), (4, 1, 4, 7), (7, 8, 6, 9)]  # (pos img, neg img, caption,
#                                                     negated); same caption = a tie
REF_MISSING = [13, 0, 5, 3]  # a ref_bbox that is not in bbox_list: counted wrong
REFS = [  # (image index, phrase, ref box, boxes (x, y, w, h))
  (
    0,
    "the blue half without a white square",
    [20, 0, 20, 32],
    [[0, 0, 20, 32], [20, 0, 20, 32], [0, 0, 10.5, 8.5]],
  ),
  (1, "the green part, not the yellow one", [0, 0, 32, 24], [[0, 0, 32, 24], [0, 24, 32, 24]]),
  (
    3,
    "a box with no orange",
    [0, 0, 25, 30],
    [[25, 0, 25, 30], [5, 5, 20, 20], [0, 0, 25, 30], [40, 20, 30, 30]],
  ),
  (4, "the gray side", [0, 0, 22, 40], [[0, 0, 22, 40], [0, 0, 22, 40], [22, 0, 22, 40]]),
  (9, "not the green frog", REF_MISSING, [[0, 0, 19, 34], [19, 0, 19, 34]]),
]
COCO_NEG = [(1, 0), (1, 1), (2, 2), (4, 3), (4, 4), (5, 5), (2, 6)]  # (image id, caption)
KARPATHY_TEST = [(6, [6, 0]), (7, [7]), (8, [8, 1, 3]), (9, [9, 2])]  # (image, captions)
MCQ = [
  (0, 1, "positive"),
  (2, 3, "negative"),
  (5, 0, "hybrid"),
  (7, 2, "negative"),
  (8, 1, "positive"),
  (4, 3, "hybrid"),
  (9, 0, "negative"),
]  # (image, correct,
#                                               template); captions i, i+1, ... (mod 10)
MCQ_TYPES = {0: "positive", 1: "hybrid", 2: "hybrid", 3: "negative"}  # NegBench synthetic
BINARY_MCQ = [(0, 0, 1, 0), (3, 3, 8, 1), (5, 5, 5, 1), (6, 6, 6, 0), (8, 1, 8, 1)]  # (image,
#                              caption_0, caption_1, correct); equal captions = a tie
NEGBENCH_RETRIEVAL = [(1, [1, 2]), (3, [3]), (6, [6, 4, 5]), (9, [9]), (1, [7])]  # image 1
#                                                twice: its captions tie with the repeat


def _path(root, i):
  return os.path.join(root, IMAGES[i][0])


def _mcq_captions(i):
  return [(NEGATED if k % 2 else CAPTIONS)[(i + k) % 10] for k in range(4)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Images and every task's annotation file; returns {task: run_task options}."""
  root = tmp_path_factory.mktemp("data")
  for name, (w, h), left, right, corner in IMAGES:
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, : w // 2], pixels[:, w // 2 :], pixels[: h // 4, : w // 4] = left, right, corner
    (root / name).parent.mkdir(exist_ok=True)
    Image.fromarray(pixels).save(root / name, quality=95)
  paths = [image if isinstance(image, str) else IMAGES[image][0] for image, _, _ in CCNEG]
  with open(root / "ccneg.jsonl", "w") as f:
    for path, (_, caption, negated) in zip(paths, CCNEG):
      f.write(
        json.dumps({"image_path": path, "caption": caption, "negative_prompt": negated}) + "\n"
      )
  torch.save(
    {
      "image_paths": paths,
      "num_ops": NUM_OPS,
      "annotations": [
        {"json": {"caption": c}, "sop_data": {"negative-prompt": n}} for _, c, n in CCNEG
      ],
    },
    root / "ccneg.pt",
  )
  torch.save(
    {
      "image_paths_positive": [[IMAGES[p][0]] for p, _, _, _ in CCNEG2],
      "image_paths_negative": [[IMAGES[n][0], "unused.jpg"] for _, n, _, _ in CCNEG2],
      "image_paths_negated": [["unused.jpg"] for _ in CCNEG2],
      "labels": [
        {
          "positive_prompt": CAPTIONS[c],
          "negative_prompt": "unused",
          "negated_prompt": (CAPTIONS if c == n else NEGATED)[n],
        }
        for _, _, c, n in CCNEG2
      ],
    },
    root / "ccneg2.pt",
  )
  with tarfile.open(root / "ccneg_eval.tar", "w") as tar:  # the eval split as shards
    for k, (image, caption, negated) in enumerate(CCNEG[-CCNEG_EVAL:]):
      fields = {
        "jpg": (root / IMAGES[k + len(CCNEG) - CCNEG_EVAL][0]).read_bytes(),
        "txt": caption.encode(),
        "json": json.dumps({"negated": negated}).encode(),
      }
      for field, data in fields.items():
        info = tarfile.TarInfo(f"{k:04d}.{field}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  tfds_builders.main(  # the eval split as TFDS shards
    ["ccneg", "--annotations", str(root / "ccneg.jsonl"), "--image-root", str(root)]
    + ["--data-dir", str(root / "tfds"), "--eval-size", str(CCNEG_EVAL)]
  )
  (root / "refs.json").write_text(
    json.dumps(
      [
        {"image": IMAGES[i][0], "phrase": p, "ref_bbox": ref, "bbox_list": boxes}
        for i, p, ref, boxes in REFS
      ]
    )
  )
  ids = sorted({i for i, _ in COCO_NEG})
  (root / "coco_neg.json").write_text(
    json.dumps(
      {
        "images": [{"id": i, "file_name": IMAGES[i][0]} for i in ids],
        "annotations": [
          {"image_id": i, "caption": CAPTIONS[c], "updated_caption": NEGATED[c]}
          for i, c in COCO_NEG
        ],
      }
    )
  )
  entry = lambda i, split, caps: {
    "filepath": "val2014",
    "filename": IMAGES[i][0][8:],
    "split": split,
    "sentences": [{"raw": CAPTIONS[c]} for c in caps],
  }
  (root / "dataset_coco.json").write_text(
    json.dumps(
      {
        "images": [entry(i, "test", caps) for i, caps in KARPATHY_TEST[:2]]
        + [entry(6, "train", [1])]
        + [entry(i, "test", caps) for i, caps in KARPATHY_TEST[2:]]
      }
    )
  )
  with open(root / "mcq.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(NEGBENCH_MCQ_HEADER)
    for i, correct, template in MCQ:
      w.writerow([IMAGES[i][0], correct, *_mcq_captions(i), template])
  with open(root / "binary_mcq.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image_path", "caption_0", "caption_1", "correct_answer"])
    for i, c0, c1, correct in BINARY_MCQ:
      w.writerow([IMAGES[i][0], NEGATED[c0], NEGATED[c1], correct])
  with open(root / "negbench_retrieval.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filepath", "captions"])
    for i, caps in NEGBENCH_RETRIEVAL:
      w.writerow([IMAGES[i][0], repr([NEGATED[c] for c in caps])])
  r = str(root)
  return types.SimpleNamespace(
    root=r,
    options={
      "ccneg": dict(data=f"{r}/ccneg.pt", image_root=r, eval_size=CCNEG_EVAL, num_ops=True),
      "ccneg-wds": dict(data=f"{r}/ccneg_{{eval}}.tar"),  # a brace pattern of one shard
      "ccneg-tfds": dict(tfds_data_dir=f"{r}/tfds"),
      "ccneg2": dict(data=f"{r}/ccneg2.pt", image_root=r),
      "negrefcocog": dict(data=f"{r}/refs.json", image_root=r),
      "negationclip": dict(data=f"{r}/coco_neg.json", image_root=r, ties="both"),
      "retrieval": dict(data=f"{r}/dataset_coco.json", image_root=r, ties="both"),
      "negbench-mcq": dict(data=f"{r}/mcq.csv", image_root=r, mcq_layout="synthetic"),
      "negbench-binary-mcq": dict(data=f"{r}/binary_mcq.csv", image_root=r),
      "negbench-retrieval": dict(data=f"{r}/negbench_retrieval.csv", image_root=r, ties="both"),
      "negshapes": dict(num=6, seed=3, image_size=40),
      "layers": dict(data=f"{r}/ccneg.jsonl", eval_size=CCNEG_EVAL, embeddings=True),
    },
  )


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """A random tiny CLIP exported by `save_pretrained`, and transformers' model loaded from it.

  Random weights come from transformers' initializer (faster than compiling `init_params`).
  """
  torch.manual_seed(0)
  source = tmp_path_factory.mktemp("random")
  transformers.CLIPModel(transformers.CLIPConfig(**convert.config_to_hf(CONFIG))).save_pretrained(
    source
  )
  model, params = convert.load_pretrained(source)
  path = tmp_path_factory.mktemp("model")
  convert.save_pretrained(model, params, path, tokenizer=ClipTokenizer())
  hf = transformers.CLIPModel.from_pretrained(path).eval()
  return types.SimpleNamespace(dir=str(path), model=model, params=params, hf=hf)


@pytest.fixture(scope="module")
def reference(clip, files):
  """task -> its reference metrics (computed once)."""
  return functools.cache(lambda task: _reference(task, clip.hf, files.root))


# ------------------------------------------------------------------ PyTorch reference


def _unit(x):
  x = (x if torch.is_tensor(x) else x.pooler_output).numpy()
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ids(texts):
  return torch.from_numpy(ClipTokenizer()(list(texts), CONTEXT)).long()


def _ref_texts(hf, texts):
  with torch.no_grad():
    return _unit(hf.get_text_features(input_ids=_ids(texts)))


def _ref_pixels(hf, pixels):
  """pixels: preprocessed NHWC float32."""
  with torch.no_grad():
    return _unit(
      hf.get_image_features(
        pixel_values=torch.from_numpy(np.ascontiguousarray(np.stack(pixels).transpose(0, 3, 1, 2)))
      )
    )


def _clip_transform(image):
  """OpenAI `clip`'s eval transform, written out: torchvision Resize(SIZE, bicubic) on a PIL
  image, CenterCrop(SIZE), convert("RGB"), ToTensor, Normalize -> HWC float32."""
  w, h = image.size
  if w <= h:
    size = (SIZE, int(SIZE * h / w))
  else:
    size = (int(SIZE * w / h), SIZE)
  image = image.resize(size, Image.BICUBIC)
  top, left = int(round((size[1] - SIZE) / 2.0)), int(round((size[0] - SIZE) / 2.0))
  image = image.crop((left, top, left + SIZE, top + SIZE)).convert("RGB")
  x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
  mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
  std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
  return ((x - mean) / std).permute(1, 2, 0).numpy()


def _ref_images(hf, images, protocol="original"):
  """images: paths or PIL images (opened as `Image.open`, mode unchanged)."""
  images = [Image.open(x) if isinstance(x, str) else x for x in images]
  if protocol == "hf":
    return _ref_pixels(hf, [preprocess_image(x, SIZE) for x in images])
  return _ref_pixels(hf, [_clip_transform(x) for x in images])


def _ref_files(hf, paths, protocol="original"):
  """Embeddings of image files, each distinct file embedded once (repeats are equal)."""
  unique = sorted(set(paths))
  emb = _ref_images(hf, unique, protocol)
  return emb[[unique.index(p) for p in paths]]


def _ref_ranks(sims, truth, ties):
  """1-based position of the first ground-truth item once each row is sorted by descending
  score, tied ground truth placed before ("optimistic") or after ("pessimistic") the rest."""
  ranks = []
  for row, gt in zip(sims, truth):
    after = [(j not in gt) if ties == "optimistic" else (j in gt) for j in range(len(row))]
    order = sorted(range(len(row)), key=lambda j: (-row[j], after[j]))
    ranks.append(min(order.index(g) for g in gt) + 1)
  return np.array(ranks)


def _ref_retrieval(
  image, text, caption_to_image, ks, directions=("t2i", "i2t"), mean_rank=False, both=False
):
  c2i = list(caption_to_image)
  truth = {
    "t2i": (text @ image.T, [[i] for i in c2i]),
    "i2t": (image @ text.T, [[j for j, i in enumerate(c2i) if i == q] for q in range(len(image))]),
  }
  out = {}
  for ties, suffix in [("optimistic", "")] + ([("pessimistic", "_pessimistic")] if both else []):
    for d in directions:
      ranks = _ref_ranks(*truth[d], ties)
      out.update({f"{d}_r{k}{suffix}": float(np.mean(ranks <= k)) for k in ks})
      if mean_rank:
        out[f"{d}_mean_rank{suffix}"] = float(np.mean(ranks))
  return out


def _ref_layers(hf, captions, negated, embeddings=False):
  """The original's per-block cosines: value i = output of text block i at EOT (argmax id)."""

  def eot_states(texts):
    ids = _ids(texts)
    with torch.no_grad():
      states = hf.text_model(input_ids=ids, output_hidden_states=True).hidden_states
    eot = ids.argmax(-1)
    return np.stack([_unit(s[torch.arange(len(ids)), eot]) for s in states], 1)

  cos = np.sum(eot_states(captions) * eot_states(negated), -1).mean(0)
  out = {"cosine_embeddings": float(cos[0])} if embeddings else {}
  out.update({f"cosine_block_{i}": float(c) for i, c in enumerate(cos[1:])})
  blocks = cos[1:]  # 4 blocks in the tiny preset: thirds are blocks {0, 1}, {2}, {3}
  out.update(
    {
      "cosine_front": float(blocks[:2].mean()),
      "cosine_middle": float(blocks[2]),
      "cosine_back": float(blocks[3]),
    }
  )
  return {**out, "n": len(captions)}


def _ref_auc(labels, scores):
  """P(score of a label-1 item > a label-0 item's) + P(tie) / 2, over all pairs."""
  pos, neg = scores[labels == 1], scores[labels == 0]
  return float(np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])))


def _ref_ccneg(hf, root, protocol):
  """CoN-CLIP's mode 1 on the eval split, its negation-word and num_ops subsets."""
  records = CCNEG[-CCNEG_EVAL:]
  image = _ref_images(hf, [_path(root, k) for k in range(10)][-CCNEG_EVAL:], protocol)
  pos = torch.from_numpy(np.sum(image * _ref_texts(hf, [c for _, c, _ in records]), -1))
  neg = torch.from_numpy(
    np.sum(image * _ref_texts(hf, [n.replace(",", "") for _, _, n in records]), -1)
  )
  correct = (torch.stack([pos, neg], 1).argmax(1) == 0).numpy()  # ties go to index 0
  out = {"accuracy": float(correct.mean()), "n": CCNEG_EVAL}
  for word in ("no", "not", "without"):  # eval_ccneg_no_not_without.get_subset, one word
    rows = [j for j, (_, _, n) in enumerate(records) if " " + word + " " in " " + n + " "]
    out.update({f"accuracy_word_{word}": float(correct[rows].mean()), f"n_word_{word}": len(rows)})
  n = len(CCNEG)
  for k, indices in NUM_OPS.items():  # CCNegEvalDataset(num_ops=k)
    m = CCNEG_EVAL if len(indices) >= CCNEG_EVAL else len(indices)
    rows = [i - (n - CCNEG_EVAL) for i in indices[-m:] if n - CCNEG_EVAL <= i < n]
    out.update(
      {
        f"accuracy_ops_{k}": float(correct[rows].mean()) if rows else float("nan"),
        f"n_ops_{k}": len(rows),
      }
    )
  return out


def _ref_ccneg2(hf, root):
  """CoN-CLIP's ClipRunner.score_over_loader2."""
  scale = hf.logit_scale.detach()  # the stored (log-space) parameter, as the original uses
  strip = lambda t: t.replace(",", "")
  captions = _ref_texts(hf, [strip(CAPTIONS[c]) for _, _, c, _ in CCNEG2])
  negated = _ref_texts(hf, [strip((CAPTIONS if c == k else NEGATED)[k]) for _, _, c, k in CCNEG2])
  acc, probs, labels = [], [], []
  for polarity, column in enumerate((0, 1)):
    image = _ref_images(hf, [_path(root, r[column]) for r in CCNEG2])
    sims = torch.from_numpy(
      np.stack([np.sum(image * captions, -1), np.sum(image * negated, -1)], 1)
    )
    logits = scale * sims
    acc.append(float((logits.argmax(1) == polarity).float().mean()))
    probs.append(logits.softmax(1)[:, 1].numpy())
    labels.append(np.full(len(CCNEG2), polarity))
  return {
    "positive_acc": acc[0],
    "negative_acc": acc[1],
    "accuracy": (acc[0] + acc[1]) / 2,
    "auc": _ref_auc(np.concatenate(labels), np.concatenate(probs)),
    "n": len(CCNEG2),
  }


def _ref_negrefcocog(hf, root, protocol, refs=REFS):
  """negrefcocog_eval.py: crop the opened image, preprocess, bbox_list[argmax] == ref_bbox."""
  correct = []
  for i, phrase, ref, boxes in refs:
    image = Image.open(_path(root, i))
    if protocol == "hf":
      image = image.convert("RGB")
    crops = [image.crop((x, y, x + w, y + h)) for x, y, w, h in boxes]
    scores = _ref_images(hf, crops, protocol) @ _ref_texts(hf, [phrase])[0]
    correct.append(boxes[int(np.argmax(scores))] == ref)
  return {
    "accuracy": float(np.mean(correct)),
    "n": len(refs),
    "n_missing_ref": sum(ref not in boxes for _, _, ref, boxes in refs),
  }


def _ref_mcq(hf, root):
  """NegBench eval_mcq.evaluate_model (synthetic layout); wrong answers summed per type."""
  image = _ref_files(hf, [_path(root, i) for i, _, _ in MCQ])
  scores = [_ref_texts(hf, _mcq_captions(i)) @ image[q] for q, (i, _, _) in enumerate(MCQ)]
  predicted = [int(np.argmax(s)) for s in scores]
  correct = np.array([p == c for p, (_, c, _) in zip(predicted, MCQ)])
  templates = np.array([t for _, _, t in MCQ])
  out = {
    "accuracy": float(correct.mean()),
    **{
      f"accuracy_{t}": float(correct[templates == t].mean())
      for t in ("positive", "negative", "hybrid")
    },
  }
  by_question = {
    t: {a: 0 for a in ("positive", "hybrid", "negative")}
    for t in dict.fromkeys(t for _, _, t in MCQ)
  }
  for p, (_, c, t) in zip(predicted, MCQ):
    if p != c:
      by_question[t][MCQ_TYPES[p]] += 1
  wrong = sum(sum(v.values()) for v in by_question.values())
  for a in ("positive", "hybrid", "negative"):
    out[f"wrong_as_{a}"] = sum(v[a] for v in by_question.values()) / wrong
  for t, counts in by_question.items():
    out.update({f"wrong_{t}_as_{a}": c for a, c in counts.items()})
  return {**out, "n": len(MCQ)}


def _reference(task, hf, root, protocol="original"):
  """The task's metrics, computed independently of negclip_jax.eval.tasks."""
  path = lambda i: _path(root, i)
  if task == "ccneg":
    return _ref_ccneg(hf, root, protocol)
  if task in ("ccneg-wds", "ccneg-tfds"):  # the eval split from shards: no ops subsets
    return {k: v for k, v in _ref_ccneg(hf, root, protocol).items() if "_ops_" not in k}
  if task == "ccneg2":
    return _ref_ccneg2(hf, root)
  if task == "negrefcocog":
    return _ref_negrefcocog(hf, root, protocol)
  if task == "negationclip":
    ids = list(dict.fromkeys(i for i, _ in COCO_NEG))
    image = _ref_images(hf, [path(i) for i in ids])
    c2i = [ids.index(i) for i, _ in COCO_NEG]
    out = {}
    for name, texts in (("updated", NEGATED), ("original", CAPTIONS)):
      m = _ref_retrieval(
        image, _ref_texts(hf, [texts[c] for _, c in COCO_NEG]), c2i, (1, 5, 10), both=True
      )
      out.update({f"{name}_{k}": v for k, v in m.items()})
    return {**out, "n": len(COCO_NEG), "n_images": len(ids)}
  if task == "retrieval":
    image = _ref_images(hf, [path(i) for i, _ in KARPATHY_TEST])
    caps = [c for _, cs in KARPATHY_TEST for c in cs]
    c2i = [q for q, (_, cs) in enumerate(KARPATHY_TEST) for _ in cs]
    out = _ref_retrieval(
      image, _ref_texts(hf, [CAPTIONS[c] for c in caps]), c2i, (1, 5, 10), mean_rank=True, both=True
    )
    return {**out, "n": len(caps), "n_images": len(KARPATHY_TEST)}
  if task == "negbench-mcq":
    return _ref_mcq(hf, root)
  if task == "negbench-binary-mcq":  # eval_mcq.evaluate_binary_mcq_model
    image = _ref_images(hf, [path(i) for i, _, _, _ in BINARY_MCQ])
    texts = [_ref_texts(hf, [NEGATED[c0], NEGATED[c1]]) for _, c0, c1, _ in BINARY_MCQ]
    logits = torch.from_numpy(np.stack([t @ image[q] for q, t in enumerate(texts)]))
    correct = logits.argmax(1).numpy() == np.array([c for *_, c in BINARY_MCQ])
    return {"accuracy": float(correct.mean()), "n": len(BINARY_MCQ)}
  if task == "negbench-retrieval":
    image = _ref_files(hf, [path(i) for i, _ in NEGBENCH_RETRIEVAL])
    caps = [c for _, cs in NEGBENCH_RETRIEVAL for c in cs]
    c2i = [q for q, (_, cs) in enumerate(NEGBENCH_RETRIEVAL) for _ in cs]
    out = _ref_retrieval(
      image, _ref_texts(hf, [NEGATED[c] for c in caps]), c2i, (1, 5), directions=("t2i",), both=True
    )
    return {**out, "n": len(caps), "n_images": len(NEGBENCH_RETRIEVAL)}
  if task == "layers":  # the train split: every record before the last CCNEG_EVAL
    records = CCNEG[:-CCNEG_EVAL]
    return _ref_layers(
      hf, [c for _, c, _ in records], [n.replace(",", "") for _, _, n in records], embeddings=True
    )
  raise KeyError(task)


def _assert_same(got, want):
  assert list(got) == list(want)
  for key, value in want.items():
    if key.startswith("cosine") or key == "auc":  # a float, not a decision
      assert got[key] == pytest.approx(value, abs=1e-5), key
    elif isinstance(value, float) and np.isnan(value):  # an empty subset
      assert np.isnan(got[key]), key
    else:
      assert got[key] == value, key


# ------------------------------------------------------------------------------ tests


def test_embeddings_match_pytorch(clip, files):
  embedder = Embedder(clip.model, clip.params, batch_size=3, progress=False)
  paths = [_path(files.root, i) for i in (2, 0, 2, 7)]  # a repeat: embedded once
  for protocol in ("original", "hf"):
    np.testing.assert_allclose(
      embed.embed_files(embedder, paths, protocol=protocol),
      _ref_images(clip.hf, paths, protocol),
      atol=1e-5,
    )
  np.testing.assert_allclose(
    embed.embed_texts(embedder, ClipTokenizer(), CONTEXT, NEGATED),
    _ref_texts(clip.hf, NEGATED),
    atol=1e-5,
  )


# Tested elsewhere: negshapes in tests/test_negshapes.py, zeroshot in tests/test_zeroshot.py,
# negshapes-probe/-fit in tests/eval/test_probe.py and tests/e2e/test_demo.py.
MINE = [
  t
  for t in registry.TASKS
  if t not in ("negshapes", "zeroshot", "negshapes-probe", "negshapes-fit")  # test_probe.py
]


@pytest.mark.parametrize("task", MINE)
def test_task_matches_reference(task, clip, files, reference):
  got = registry.run_task(
    task,
    clip.model,
    clip.params,
    ClipTokenizer(),
    batch_size=4,
    progress=False,
    **files.options[task],
  )
  _assert_same(got, reference(task))


@pytest.mark.parametrize("task", ["ccneg", "negrefcocog"])
def test_hf_protocol_matches_reference(task, clip, files):
  options = dict(files.options[task], protocol="hf")
  if task == "negrefcocog":  # "hf" rejects a ref_bbox missing from bbox_list
    with pytest.raises(DataError, match=r"refs.json, record 4, key 'ref_bbox'"):
      registry.run_task(task, clip.model, clip.params, ClipTokenizer(), progress=False, **options)
    refs = json.loads(open(options["data"]).read())[:-1]
    options["data"] = os.path.join(files.root, "refs_complete.json")
    with open(options["data"], "w") as f:
      json.dump(refs, f)
  got = registry.run_task(
    task, clip.model, clip.params, ClipTokenizer(), batch_size=4, progress=False, **options
  )
  want = (
    _ref_negrefcocog(clip.hf, files.root, "hf", REFS[:-1])
    if task == "negrefcocog"
    else _ref_ccneg(clip.hf, files.root, "hf")
  )
  _assert_same(got, want)


def test_fixtures_exercise_crop_rounding_and_ties(files):
  """The original and hf crops differ on some fixture images; fixtures hold exact ties."""
  differ = [
    name
    for name, *_ in IMAGES
    if not np.array_equal(
      preprocess_image(os.path.join(files.root, name), SIZE),
      _clip_transform(Image.open(os.path.join(files.root, name))),
    )
  ]
  assert differ and len(differ) < len(IMAGES), differ
  assert any(CCNEG[i][1] == CCNEG[i][2] for i in range(len(CCNEG) - CCNEG_EVAL, len(CCNEG)))
  assert any(c == n for _, _, c, n in CCNEG2)
  assert any(c0 == c1 for _, c0, c1, _ in BINARY_MCQ)
  assert len({i for i, _ in NEGBENCH_RETRIEVAL}) < len(NEGBENCH_RETRIEVAL)


def test_layers_on_negshapes_matches_reference(clip):
  got = registry.run_task(
    "layers",
    clip.model,
    clip.params,
    ClipTokenizer(),
    progress=False,
    data="negshapes",
    num=5,
    seed=1,
  )
  pairs = negshapes.presence_task(5, 1)
  _assert_same(got, _ref_layers(clip.hf, pairs["captions"], pairs["negated"]))


def test_layer_thirds_match_the_original_for_12_blocks():
  sims = list(np.random.default_rng(0).normal(size=12))
  got = layers_task.summarize(sims)
  assert got == {
    "cosine_front": pytest.approx(sum(sims[0:4]) / 4),
    "cosine_middle": pytest.approx(sum(sims[4:8]) / 4),
    "cosine_back": pytest.approx(sum(sims[8:12]) / 4),
  }


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_sets_inference_precision(dtype, clip):
  """Reduced precision computes in that dtype: close to, not equal to, float32."""
  full = Embedder(clip.model, clip.params, batch_size=4, progress=False)
  low = Embedder(clip.model, clip.params, batch_size=4, progress=False, dtype=dtype)
  assert low.model.dtype == jnp.dtype(dtype) and full.model.dtype == jnp.float32
  ids = ClipTokenizer()(NEGATED, CONTEXT)
  a, b = full.texts(ids), low.texts(ids)
  assert b.dtype == np.float32 and 0 < np.abs(a - b).max() < 0.05


def test_cli_all_writes_json_markdown_and_plot(
  clip, files, reference, tmp_path, capsys, monkeypatch
):
  """Every task, its image files decoded in 2 processes (`--decode-processes`), equals the
  references."""
  monkeypatch.setattr(parallel_read, "_decode_processes", 0)  # restored after the test
  argv = [
    "--model",
    clip.dir,
    "--task",
    "all",
    "--out",
    str(tmp_path / "res.json"),
    "--batch-size",
    "4",
    "--eval-size",
    str(CCNEG_EVAL),
    "--num",
    "6",
    "--seed",
    "3",
    "--image-size",
    "40",
    "--num-ops",
    "--ties",
    "both",
    "--mcq-layout",
    "synthetic",
    "--embeddings",
    "--decode-processes",
    "2",
  ]
  for task, options in files.options.items():
    if "image_root" in options:
      argv += [f"--{task}-data", options["data"], f"--{task}-image-root", options["image_root"]]
  argv += ["--layers-data", "negshapes", "--ccneg-wds-data", files.options["ccneg-wds"]["data"]]
  argv += ["--tfds-data-dir", files.options["ccneg-tfds"]["tfds_data_dir"]]
  results = eval_cli.main(argv)
  assert parallel_read.decode_processes() == 2
  assert list(results) == [t for t in registry.TASKS if t != "zeroshot"]  # no --zeroshot-data
  # The file: strict JSON (NaN written as null) with a header saying what was evaluated.
  reject = lambda name: pytest.fail(f"non-strict JSON constant {name}")
  written = json.loads((tmp_path / "res.json").read_text(), parse_constant=reject)
  assert written["results"] == eval_results.strict(results)
  head = written["header"]
  assert head["model"] == clip.dir and head["step"] is None and head["negclip_jax"]
  assert head["command"].split()[1:3] == ["--model", clip.dir]
  ccneg = head["tasks"]["ccneg"]
  assert ccneg["protocol"] == "original" and ccneg["dtype"] == "float32"
  data = ccneg["files"]["data"]
  assert data["bytes"] == os.path.getsize(data["path"]) and data["modified"].endswith("+00:00")
  assert ccneg["files"]["image_root"]["bytes"] is None
  assert head["tasks"]["negshapes"]["protocol"] is None
  pairs = negshapes.presence_task(6, 3)
  for task in MINE:
    want = (
      _ref_layers(clip.hf, pairs["captions"], pairs["negated"], embeddings=True)
      if task == "layers"
      else reference(task)
    )
    _assert_same(results[task], want)
  table = (tmp_path / "res.md").read_text()
  assert table.startswith("| task | metric | value |") and "| ccneg | n | 7 |" in table
  assert table in capsys.readouterr().out
  assert (tmp_path / "res_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
def test_chunked_ranks_match_reference(ties, monkeypatch):
  monkeypatch.setattr(metrics, "_QUERY_CHUNK", 3)  # several chunks, the last one partial
  rng = np.random.default_rng(0)
  image, text = rng.normal(size=(5, 4)), rng.normal(size=(11, 4))
  image[4] = image[1]  # a repeated image: its texts tie with the repeat
  c2i = np.concatenate([np.arange(5), rng.integers(0, 5, 6)])
  got = metrics.retrieval_metrics(image, text, c2i, ks=(1, 2, 3), mean_rank=True, ties=ties)
  want = _ref_retrieval(image, text, c2i, (1, 2, 3), mean_rank=True, both=True)
  suffix = "" if ties == "optimistic" else "_pessimistic"
  assert got == {k: want[k + suffix] for k in got}


def test_retrieval_ties_on_a_repeated_image(clip, files, tmp_path):
  """One image file on every row: optimistic ranks all 1, pessimistic ranks all 3."""
  path = tmp_path / "repeated.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filepath", "captions"])
    for c in range(3):
      w.writerow([IMAGES[2][0], repr([NEGATED[c]])])
  got = registry.run_task(
    "negbench-retrieval",
    clip.model,
    clip.params,
    ClipTokenizer(),
    progress=False,
    data=str(path),
    image_root=files.root,
    ties="both",
  )
  image = _ref_files(clip.hf, [_path(files.root, 2)] * 3)
  want = _ref_retrieval(
    image, _ref_texts(clip.hf, NEGATED[:3]), range(3), (1, 5), directions=("t2i",), both=True
  )
  assert want["t2i_r1"] == 1.0 and want["t2i_r1_pessimistic"] == 0.0
  _assert_same(got, {**want, "n": 3, "n_images": 3})


def test_roc_auc_matches_pairwise_rule():
  rng = np.random.default_rng(1)
  scores = np.round(rng.random(40), 1)  # many ties
  labels = rng.integers(0, 2, 40)
  assert metrics.roc_auc(labels, scores) == pytest.approx(_ref_auc(labels, scores))


def test_missing_data_is_a_clear_error(clip, files, capsys):
  with pytest.raises(SystemExit):
    eval_cli.main(["--model", clip.dir, "--task", "negrefcocog", "--image-root", files.root])
  assert "task 'negrefcocog' needs --data" in capsys.readouterr().err
  with pytest.raises(ValueError, match="needs --image-root"):
    registry.run_task(
      "ccneg", clip.model, clip.params, ClipTokenizer(), data=files.options["ccneg"]["data"]
    )
  with pytest.raises(SystemExit):
    eval_cli.main(["--model", clip.dir, "--task", "all", "--data", "x.json"])
  assert "ambiguous with --task all" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    eval_cli.main(["--model", clip.dir, "--task", "negshapes", "--decode-processes", "-2"])
  assert "--decode-processes -2: give >= -1" in capsys.readouterr().err


_DEVICE_CHECK = textwrap.dedent("""
    import sys
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import traverse_util
    from negclip_jax.model import clip as model_lib
    from negclip_jax.train import losses
    from negclip_jax.eval.embed import Embedder
    from negclip_jax.model.tokenizer import ClipTokenizer
    assert jax.local_device_count() == int(sys.argv[2]), jax.local_device_count()
    model = model_lib.CLIP(model_lib.get_config("tiny"))
    params = traverse_util.unflatten_dict(dict(np.load(sys.argv[1])), sep="/")
    apply = jax.jit(lambda x, method: losses.l2_normalize(model.apply({"params": params}, x,
                    method=method)), static_argnums=1)
    ids = ClipTokenizer()(["a red circle", "no blue square", "a dog", "not a cat", "x y z",
                           "a photo of a green triangle but not a cross", "the end"], 16)
    pixels = np.random.default_rng(0).normal(size=(7, 32, 32, 3)).astype(np.float32)
    direct = {"texts": np.asarray(apply(ids, "get_text_features")),
              "images": np.asarray(apply(pixels, "get_image_features"))}
    embedder = Embedder(model, params, batch_size=2, progress=False)  # 1 batch per device
    for n in (7, 2):  # 7 never fills the last batch; 2 is fewer than 3 or 4 devices
      for kind, got in (("texts", embedder.texts(ids[:n])), ("images", embedder.images(pixels[:n]))):
        err = np.abs(got - direct[kind][:n]).max()
        assert got.shape == direct[kind][:n].shape and err <= 1e-6, (n, kind, err)
    print("ok")
""")


@pytest.fixture(scope="module")
def params_file(clip, tmp_path_factory):
  """The tiny CLIP's params as an .npz of "a/b/kernel" arrays (loads without torch)."""
  path = tmp_path_factory.mktemp("npz") / "params.npz"
  np.savez(path, **traverse_util.flatten_dict(jax.device_get(clip.params), sep="/"))
  return str(path)


@pytest.mark.parametrize("devices", [1, 3, 4])
def test_embedder_padding_is_exact_on_any_device_count(devices, params_file):
  """Padded batches (padding dropped) equal an unpadded direct apply, to 1e-6."""
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
  )
  proc = subprocess.run(
    [sys.executable, "-c", _DEVICE_CHECK, params_file, str(devices)],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_docs_mcq_example_scores_a_wrong_caption_0_in_the_coco_layout(tmp_path, caplog):
  """docs/data_formats.md's MCQ example (right answer: caption 2) under the default `coco`
  layout, whose answer types leave caption 0 unmapped: a model that picks caption 0 is
  wrong and that answer is counted as `unmapped`, not a crash after the whole pass."""
  from negclip_jax.data.negbench import load_negbench_mcq
  from negclip_jax.eval.tasks import negbench_task

  docs = (ROOT / "docs/data_formats.md").read_text()
  example = docs.split("Multiple choice (e.g.", 1)[1].split("```", 2)[1].strip()
  (tmp_path / "mcq.csv").write_text(example + "\n")
  image = example.splitlines()[1].split(",")[0]
  (tmp_path / image).parent.mkdir(parents=True)
  Image.new("RGB", (8, 8)).save(tmp_path / image)
  records = load_negbench_mcq(tmp_path / "mcq.csv", tmp_path)
  assert records[0].correct == 2
  out = negbench_task.wrong_answers(np.array([0]), records, "coco")
  template = records[0].template
  assert out["wrong_as_unmapped"] == 1.0 and out["wrong_as_hybrid"] == 0.0
  assert out[f"wrong_{template}_as_unmapped"] == 1
  assert "counted as 'unmapped'" in caplog.text and "--mcq-layout" in caplog.text
  right = negbench_task.wrong_answers(np.array([2]), records, "coco")
  assert np.isnan(right["wrong_as_unmapped"])  # no wrong answers


def test_results_json_writes_nan_as_null():
  reject = lambda name: pytest.fail(f"non-strict JSON constant {name}")
  text = eval_results.document({"model": "m"}, {"t": {"a": float("nan"), "b": [float("inf"), 1.0]}})
  assert json.loads(text, parse_constant=reject)["results"] == {"t": {"a": None, "b": [None, 1.0]}}
