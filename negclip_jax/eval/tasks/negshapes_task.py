"""NegShapes: paper-style and shortcut-free negation tasks, with a shortcut audit.

Tasks (`generate`; each on in-distribution compositions, and with "_heldout" on object
pairs never generated for training, see `negclip_jax.data.negshapes`):
  presence       paper style: an image, its plain caption (true) vs the caption with one
                 present object negated (false). Solved by "fewer negation words".
  absence        paper style: "A, no X" vs images A (true) and A + X (false). Solved by
                 "fewer object pixels".
  presence_hard  both texts negated, one true ("P, not C" vs "P, not B", B in the image).
  absence_hard   "A, no X" vs images A + Y (true) and A + X (false): equal object counts.
  mcq            NegBench-style 4-way multiple choice, per template (affirmation,
                 negation, hybrid); all options share template and negation words.
  retrieval      plain-caption image <-> text retrieval (R@1).

Scoring: the model picks the option with the highest similarity; a tie at the top counts
as wrong everywhere, and "<task>_ties" is the fraction of such ties. "<task>_se" is the
binomial standard error sqrt(acc (1 - acc) / n).

Shortcut audit ("<task>_rule_<rule>", with "<task>_chance"): trivial rules scored on the
same items; a rule that ties guesses uniformly among its tied options, so its accuracy
is the expected accuracy of that guess ("<task>_rule_<rule>_ties": how often it had to).
  fewer_negations  prefer the text with fewer "no"/"not"/"without" words (text choices).
  text_only        a bag-of-words logistic regression fit on the training split's texts
                   (captions and updated captions true, negated false); never sees images.
  fewer_pixels     prefer the image with fewer object pixels (image choices); never reads.
  negation_blind   the ground-truth scene, matched to every object a text mentions with
                   negation ignored: what a perfect perceiver that ignores "no" scores.
  negation_inverted  its mirror: prefers the option whose texts name the fewest shown
                   objects, "no" ignored. Solves the two-way hard tasks with no notion of
                   negation, and fails affirmation: a model must not be credited for it.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from negclip_jax.data import negshapes
from negclip_jax.eval import embed, metrics, probe

TEXT_CHOICE = ("presence", "presence_hard", "mcq")  # one image, K texts
IMAGE_CHOICE = ("absence", "absence_hard")  # one text, K images
TASKS = tuple(
  f"{kind}{split}"
  for kind in ("presence", "absence", "presence_hard", "absence_hard", "mcq")
  for split in ("", "_heldout")
)
RULES = {
  "text": ("fewer_negations", "text_only", "negation_blind", "negation_inverted"),
  "image": ("fewer_pixels", "negation_blind", "negation_inverted"),
}
_GENERATORS = {
  "presence": negshapes.presence_task,
  "absence": negshapes.absence_task,
  "presence_hard": negshapes.presence_hard_task,
  "absence_hard": negshapes.absence_hard_task,
  "mcq": negshapes.mcq_task,
}
_OBJECT_LEVEL = 150  # a pixel whose brightest channel exceeds this is an object pixel
_TEXT_RULE_PAIRS = 2000  # training examples the text-only rule is fit on


def base_task(name: str) -> str:
  """ "presence_hard_heldout" -> "presence_hard"."""
  return name.removesuffix("_heldout")


def generate(num: int = 500, seed: int = 0, image_size: int = 64) -> dict:
  """{task: task dict} for every name in `TASKS` plus "retrieval", `num` each, and
  "text_rule": the text-only rule fit on the training split of `seed`."""
  data = {
    name: _GENERATORS[base_task(name)](
      num, seed, image_size, "held_out" if name.endswith("_heldout") else "in_distribution"
    )
    for name in TASKS
  }
  data["retrieval"] = negshapes.retrieval_task(num, seed, image_size)
  train = negshapes.generate_pairs(_TEXT_RULE_PAIRS, seed, image_size=16, split="train")
  data["text_rule"] = fit_text_rule(
    train["captions"] + train["updated"] + train["negated"],
    [1] * (2 * _TEXT_RULE_PAIRS) + [0] * _TEXT_RULE_PAIRS,
  )
  return data


# --------------------------------------------------------------------------- choices


def text_choices(task: dict) -> tuple[list[list[str]], np.ndarray]:
  """(options [N][K], labels int [N]) of a one-image, K-texts task."""
  if "options" in task:
    return task["options"], np.asarray(task["labels"])
  return [[c, n] for c, n in zip(task["captions"], task["negated"])], np.zeros(
    len(task["captions"]), np.int64
  )


def image_choices(task: dict) -> tuple[list[np.ndarray], list[list], np.ndarray]:
  """(K image arrays [N, S, S, 3], scenes [N][K], labels int [N]) of a one-text task."""
  scenes = [[p, n] for p, n in zip(task["scenes_pos"], task["scenes_neg"])]
  return [task["images_pos"], task["images_neg"]], scenes, np.zeros(len(scenes), np.int64)


def choice_stats(scores: np.ndarray, labels: np.ndarray) -> dict:
  """scores [N, K], labels [N] -> {"acc": label strictly on top (ties wrong), "ties":
  fraction of items whose top score is shared, "guess": expected accuracy when ties
  are settled by a uniform guess among the tied options}; NaN for N = 0."""
  if len(labels) == 0:
    return {"acc": float("nan"), "ties": float("nan"), "guess": float("nan")}
  scores = np.asarray(scores, np.float64)
  top = scores == scores.max(1, keepdims=True)
  n_top = top.sum(1)
  on_top = top[np.arange(len(labels)), labels]
  return {
    "acc": float(np.mean(on_top & (n_top == 1))),
    "ties": float(np.mean(n_top > 1)),
    "guess": float(np.mean(on_top / n_top)),
  }


def standard_error(acc: float, n: int) -> float:
  """Binomial standard error of an accuracy over n items."""
  return float(np.sqrt(acc * (1 - acc) / max(n, 1)))


# ----------------------------------------------------------------------------- rules


def words(text: str) -> list[str]:
  return re.findall(r"[a-z]+", text)


def negation_count(text: str) -> int:
  """Number of "no" / "not" / "without" words."""
  return sum(w in metrics.NEGATION_WORDS for w in words(text))


def object_pixels(images: np.ndarray) -> np.ndarray:
  """int [N]: pixels of uint8 images [N, S, S, 3] brighter than any background."""
  return (np.asarray(images).max(-1) > _OBJECT_LEVEL).sum((1, 2))


def mentions_in_scene(text: str, scene) -> int:
  """Objects the text mentions (present or negated alike) that are in the scene."""
  present, absent = negshapes.parse_caption(text)
  return sum(o in scene for o in present + absent)


def _bag_of_words(texts: Sequence[str], vocab: dict) -> np.ndarray:
  """float [N, V+1]: word counts over `vocab` and a constant 1 (bias)."""
  x = np.zeros((len(texts), len(vocab) + 1))
  x[:, -1] = 1.0
  for i, text in enumerate(texts):
    for w in words(text):
      if w in vocab:
        x[i, vocab[w]] += 1
  return x


def fit_text_rule(texts: Sequence[str], labels: Sequence[int], l2: float = 1e-3) -> dict:
  """L2-regularised logistic regression P(text true) on word counts (`probe.fit_logistic`).

  Returns {"vocab": {word: column}, "weights": float [V+1]}.
  """
  vocab = {w: i for i, w in enumerate(sorted({w for t in texts for w in words(t)}))}
  weights = probe.fit_logistic(_bag_of_words(texts, vocab), np.asarray(labels), l2=l2, steps=300)
  return {"vocab": vocab, "weights": weights}


def text_rule_scores(rule: dict, texts: Sequence[str]) -> np.ndarray:
  """float [N]: the text-only rule's logit that each text is true."""
  return _bag_of_words(texts, rule["vocab"]) @ rule["weights"]


