"""NegShapes diagnosis: what the frozen features encode, and whether training pairs are fit.

perception  ("negshapes-probe") For every object (colour, shape): a linear probe
            (`probe.linear_probe`, balanced accuracy, chance 0.5) fit on the features of
            `num` training-split scenes and scored on `num // 2` eval-split scenes, for
              image  the image features (frozen by Omni-NegCLIP: only text layers train),
                     label "the object is in the image";
              text   the text features of the plain captions, label "the caption
                     mentions the object" (a plain caption lists every object).
            The image probe bounds what text-side training can reach: an object the image
            features do not separate cannot be read as present or absent by any text.
            Metrics "image_probe_<colour>_<shape>", "image_probe_min", "image_probe_mean",
            the same for "text_probe", and "n" / "n_test" (training / test scenes).
fit         ("negshapes-fit") Accuracy on the *training* split's own images (ties wrong):
              presence_train       plain caption (true) vs its CC-Neg-style negation
              presence_hard_train  the shortcut-free pair "P, not C" vs "P, not B"
            "<pair>_rule_fewer_negations": the negation-word count's score on the same items
            (ties guessed), the trivial rule beside the model.
            With the run's `seed`, `num` <= config.data.negshapes_num and
            `hard_fraction` = config.data.negshapes_hard_fraction, the hard pairs are the
            very pairs the run trains on (`generate_pairs`: item i does not depend on num).
text oracle ("oracle_<task>_acc" in "negshapes-probe", with "_se", "_n", "_chance") A text
            side without a tower, fit to the frozen image features: a text's embedding is
            the sum of a_o over the objects it asserts present and of n_x over those it
            denies (`mention_counts`; 2 x 24 free vectors of the feature width), its score
            <image feature, embedding>. W = (a, n) is one logistic regression
            (`fit_text_oracle`) over the training split's comparisons: paper-style and
            shortcut-free presence pairs, and image-hard pairs both ways (text choice on A+Y
            and on A+X, image choice for "A, no X" and for "A, no Y"). Scored on every
            `negshapes_task.TASKS` item (held-out compositions included, ties wrong), it
            shows what a text side that composes "no X" as a vector reaches on these image
            features: an existence proof, where the image probe is the perception bound.
"""

from __future__ import annotations

import numpy as np

from negclip_jax.data import negshapes
from negclip_jax.eval import embed, probe
from negclip_jax.eval.tasks import negshapes_task

OBJECTS = tuple((c, s) for c in negshapes.COLOURS for s in negshapes.SHAPES)


def _object_labels(scenes) -> np.ndarray:
  """bool [N, len(OBJECTS)]: object j is in scene i."""
  return np.array([[o in scene for o in OBJECTS] for scene in scenes], bool)


def probe_objects(train_x, train_scenes, test_x, test_scenes, prefix: str) -> dict:
  """ "<prefix>_<colour>_<shape>" balanced probe accuracies, their min and mean; NaN for an
  object that training or test holds only present or only absent (too few scenes)."""
  train_y, test_y = _object_labels(train_scenes), _object_labels(test_scenes)
  both = lambda y: 0 < y.sum() < len(y)
  out = {
    f"{prefix}_{c}_{s}": probe.linear_probe(train_x, train_y[:, j], test_x, test_y[:, j])
    if both(train_y[:, j]) and both(test_y[:, j])
    else float("nan")
    for j, (c, s) in enumerate(OBJECTS)
  }
  values = [v for v in out.values() if not np.isnan(v)]
  summary = (min(values), float(np.mean(values))) if values else (float("nan"),) * 2
  return {**out, f"{prefix}_min": summary[0], f"{prefix}_mean": summary[1]}


