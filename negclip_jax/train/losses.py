"""Omni-NegCLIP objectives: pure functions of L2-normalized embeddings.

Every embedding argument is [B, D] and L2-normalized; `logit_scale` is the scalar
temperature already exponentiated (the original multiplies by `logit_scale.exp()`).
Each function returns `(loss, metrics)`: a scalar and a dict of scalar components.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def at_least_float32(x):
  """x in float32, or in its own dtype if that is wider (float64 parity runs)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy; logits [N, C], integer labels [N]."""
  logp = jax.nn.log_softmax(at_least_float32(logits), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def l2_normalize(x, eps=1e-12):
  """x [..., D] / ||x||, computed in (at least) float32."""
  x = at_least_float32(x)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def clip_loss(image_emb, text_emb, logit_scale):
  """Symmetric CLIP loss: (CE(image -> texts) + CE(text -> images)) / 2, label = own index."""
  logits = logit_scale * image_emb @ text_emb.T
  labels = jnp.arange(image_emb.shape[0])
  loss = (cross_entropy(logits, labels) + cross_entropy(logits.T, labels)) / 2
  return loss, {"clip": loss}


def presence_loss(image_emb, caption_emb, negated_emb, logit_scale, use_l3=True):
  """CC-Neg presence objective, (L1 + L2 + L3) / 3 ((L1 + L2) / 2 without L3).

  L1: each image over all 2B texts [captions; negated], label i.
  L2: each caption over the B images, label i.
  L3: 2-way CE over logit_scale * [sim(img_i, caption_i), sim(img_i, negated_i)], label 0.
  """
  b = image_emb.shape[0]
  labels = jnp.arange(b)
  texts = jnp.concatenate([caption_emb, negated_emb], axis=0)
  l1 = cross_entropy(logit_scale * image_emb @ texts.T, labels)
  l2 = cross_entropy(logit_scale * caption_emb @ image_emb.T, labels)
  pair = logit_scale * jnp.stack(
    [jnp.sum(image_emb * caption_emb, -1), jnp.sum(image_emb * negated_emb, -1)], axis=-1
  )
  l3 = cross_entropy(pair, jnp.zeros(b, jnp.int32))
  loss = (l1 + l2 + l3) / 3 if use_l3 else (l1 + l2) / 2
  return loss, {"L1": l1, "L2": l2, "L3": l3, "presence": loss}


def absence_loss(
  image_emb, caption_emb, updated_emb, logit_scale, lambda_orig=1.0, lambda_text=1.0, margin=0.9
):
  """NegationCLIP-style absence objective.

  L_neg = CLIP loss image <-> updated caption; L_orig = CLIP loss image <-> caption;
  L_text = mean(relu(cos(caption_i, updated_i) + margin)).
  Returns L_neg + lambda_orig * L_orig + lambda_text * L_text.
  """
  l_neg, _ = clip_loss(image_emb, updated_emb, logit_scale)
  l_orig, _ = clip_loss(image_emb, caption_emb, logit_scale)
  l_text = jnp.mean(jax.nn.relu(jnp.sum(caption_emb * updated_emb, -1) + margin))
  loss = l_neg + lambda_orig * l_orig + lambda_text * l_text
  return loss, {"L_neg": l_neg, "L_orig": l_orig, "L_text": l_text, "absence": loss}


def conclip_loss(image_emb, caption_emb, negated_emb, distractor_emb, logit_scale):
  """CoN-CLIP's distractor-image objective, (L1 + L2 + L3) / 3.

  distractor_emb [B, D] embeds an image for which negated_i is true (CoN-CLIP retrieves
  it from COCO; NegShapes draws the scene without the negated object).
  L1: each image over all 2B texts [captions; negated], label i.
  L2: each caption over all 2B images [images; distractors], label i.
  L3: each distractor over all 2B texts [negated; captions], label i.
  """
  b = image_emb.shape[0]
  labels = jnp.arange(b)
  texts = jnp.concatenate([caption_emb, negated_emb], axis=0)
  images = jnp.concatenate([image_emb, distractor_emb], axis=0)
  l1 = cross_entropy(logit_scale * image_emb @ texts.T, labels)
  l2 = cross_entropy(logit_scale * caption_emb @ images.T, labels)
  l3 = cross_entropy(logit_scale * distractor_emb @ texts.T, labels + b)
  loss = (l1 + l2 + l3) / 3
  return loss, {"L1": l1, "L2": l2, "L3": l3, "presence": loss}


def paired_choices_loss(image_emb, caption_emb, negated_emb, distractor_emb, logit_scale):
  """Every 2-way choice of the square (image, distractor) x (caption, negated), averaged.

  caption_i is true for image_i and false for distractor_i; negated_i the reverse
  (`conclip_loss`'s distractors). Each term is a 2-way CE, label 0, over logit_scale *
  [sim(true pair), sim(false pair)] that share one side: texts of image_i (as L3), texts of
  distractor_i, images of caption_i, images of negated_i. No term compares across examples.
  """
  sim = lambda a, b: jnp.sum(a * b, -1)
  zeros = jnp.zeros(image_emb.shape[0], jnp.int32)
  choose = lambda true, false: cross_entropy(logit_scale * jnp.stack([true, false], -1), zeros)
  pos, neg = sim(image_emb, caption_emb), sim(image_emb, negated_emb)
  d_pos, d_neg = sim(distractor_emb, negated_emb), sim(distractor_emb, caption_emb)
  terms = {
    "L3": choose(pos, neg),
    "distractor_texts": choose(d_pos, d_neg),
    "caption_images": choose(pos, d_neg),
    "negated_images": choose(d_pos, neg),
  }
  loss = sum(terms.values()) / 4
  return loss, {**terms, "presence": loss}


def _presence_term(name, emb, logit_scale):
  """(loss, metrics) of the presence batch under term `name` of `OBJECTIVES`."""
  image, caption, negated = (emb[f"presence_{k}"] for k in ("image", "caption", "negated"))
  if name in ("conclip", "paired_choices"):
    fn = conclip_loss if name == "conclip" else paired_choices_loss
    return fn(image, caption, negated, emb["presence_distractor"], logit_scale)
  loss, metrics = presence_loss(image, caption, negated, logit_scale, use_l3=name != "no_l3")
  if name == "l3":  # L1 and L2 stay as metrics
    loss = metrics["presence"] = metrics["L3"]
  return loss, metrics


def _absence_term(name, emb, logit_scale, lambda_orig, lambda_text, margin):
  """(loss, metrics) of the absence batch under term `name` of `OBJECTIVES`."""
  if name == "plain_clip":  # image <-> plain caption; no negated text
    loss, _ = clip_loss(emb["absence_image"], emb["absence_caption"], logit_scale)
    return loss, {"clip_absence": loss}
  return absence_loss(
    emb["absence_image"],
    emb["absence_caption"],
    emb["absence_updated"],
    logit_scale,
    lambda_orig,
    lambda_text,
    margin,
  )


# objective -> (presence-batch term, absence-batch term); total = presence + lambda_stage2 *
# absence. "plain_clip" (plain fine-tuning) is the mean of the CLIP losses of both batches.
OBJECTIVES = {
  "omni_negclip": ("omni", "negationclip"),  # the paper
  "presence_no_l3": ("no_l3", "negationclip"),  # ablation: (L1 + L2) / 2
  # issue #29's diagnoses and treatments, not the paper's:
  "presence_l3_only": ("l3", "negationclip"),  # the 2-way choice caption vs negated alone
  # batch-contrastive terms only where no text negates
  "l3_plain_clip": ("l3", "plain_clip"),
  "paired_choices": ("paired_choices", "negationclip"),  # `paired_choices_loss`
  "paired_plain_clip": ("paired_choices", "plain_clip"),
  "conclip": ("conclip", "negationclip"),  # CoN-CLIP's distractor objective
  "plain_clip": (None, None),
}
DISTRACTOR_OBJECTIVES = tuple(  # the presence batch has distractor images
  k for k, (term, _) in OBJECTIVES.items() if term in ("conclip", "paired_choices")
)


def total_loss(
  emb,
  logit_scale,
  objective="omni_negclip",
  lambda_stage2=1.0,
  lambda_orig=1.0,
  lambda_text=1.0,
  margin=0.9,
):
  """The training objective (a key of `OBJECTIVES`) on one presence and one absence batch.

  emb: dict of normalized [B, D] embeddings with keys `presence_image`, `presence_caption`,
    `presence_negated` (and `presence_distractor` for `DISTRACTOR_OBJECTIVES`), `absence_image`,
    `absence_caption`, `absence_updated`.
  Presence terms: omni (L1 + L2 + L3) / 3; no_l3 (L1 + L2) / 2; l3 the 2-way choice alone;
  conclip `conclip_loss`; paired_choices `paired_choices_loss`. Absence terms: negationclip
  `absence_loss`; plain_clip the CLIP loss image <-> plain caption.
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"Unknown objective {objective!r}; choose from {tuple(OBJECTIVES)}")
  if objective == "plain_clip":
    lp, _ = clip_loss(emb["presence_image"], emb["presence_caption"], logit_scale)
    la, _ = clip_loss(emb["absence_image"], emb["absence_caption"], logit_scale)
    loss = (lp + la) / 2
    return loss, {"clip_presence": lp, "clip_absence": la, "total": loss}
  presence_term, absence_term = OBJECTIVES[objective]
  presence, metrics = _presence_term(presence_term, emb, logit_scale)
  absence, absence_metrics = _absence_term(
    absence_term, emb, logit_scale, lambda_orig, lambda_text, margin
  )
  loss = presence + lambda_stage2 * absence
  return loss, {**metrics, **absence_metrics, "total": loss}