def rule_scores(rule: str, task: dict, text_rule: dict | None = None) -> np.ndarray:
  """float [N, K]: `rule`'s preference for each option of `task` (higher = chosen)."""
  if rule == "negation_inverted":
    return -rule_scores("negation_blind", task, text_rule)
  if "texts" in task:  # one text, K images
    images, scenes, _ = image_choices(task)
    if rule == "fewer_pixels":
      return -np.stack([object_pixels(x) for x in images], 1).astype(np.float64)
    if rule == "negation_blind":
      return np.array(
        [[mentions_in_scene(t, s) for s in row] for t, row in zip(task["texts"], scenes)],
        np.float64,
      )
  else:
    options, _ = text_choices(task)
    if rule == "fewer_negations":
      return -np.array([[negation_count(t) for t in row] for row in options], np.float64)
    if rule == "text_only":
      flat = text_rule_scores(text_rule, [t for row in options for t in row])
      return flat.reshape(len(options), -1)
    if rule == "negation_blind":
      return np.array(
        [[mentions_in_scene(t, s) for t in row] for row, s in zip(options, task["scenes"])],
        np.float64,
      )
  raise ValueError(f"rule {rule!r} does not apply to this task")


def audit(name: str, task: dict, text_rule: dict) -> dict:
  """{"<name>_chance", "<name>_rule_<rule>", "<name>_rule_<rule>_ties"} on `task`."""
  kind = "image" if "texts" in task else "text"
  labels = image_choices(task)[2] if kind == "image" else text_choices(task)[1]
  k = 2 if kind == "image" else len(text_choices(task)[0][0])
  out = {f"{name}_chance": 1 / k}
  for rule in RULES[kind]:
    stats = choice_stats(rule_scores(rule, task, text_rule), labels)
    out[f"{name}_rule_{rule}"] = stats["guess"]
    out[f"{name}_rule_{rule}_ties"] = stats["ties"]
  return out


