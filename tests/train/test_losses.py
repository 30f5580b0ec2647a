"""Each objective against an independent plain-numpy implementation."""

import math

import numpy as np
import pytest

from negclip_jax.train import losses


def np_ce(logits, labels):
  logits = logits - logits.max(axis=1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -np.mean(logp[np.arange(len(labels)), labels])


def np_presence(img, cap, neg, s, use_l3=True):
  b = len(img)
  l1 = np_ce(s * img @ np.concatenate([cap, neg]).T, np.arange(b))
  l2 = np_ce(s * cap @ img.T, np.arange(b))
  pair = s * np.stack([(img * cap).sum(1), (img * neg).sum(1)], 1)
  l3 = np_ce(pair, np.zeros(b, int))
  return (l1 + l2 + l3) / 3 if use_l3 else (l1 + l2) / 2


def np_clip(img, txt, s):
  logits = s * img @ txt.T
  return (np_ce(logits, np.arange(len(img))) + np_ce(logits.T, np.arange(len(img)))) / 2


def np_absence(img, cap, upd, s, lo, lt, m):
  text = np.maximum(0, (cap * upd).sum(1) + m).mean()
  return np_clip(img, upd, s) + lo * np_clip(img, cap, s) + lt * text


def unit(rng, b, d):
  x = rng.standard_normal((b, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("b,d,scale", [(1, 4, 1.0), (5, 8, 14.3), (16, 32, 100.0), (33, 7, 3.7)])
def test_losses_match_numpy(b, d, scale):
  rng = np.random.default_rng(b * d)
  img, cap, neg, upd, dis = (unit(rng, b, d) for _ in range(5))
  got, m = losses.presence_loss(img, cap, neg, scale)
  np.testing.assert_allclose(got, np_presence(img, cap, neg, scale), rtol=1e-5, atol=1e-5)
  got, _ = losses.presence_loss(img, cap, neg, scale, use_l3=False)
  np.testing.assert_allclose(got, np_presence(img, cap, neg, scale, False), rtol=1e-5, atol=1e-5)
  got, am = losses.absence_loss(img, cap, upd, scale, 0.5, 2.0, 0.3)
  np.testing.assert_allclose(
    got, np_absence(img, cap, upd, scale, 0.5, 2.0, 0.3), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    am["L_text"], np.maximum(0, (cap * upd).sum(1) + 0.3).mean(), rtol=1e-5, atol=1e-6
  )
  got, _ = losses.clip_loss(img, cap, scale)
  np.testing.assert_allclose(got, np_clip(img, cap, scale), rtol=1e-5, atol=1e-5)
  # CoN-CLIP, written as its CustomLossWithNegatives: images [img; dis], texts [cap; neg].
  image_features, text_features = np.concatenate([img, dis]), np.concatenate([cap, neg])
  text_features_rev = np.concatenate([neg, cap])
  want = (
    np_ce(scale * image_features[:b] @ text_features.T, np.arange(b))
    + np_ce(scale * text_features[:b] @ image_features.T, np.arange(b))
    + np_ce(scale * image_features[b:] @ text_features_rev.T, np.arange(b))
  ) / 3
  got, _ = losses.conclip_loss(img, cap, neg, dis, scale)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_total_combines_presence_and_absence():
  rng = np.random.default_rng(0)
  e = {
    k: unit(rng, 6, 8)
    for k in (
      "presence_image",
      "presence_caption",
      "presence_negated",
      "absence_image",
      "absence_caption",
      "absence_updated",
    )
  }
  total, m = losses.total_loss(
    e, 10.0, lambda_stage2=0.7, lambda_orig=0.5, lambda_text=2.0, margin=0.1
  )
  want = np_presence(
    e["presence_image"], e["presence_caption"], e["presence_negated"], 10.0
  ) + 0.7 * np_absence(
    e["absence_image"], e["absence_caption"], e["absence_updated"], 10.0, 0.5, 2.0, 0.1
  )
  np.testing.assert_allclose(total, want, rtol=1e-5)
  assert set(m) >= {"L1", "L2", "L3", "L_neg", "L_orig", "L_text", "total"}
  plain, _ = losses.total_loss(e, 10.0, objective="plain_clip")
  np.testing.assert_allclose(
    plain,
    (
      np_clip(e["presence_image"], e["presence_caption"], 10.0)
      + np_clip(e["absence_image"], e["absence_caption"], 10.0)
    )
    / 2,
    rtol=1e-5,
  )
  l3_only, m = losses.total_loss(e, 10.0, objective="presence_l3_only", lambda_stage2=0.7)
  img, cap, neg = (e[f"presence_{k}"] for k in ("image", "caption", "negated"))
  pair = 10.0 * np.stack([(img * cap).sum(1), (img * neg).sum(1)], 1)
  want = np_ce(pair, np.zeros(6, int)) + 0.7 * np_absence(
    e["absence_image"], e["absence_caption"], e["absence_updated"], 10.0, 1.0, 1.0, 0.9
  )
  np.testing.assert_allclose(l3_only, want, rtol=1e-5)
  assert m["presence"] == m["L3"]
  l3_plain, m = losses.total_loss(e, 10.0, objective="l3_plain_clip", lambda_stage2=0.7)
  want = np_ce(pair, np.zeros(6, int)) + 0.7 * np_clip(
    e["absence_image"], e["absence_caption"], 10.0
  )
  np.testing.assert_allclose(l3_plain, want, rtol=1e-5)
  assert m["presence"] == m["L3"] and "L_neg" not in m
  e["presence_distractor"] = unit(rng, 6, 8)
  con, m = losses.total_loss(e, 10.0, objective="conclip", lambda_stage2=0.7)
  want = losses.conclip_loss(
    e["presence_image"],
    e["presence_caption"],
    e["presence_negated"],
    e["presence_distractor"],
    10.0,
  )[0] + 0.7 * np_absence(
    e["absence_image"], e["absence_caption"], e["absence_updated"], 10.0, 1.0, 1.0, 0.9
  )
  np.testing.assert_allclose(con, want, rtol=1e-5)
  paired, m = losses.total_loss(e, 10.0, objective="paired_choices", lambda_stage2=0.7)
  dis = e["presence_distractor"]
  two_way = lambda true, false: np_ce(
    10.0 * np.stack([(true[0] * true[1]).sum(1), (false[0] * false[1]).sum(1)], 1), np.zeros(6, int)
  )
  paired_choices = (
    two_way((img, cap), (img, neg))  # image_i: its caption over its negated text
    + two_way((dis, neg), (dis, cap))  # distractor_i: the negated text over the caption
    + two_way((img, cap), (dis, cap))  # caption_i: image_i over distractor_i
    + two_way((dis, neg), (img, neg))  # negated_i: distractor_i over image_i
  ) / 4
  want = paired_choices + 0.7 * np_absence(
    e["absence_image"], e["absence_caption"], e["absence_updated"], 10.0, 1.0, 1.0, 0.9
  )
  np.testing.assert_allclose(paired, want, rtol=1e-5)
  assert set(m) >= {"L3", "distractor_texts", "caption_images", "negated_images", "absence"}
  paired_plain, m = losses.total_loss(e, 10.0, objective="paired_plain_clip", lambda_stage2=0.7)
  want = paired_choices + 0.7 * np_clip(e["absence_image"], e["absence_caption"], 10.0)
  np.testing.assert_allclose(paired_plain, want, rtol=1e-5)
  assert "clip_absence" in m and "L_neg" not in m
  with pytest.raises(ValueError, match="Unknown objective 'bogus'"):
    losses.total_loss(e, 10.0, objective="bogus")


def test_paired_choices_is_blind_to_other_examples():
  """No term compares across examples: each example's loss depends on its own rows only."""
  rng = np.random.default_rng(1)
  rows = [unit(rng, 5, 8) for _ in range(4)]
  full, _ = losses.paired_choices_loss(*rows, 7.0)
  each = [losses.paired_choices_loss(*(r[i : i + 1] for r in rows), 7.0)[0] for i in range(5)]
  np.testing.assert_allclose(full, np.mean(each), rtol=1e-5)
  # A perfect square (cos 1 for the true pairs, -1 for the false) costs log(1 + e^(-2s)).
  v = np.eye(8, dtype=np.float32)
  perfect, _ = losses.paired_choices_loss(v[:1], v[:1], -v[:1], -v[:1], 1.5)
  np.testing.assert_allclose(perfect, np.log1p(np.exp(-3.0)), rtol=1e-5)


def test_hand_checked_values():
  eye = np.eye(4, dtype=np.float32)
  # Perfectly aligned, orthogonal embeddings: CE = log(1 + (C - 1) e^{-s}).
  s = 2.0
  got, _ = losses.clip_loss(eye, eye, s)
  np.testing.assert_allclose(got, math.log(1 + 3 * math.exp(-s)), rtol=1e-6)
  # Negated caption identical to the caption: L3 is exactly log 2.
  _, m = losses.presence_loss(eye, eye, eye, s)
  np.testing.assert_allclose(m["L3"], math.log(2), rtol=1e-6)
  # Orthogonal original/updated captions: L_text = margin.
  _, m = losses.absence_loss(eye, eye, np.roll(eye, 1, axis=0), s, margin=0.9)
  np.testing.assert_allclose(m["L_text"], 0.9, rtol=1e-6)
