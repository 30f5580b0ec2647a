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
  """The image and text probes of the module docstring."""
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