# ---------------------------------------------------------------------------- models


def model_scores(embedder, tokenizer, context_length: int, name: str, task: dict) -> np.ndarray:
  """float [N, K]: the model's similarity of each item's options."""
  if "texts" in task:
    images, _, _ = image_choices(task)
    text = embed.embed_texts(embedder, tokenizer, context_length, task["texts"], name)
    return np.stack(
      [
        np.sum(text * embed.embed_arrays(embedder, x, f"{name} images {j}"), -1)
        for j, x in enumerate(images)
      ],
      1,
    )
  options, _ = text_choices(task)
  image = embed.embed_arrays(embedder, task["images"], f"{name} images")
  flat = embed.embed_texts(
    embedder, tokenizer, context_length, [t for row in options for t in row], f"{name} texts"
  )
  return np.einsum("nd,nkd->nk", image, flat.reshape(len(options), -1, flat.shape[-1]))


def task_metrics(name: str, task: dict, scores: np.ndarray) -> dict:
  """ "<name>_acc" (ties wrong), "_se", "_ties", "_n"; per template for mcq tasks."""
  labels = image_choices(task)[2] if "texts" in task else text_choices(task)[1]
  out = {}
  groups = {"": np.ones(len(labels), bool)}
  if "templates" in task:
    templates = np.asarray(task["templates"])
    groups.update({f"_{t}": templates == t for t in negshapes.MCQ_TEMPLATES})
  for suffix, mask in groups.items():
    stats = choice_stats(scores[mask], labels[mask])
    n = int(mask.sum())
    out.update(
      {
        f"{name}{suffix}_acc": stats["acc"],
        f"{name}{suffix}_se": standard_error(stats["acc"], n),
        f"{name}{suffix}_n": n,
      }
    )
    if not suffix:
      out[f"{name}_ties"] = stats["ties"]
  return out


def evaluate(embedder, tokenizer, context_length: int, data: dict) -> dict:
  """Every task's metrics and shortcut audit (see the module docstring), plus
  "retrieval_t2i_r1", "retrieval_i2t_r1" and "n" (the number of presence items).

  Images (uint8, any size) are preprocessed to the model's size.
  """
  out = {}
  for name in TASKS:
    if name in data:
      scores = model_scores(embedder, tokenizer, context_length, name, data[name])
      out.update(task_metrics(name, data[name], scores))
      out.update(audit(name, data[name], data["text_rule"]))
  retrieval = data["retrieval"]
  recall = metrics.retrieval_metrics(
    embed.embed_arrays(embedder, retrieval["images"], "retrieval images"),
    embed.embed_texts(
      embedder, tokenizer, context_length, retrieval["captions"], "retrieval captions"
    ),
    np.arange(len(retrieval["captions"])),
    ks=(1,),
  )
  out.update({f"retrieval_{k}": v for k, v in recall.items()})
  out["n"] = len(data["presence"]["captions"])
  return out


def report(results: dict) -> str:
  """Markdown: per task, the model's accuracy +- s.e. and the shortcut audit."""
  rules = ("fewer_negations", "text_only", "fewer_pixels", "negation_blind", "negation_inverted")
  rows = [
    "| task | n | chance | accuracy +- s.e. | ties | " + " | ".join(rules) + " |",
    "|---|---:|---:|---:|---:|" + "---:|" * len(rules),
  ]
  for name in TASKS:
    if f"{name}_acc" not in results:
      continue
    cells = [
      f"{results[f'{name}_rule_{r}']:.3f}" if f"{name}_rule_{r}" in results else "-" for r in rules
    ]
    rows.append(
      f"| {name} | {results[f'{name}_n']} | {results[f'{name}_chance']:.2f} | "
      f"{results[f'{name}_acc']:.3f} +- {results[f'{name}_se']:.3f} | "
      f"{results[f'{name}_ties']:.3f} | " + " | ".join(cells) + " |"
    )
  return "\n".join(rows)


def run(
  embedder,
  tokenizer,
  context_length: int,
  *,
  num: int = 500,
  seed: int = 0,
  image_size: int | None = None,
) -> dict:
  """`evaluate` on freshly generated data; image_size defaults to the model's."""
  data = generate(num, seed, image_size or embed.image_size(embedder))
  return evaluate(embedder, tokenizer, context_length, data)
