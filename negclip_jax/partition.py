"""Which parameters learn, and how: labels -> `optax.multi_transform` with the original AdamW.

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
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

TRAINABLE, FROZEN = "trainable", "frozen"
LAYER_PRESETS = ("front", "middle", "back", "whole")
ALWAYS_TRAINABLE = (r"^text_model/embeddings/", r"^text_model/final_layer_norm/",
                    r"^text_projection/", r"^logit_scale$")
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
    raise ValueError(f"Unknown layer preset {layers!r}; use one of {LAYER_PRESETS} or text "
                     "block indices such as 0,1")
  return tuple(sorted(indices))


def text_layers(layers: str | int | Sequence[int], num_layers: int) -> tuple[int, ...]:
  """Resolves a preset name or explicit indices (see `parse_layers`) to sorted text block
  indices."""
  layers = parse_layers(layers)
  if isinstance(layers, str):
    spans = {"front": (0, num_layers // 2), "middle": (num_layers // 3, 2 * num_layers // 3),
             "back": (2 * num_layers // 3, num_layers), "whole": (0, num_layers)}
    return tuple(range(*spans[layers]))
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad:
    raise ValueError(f"layers: text block indices {bad} out of range for {num_layers} text layers")
  return layers


def path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def label_params(params, layers: str | Sequence[int] = "front", num_layers: int | None = None,
                 extra_trainable: Iterable[str] = ()):
  """Returns a pytree like `params` whose leaves are "trainable" or "frozen".

  extra_trainable: regexes over "/"-joined paths for anything else to train
  (e.g. r"layer_norm" in frozen blocks). Selecting a vision parameter is an error.
  """
  flat = traverse_util.flatten_dict(params)
  if num_layers is None:
    num_layers = len({p[3] for p in flat if p[:3] == ("text_model", "encoder", "layers")})
  blocks = text_layers(layers, num_layers)
  patterns = [*ALWAYS_TRAINABLE, *(fr"^text_model/encoder/layers/{i}/" for i in blocks)]
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
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in {**frozen, **trainable}.items()})


SCHEDULES = ("original", "warmup_cosine")


def original_cosine_lr(learning_rate: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """The original recipe's `cosine_lr` (its `training_utils/schedulers.py`), step for step.

  The rate of update `step` (0-based, as optax counts) is ``base * (step + 1) / warmup`` while
  ``step <= warmup`` (so step `warmup` runs at ``base * (warmup + 1) / warmup``), then
  ``0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))) * base`` (denominator 1 when
  total == warmup). `warmup_steps=0` means no warm-up: the cosine from step 0.
  """
  if warmup_steps < 0 or total_steps < 1:
    raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and "
                     f"{total_steps}")
  decay_steps = total_steps - warmup_steps if total_steps != warmup_steps else 1

  def schedule(count):
    step = jnp.asarray(count, float)  # float64 only in x64 (parity) runs
    # 0.5 * (1 + cos(t)) written as cos(t / 2) ** 2: no cancellation near the end in float32.
    cosine = jnp.cos(0.5 * jnp.pi * (step - warmup_steps) / decay_steps) ** 2 * learning_rate
    if warmup_steps == 0:
      return cosine
    return jnp.where(step <= warmup_steps, learning_rate * (step + 1) / warmup_steps, cosine)
  return schedule


def learning_rate_schedule(kind: str, learning_rate: float, warmup_steps: int,
                           total_steps: int) -> optax.Schedule:
  """"original" (the paper's, the default) or "warmup_cosine" (optax's: warm-up from 0 to
  `learning_rate` over `warmup_steps`, no overshoot, then cosine to 0 at `total_steps`)."""
  if kind == "original":
    return original_cosine_lr(learning_rate, warmup_steps, total_steps)
  if kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0)
  raise ValueError(f"Unknown learning-rate schedule {kind!r}; use one of {SCHEDULES}")


class AdamWState(NamedTuple):
  count: jax.Array  # int32 [], updates taken so far
  mu: optax.Updates
  nu: optax.Updates


def torch_adamw(learning_rate: optax.Schedule, b1: float, b2: float, eps: float,
                weight_decay: float) -> optax.GradientTransformation:
  """`torch.optim.AdamW`, in its own order of float operations.

  The mathematics are `optax.adamw`'s; the rounding is torch's: the moments are updated as
  ``mu.lerp_(g, 1 - b1)`` and ``nu * b2 + (1 - b2) * g * g``; the parameter is first decayed,
  ``p * (1 - lr * wd)``, then moved by ``-(lr / bc1) * mu / (sqrt(nu) / sqrt(bc2) + eps)``, two
  roundings as torch's in-place `mul_` and `addcdiv_`. The update returned is the difference
  of that result and p, which `optax.apply_updates` adds back exactly whenever the result is
  within a factor of two of p (Sterbenz; every step that does not move a weight to or across
  zero), so a float32 run lands where the original's float32 AdamW does, not one rounding away.
  """
  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return AdamWState(jnp.zeros([], jnp.int32), zeros(), zeros())

  def update(grads, state, params):
    count = state.count + 1
    lr = learning_rate(state.count)
    t = count.astype(float)
    step_size, bc2_sqrt = lr / (1 - b1 ** t), jnp.sqrt(1 - b2 ** t)
    mu = jax.tree.map(lambda m, g: m + (1 - b1) * (g - m), state.mu, grads)
    nu = jax.tree.map(lambda v, g: v * b2 + (1 - b2) * (g * g), state.nu, grads)

    def new_param(p, m, v):
      decayed = p * (1 - lr * weight_decay).astype(p.dtype)
      return decayed - step_size.astype(p.dtype) * m / (jnp.sqrt(v) / bc2_sqrt + eps) - p
    return jax.tree.map(new_param, params, mu, nu), AdamWState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def make_optimizer(labels, learning_rate=1e-6, weight_decay=0.2, warmup_steps=50,
                   total_steps=1000, grad_clip_norm: float | None = None, b1=0.9, b2=0.999,
                   eps=1e-8, schedule: str = "original") -> optax.GradientTransformation:
  """AdamW on trainable leaves, zero on frozen ones: the original recipe by default.

  The defaults are the original's `torch.optim.AdamW(trainable, lr, weight_decay)`: torch's
  betas (0.9, 0.999) and eps 1e-8, decoupled decay (scaled by the rate) on every trainable
  leaf, including biases, LayerNorms, embeddings and logit_scale; and its `cosine_lr`
  schedule (`learning_rate_schedule`). Clipping and weight decay live inside the trainable
  branch, so frozen leaves carry no optimizer state.
  """
  rate = learning_rate_schedule(schedule, learning_rate, warmup_steps, total_steps)
  return masked_adamw(labels, rate, weight_decay, grad_clip_norm, b1=b1, b2=b2, eps=eps)


def masked_adamw(labels, rate: optax.Schedule, weight_decay: float,
                 grad_clip_norm: float | None = None, b1=0.9, b2=0.999,
                 eps=1e-8) -> optax.GradientTransformation:
  """`make_optimizer` given its learning-rate schedule `rate` (step -> rate)."""
  trainable = torch_adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if grad_clip_norm:
    trainable = optax.chain(optax.clip_by_global_norm(grad_clip_norm), trainable)
  return optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels)


def summary(params, labels) -> str:
  """Trainable/frozen parameter counts and the trained text blocks, like the original's log."""
  flat = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(labels)
  count = lambda label: sum(v.size for p, v in flat.items() if flat_labels[p] == label)
  n_train, n_frozen = count(TRAINABLE), count(FROZEN)
  total = n_train + n_frozen
  blocks = sorted({int(p[3]) for p in flat if p[:3] == ("text_model", "encoder", "layers")
                   and flat_labels[p] == TRAINABLE})
  others = sorted({"/".join(p[:2]) if p[0] == "text_model" else p[0] for p in flat
                   if flat_labels[p] == TRAINABLE and p[:3] != ("text_model", "encoder", "layers")})
  return (f"trainable params: {n_train:,} ({100 * n_train / total:.2f}%)  "
          f"frozen params: {n_frozen:,} ({100 * n_frozen / total:.2f}%)\n"
          f"trainable text blocks: {blocks}\ntrainable other: {others}")
