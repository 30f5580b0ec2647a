"""Which parameters learn: a "trainable" / "frozen" label per leaf (`optim` turns labels into
`optax.multi_transform`).

Parameter paths are Flax paths joined by "/", e.g. ``text_model/encoder/layers/3/mlp/fc1/kernel``.
Every preset trains the token and position embeddings, the final text LayerNorm, the
text projection and logit_scale, plus a set of text blocks:

  front = blocks [0, L/2)        (0-5 of 12, the paper's choice)
  middle = blocks [L/3, 2L/3)    (4-7 of 12)
  back = blocks [2L/3, L)        (8-11 of 12)
  whole = all blocks

The vision tower and visual projection are always frozen.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from flax import traverse_util

TRAINABLE, FROZEN = "trainable", "frozen"
LAYER_PRESETS = ("front", "middle", "back", "whole")
ALWAYS_TRAINABLE = (
  r"^text_model/embeddings/",
  r"^text_model/final_layer_norm/",
  r"^text_projection/",
  r"^logit_scale$",
)
NEVER_TRAINABLE = r"^(vision_model|visual_projection)/"


def parse_layers(layers: str | int | Sequence[int]) -> str | tuple[int, ...]:
  """A preset name or block indices -> the preset name or sorted unique indices.

  Indices may be a sequence, an int, or their command-line spelling: "0,1", "[0,1]",
  "(0,2)", "3".
  """
  if isinstance(layers, int):
    return (layers,)
  if not isinstance(layers, str):
    return tuple(sorted({int(i) for i in layers}))
  text = layers.strip()
  if text in LAYER_PRESETS:
    return text
  if text[:1] + text[-1:] in ("[]", "()"):
    text = text[1:-1]
  try:
    indices = {int(i) for i in text.split(",") if i.strip()}
  except ValueError:
    indices = None
  if not indices:
    raise ValueError(
      f"Unknown layer preset {layers!r}; use one of {LAYER_PRESETS} or text "
      "block indices such as 0,1"
    )
  return tuple(sorted(indices))


def text_layers(layers: str | int | Sequence[int], num_layers: int) -> tuple[int, ...]:
  """Resolves a preset name or explicit indices (see `parse_layers`) to sorted text block
  indices."""
  layers = parse_layers(layers)
  if isinstance(layers, str):
    spans = {
      "front": (0, num_layers // 2),
      "middle": (num_layers // 3, 2 * num_layers // 3),
      "back": (2 * num_layers // 3, num_layers),
      "whole": (0, num_layers),
    }
    return tuple(range(*spans[layers]))
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad:
    raise ValueError(f"layers: text block indices {bad} out of range for {num_layers} text layers")
  return layers


def path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def label_params(
  params,
  layers: str | Sequence[int] = "front",
  num_layers: int | None = None,
  extra_trainable: Iterable[str] = (),
):
  """Returns a pytree like `params` whose leaves are "trainable" or "frozen".

  extra_trainable: regexes over "/"-joined paths for anything else to train
  (e.g. r"layer_norm" in frozen blocks). Selecting a vision parameter is an error.
  """
  flat = traverse_util.flatten_dict(params)
  if num_layers is None:
    num_layers = len({p[3] for p in flat if p[:3] == ("text_model", "encoder", "layers")})
  blocks = text_layers(layers, num_layers)
  patterns = [*ALWAYS_TRAINABLE, *(rf"^text_model/encoder/layers/{i}/" for i in blocks)]
  extra = [re.compile(p) for p in extra_trainable]
  labels = {}
  for path in flat:
    name = path_str(path)
    hit_extra = any(p.search(name) for p in extra)
    if hit_extra and re.search(NEVER_TRAINABLE, name):
      raise ValueError(f"extra_trainable selects {name}, but the vision tower is always frozen")
    trainable = hit_extra or any(re.search(p, name) for p in patterns)
    labels[path] = TRAINABLE if trainable else FROZEN
  return traverse_util.unflatten_dict(labels)


def split(params, labels) -> tuple[dict, dict]:
  """-> (trainable, frozen), each a flat dict {"a/b/c": leaf}."""
  flat_params = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(labels)
  trainable, frozen = {}, {}
  for path, leaf in flat_params.items():
    (trainable if flat_labels[path] == TRAINABLE else frozen)[path_str(path)] = leaf
  return trainable, frozen


def merge(trainable: dict, frozen: dict):
  """Inverse of `split`: two flat dicts -> the nested params tree."""
  return traverse_util.unflatten_dict(
    {tuple(k.split("/")): v for k, v in {**frozen, **trainable}.items()}
  )


def summary(params, labels) -> str:
  """Trainable/frozen parameter counts and the trained text blocks, like the original's log."""
  flat = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(labels)
  count = lambda label: sum(v.size for p, v in flat.items() if flat_labels[p] == label)
  n_train, n_frozen = count(TRAINABLE), count(FROZEN)
  total = n_train + n_frozen
  blocks = sorted(
    {
      int(p[3])
      for p in flat
      if p[:3] == ("text_model", "encoder", "layers") and flat_labels[p] == TRAINABLE
    }
  )
  others = sorted(
    {
      "/".join(p[:2]) if p[0] == "text_model" else p[0]
      for p in flat
      if flat_labels[p] == TRAINABLE and p[:3] != ("text_model", "encoder", "layers")
    }
  )
  return (
    f"trainable params: {n_train:,} ({100 * n_train / total:.2f}%)  "
    f"frozen params: {n_frozen:,} ({100 * n_frozen / total:.2f}%)\n"
    f"trainable text blocks: {blocks}\ntrainable other: {others}"
  )