def perception(
  embedder, tokenizer, context_length: int, *, num: int = 2000, seed: int = 0, image_size=None
) -> dict:
  """The image and text probes and the text oracle of the module docstring."""
  size = image_size or embed.image_size(embedder)
  train = negshapes.generate_pairs(num, seed, size, split="train")
  test = negshapes.generate_pairs(max(num // 2, 1), seed, size, split="eval")
  features = {
    name: (
      embed.embed_arrays(embedder, data["images"], f"probe {name} images"),
      embed.embed_texts(embedder, tokenizer, context_length, data["captions"], f"probe {name}"),
    )
    for name, data in (("train", train), ("test", test))
  }
  out = {"n": num, "n_test": len(test["scenes"])}
  for k, prefix in enumerate(("image_probe", "text_probe")):
    out.update(
      probe_objects(
        features["train"][k], train["scenes"], features["test"][k], test["scenes"], prefix
      )
    )
  image_features = lambda images: embed.embed_arrays(embedder, images, "oracle images")
  out.update(
    text_oracle(image_features, num=num, eval_num=len(test["scenes"]), seed=seed, image_size=size)
  )
  return out


def fit(
  embedder,
  tokenizer,
  context_length: int,
  *,
  num: int = 512,
  seed: int = 0,
  hard_fraction: float = 1.0,
  image_size=None,
) -> dict:
  """ "presence_train_acc" / "presence_hard_train_acc" (with "_se", "_n") on training pairs;
  "n": the pairs drawn."""
  if not 0 < hard_fraction <= 1:
    raise ValueError(f"hard_fraction must be in (0, 1], got {hard_fraction}")
  size = image_size or embed.image_size(embedder)
  data = negshapes.generate_pairs(num, seed, size, split="train", hard_fraction=hard_fraction)
  hard = np.asarray(data["hard"])
  images = embed.embed_arrays(embedder, data["images"], "fit images")
  text = lambda texts, desc: embed.embed_texts(embedder, tokenizer, context_length, texts, desc)
  pairs = {
    "presence_train": (np.ones(num, bool), data["captions"], data["negated"]),
    "presence_hard_train": (hard, data["presence_captions"], data["presence_negated"]),
  }
  out = {"n": num}
  for name, (mask, true, false) in pairs.items():
    true_f, false_f = text(true, f"{name} true"), text(false, f"{name} false")
    scores = np.stack([np.sum(images * true_f, -1), np.sum(images * false_f, -1)], 1)[mask]
    labels = np.zeros(len(scores), np.int64)
    stats = negshapes_task.choice_stats(scores, labels)
    negations = [
      [-negshapes_task.negation_count(t), -negshapes_task.negation_count(f)]
      for t, f, keep in zip(true, false, mask)
      if keep
    ]
    n = len(scores)
    out.update(
      {
        f"{name}_acc": stats["acc"],
        f"{name}_se": negshapes_task.standard_error(stats["acc"], n),
        f"{name}_n": n,
        f"{name}_rule_fewer_negations": negshapes_task.choice_stats(negations, labels)["guess"],
      }
    )
  return out


# ----------------------------------------------------------------------------- text oracle


def mention_counts(texts) -> np.ndarray:
  """float [N, 2 len(OBJECTS)]: per text, how often it asserts each object present (first
  half) and absent (second half), by `negshapes.parse_caption`."""
  index = {o: j for j, o in enumerate(OBJECTS)}
  counts = np.zeros((len(texts), 2 * len(OBJECTS)))
  for i, text in enumerate(texts):
    present, absent = negshapes.parse_caption(text)
    for o in present:
      counts[i, index[o]] += 1
    for o in absent:
      counts[i, len(OBJECTS) + index[o]] += 1
  return counts


def _design(image_f: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """[N, 2K D]: <image_f, counts @ W> = design @ W.ravel() for W [2K, D]."""
  return (counts[:, :, None] * image_f[:, None, :]).reshape(len(image_f), -1)


def fit_text_oracle(true_f, true_counts, false_f, false_counts, l2: float = 1e-3) -> np.ndarray:
  """W float [2K, D] making each comparison's true option score higher: the logistic
  regression of "option 1 wins" on the difference of the two options' design rows.

  true_f / false_f: image features [N, D] of each comparison's true / false option (the
  same image twice for a text choice); true_counts / false_counts: `mention_counts` [N, 2K]
  of their texts (the same text twice for an image choice)."""
  x = _design(true_f, true_counts) - _design(false_f, false_counts)
  w = probe.fit_logistic(x, np.ones(len(x)), l2=l2)
  return w.reshape(true_counts.shape[1], true_f.shape[1])


def oracle_scores(w: np.ndarray, task: dict, image_features) -> np.ndarray:
  """float [N, K]: the oracle's score of each option of a NegShapes task (as
  `negshapes_task.model_scores`); image_features: uint8 images -> float [N, D]."""
  if "texts" in task:
    images, _, _ = negshapes_task.image_choices(task)
    text = mention_counts(task["texts"]) @ w
    return np.stack([np.sum(text * image_features(x), -1) for x in images], 1)
  options, _ = negshapes_task.text_choices(task)
  text = (mention_counts([t for row in options for t in row]) @ w).reshape(
    len(options), -1, w.shape[1]
  )
  return np.einsum("nd,nkd->nk", image_features(task["images"]), text)


def text_oracle(image_features, *, num: int, eval_num: int, seed: int, image_size: int) -> dict:
  """ "oracle_<task>_acc/_se/_n/_chance" (every `negshapes_task.TASKS` item, per mcq
  template too) of `fit_text_oracle` fit on `num` training scenes of `seed`;
  image_features: uint8 images [N, S, S, 3] -> float [N, D] (the model's, L2-normalised)."""
  hard = negshapes.generate_pairs(num, seed, image_size, split="train", hard_fraction=1.0)
  image_hard = negshapes.generate_pairs(
    num, seed, image_size, split="train", distractors=True, image_hard_fraction=1.0
  )
  # The hard and image-hard draws share their scenes and images (`generate_pairs`: those
  # fractions use their own streams): embedded once, as A+Y; the distractors are A+X.
  f, f_distractor = image_features(hard["images"]), image_features(image_hard["distractor_images"])
  c = {
    k: mention_counts(hard[k])
    for k in ("captions", "negated", "presence_captions", "presence_negated")
  }
  no_x, no_y = (mention_counts(image_hard[k]) for k in ("presence_captions", "presence_negated"))
  comparisons = [  # (true image, true text, false image, false text)
    (f, c["captions"], f, c["negated"]),  # paper-style presence
    (f, c["presence_captions"], f, c["presence_negated"]),  # shortcut-free presence
    (f, no_x, f, no_y),  # A+Y: "A, no X" over "A, no Y"
    (f_distractor, no_y, f_distractor, no_x),  # A+X: "A, no Y" over "A, no X"
    (f, no_x, f_distractor, no_x),  # "A, no X": A+Y over A+X
    (f_distractor, no_y, f, no_y),  # "A, no Y": A+X over A+Y
  ]
  w = fit_text_oracle(*(np.concatenate(parts) for parts in zip(*comparisons)))
  data = negshapes_task.generate(eval_num, seed, image_size)
  out = {}
  for name in negshapes_task.TASKS:
    scores = oracle_scores(w, data[name], image_features)
    out.update(
      {f"oracle_{k}": v for k, v in negshapes_task.task_metrics(name, data[name], scores).items()}
    )
    out[f"oracle_{name}_chance"] = 1 / scores.shape[1]
  return out
