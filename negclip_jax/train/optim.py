"""The optimizer of the original recipe: its learning-rate schedule and torch's AdamW, applied
to the leaves `param_groups` labels trainable (frozen leaves get zero updates, no state).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from negclip_jax.train.param_groups import FROZEN, TRAINABLE

SCHEDULES = ("original", "warmup_cosine")


def original_cosine_lr(learning_rate: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """The original recipe's `cosine_lr` (its `training_utils/schedulers.py`), step for step.

  The rate of update `step` (0-based, as optax counts) is ``base * (step + 1) / warmup`` while
  ``step <= warmup`` (so step `warmup` runs at ``base * (warmup + 1) / warmup``), then
  ``0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))) * base`` (denominator 1 when
  total == warmup). `warmup_steps=0` means no warm-up: the cosine from step 0.
  """
  if warmup_steps < 0 or total_steps < 1:
    raise ValueError(
      f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}"
    )
  decay_steps = total_steps - warmup_steps if total_steps != warmup_steps else 1

  def schedule(count):
    step = jnp.asarray(count, float)  # float64 only in x64 (parity) runs
    # 0.5 * (1 + cos(t)) written as cos(t / 2) ** 2: no cancellation near the end in float32.
    cosine = jnp.cos(0.5 * jnp.pi * (step - warmup_steps) / decay_steps) ** 2 * learning_rate
    if warmup_steps == 0:
      return cosine
    return jnp.where(step <= warmup_steps, learning_rate * (step + 1) / warmup_steps, cosine)

  return schedule


def learning_rate_schedule(
  kind: str, learning_rate: float, warmup_steps: int, total_steps: int
) -> optax.Schedule:
  """ "original" (the paper's, the default) or "warmup_cosine" (optax's: warm-up from 0 to
  `learning_rate` over `warmup_steps`, no overshoot, then cosine to 0 at `total_steps`)."""
  if kind == "original":
    return original_cosine_lr(learning_rate, warmup_steps, total_steps)
  if kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0
    )
  raise ValueError(f"Unknown learning-rate schedule {kind!r}; use one of {SCHEDULES}")


class AdamWState(NamedTuple):
  count: jax.Array  # int32 [], updates taken so far
  mu: optax.Updates
  nu: optax.Updates


def torch_adamw(
  learning_rate: optax.Schedule, b1: float, b2: float, eps: float, weight_decay: float
) -> optax.GradientTransformation:
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
    step_size, bc2_sqrt = lr / (1 - b1**t), jnp.sqrt(1 - b2**t)
    mu = jax.tree.map(lambda m, g: m + (1 - b1) * (g - m), state.mu, grads)
    nu = jax.tree.map(lambda v, g: v * b2 + (1 - b2) * (g * g), state.nu, grads)

    def new_param(p, m, v):
      decayed = p * (1 - lr * weight_decay).astype(p.dtype)
      return decayed - step_size.astype(p.dtype) * m / (jnp.sqrt(v) / bc2_sqrt + eps) - p

    return jax.tree.map(new_param, params, mu, nu), AdamWState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def make_optimizer(
  labels,
  learning_rate=1e-6,
  weight_decay=0.2,
  warmup_steps=50,
  total_steps=1000,
  grad_clip_norm: float | None = None,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
  schedule: str = "original",
) -> optax.GradientTransformation:
  """AdamW on trainable leaves, zero on frozen ones: the original recipe by default.

  The defaults are the original's `torch.optim.AdamW(trainable, lr, weight_decay)`: torch's
  betas (0.9, 0.999) and eps 1e-8, decoupled decay (scaled by the rate) on every trainable
  leaf, including biases, LayerNorms, embeddings and logit_scale; and its `cosine_lr`
  schedule (`learning_rate_schedule`). Clipping and weight decay live inside the trainable
  branch, so frozen leaves carry no optimizer state.
  """
  rate = learning_rate_schedule(schedule, learning_rate, warmup_steps, total_steps)
  return masked_adamw(labels, rate, weight_decay, grad_clip_norm, b1=b1, b2=b2, eps=eps)


def masked_adamw(
  labels,
  rate: optax.Schedule,
  weight_decay: float,
  grad_clip_norm: float | None = None,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
) -> optax.GradientTransformation:
  """`make_optimizer` given its learning-rate schedule `rate` (step -> rate)."""
  trainable = torch_adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if grad_clip_norm:
    trainable = optax.chain(optax.clip_by_global_norm(grad_clip_norm), trainable)
  return optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels)


def pretrain_adamw(schedule: optax.Schedule) -> optax.GradientTransformation:
  """The demo's from-scratch CLIP pretraining (all parameters): optax AdamW with CLIP's
  pretraining betas (0.9, 0.98), eps 1e-6, weight decay 0.1, gradients clipped to norm 1."""
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1),
  )
