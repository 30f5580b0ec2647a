"""Linear probes and the NegShapes diagnosis tasks, on features with known answers."""

import jax
import numpy as np
import pytest

from negclip_jax.data import negshapes
from negclip_jax.eval import probe
from negclip_jax.eval.tasks import negshapes_probe_task as P


def test_fit_logistic_matches_a_plain_gradient_descent():
  """Newton's answer is the minimiser: the objective's gradient vanishes there."""
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(size=(200, 3)), np.ones((200, 1))], 1)
  y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(float)
  c = rng.uniform(0.5, 2.0, 200)
  w = probe.fit_logistic(x, y, c, l2=1e-2)
  p = 1 / (1 + np.exp(-x @ w))
  grad = x.T @ (c * (p - y)) / len(y) + 1e-2 * w
  assert np.abs(grad).max() < 1e-10
  assert w[0] > 1  # the informative feature carries the weight


def test_balanced_accuracy():
  labels = np.array([1, 0, 0, 0, 0, 0, 0, 0], bool)
  assert probe.balanced_accuracy(np.zeros(8, bool), labels) == 0.5  # "always absent": chance
  assert probe.balanced_accuracy(labels, labels) == 1.0
  assert probe.balanced_accuracy(~labels, labels) == 0.0


def test_probe_reads_a_perfectly_encoded_property_and_not_shuffled_labels():
  rng = np.random.default_rng(1)
  y = rng.random(600) < 0.1  # rare, as one object among 24
  x = rng.normal(size=(600, 16))
  x[:, 3] += 12.0 * y  # feature 3 encodes the property (classes 6 sd apart)
  assert probe.linear_probe(x[:400], y[:400], x[400:], y[400:]) == 1.0
  shuffled = rng.permutation(y)
  acc = probe.linear_probe(x[:400], shuffled[:400], x[400:], y[400:])
  assert abs(acc - 0.5) < 0.12


def test_probe_needs_both_classes():
  with pytest.raises(ValueError, match="both classes"):
    probe.linear_probe(np.ones((4, 2)), np.zeros(4, bool), np.ones((2, 2)), np.ones(2, bool))


def test_probe_objects_on_oracle_and_blind_features():
  """Features that are the scene's object indicators probe at 1.0 for every object;
  features independent of the scene at chance."""
  train = negshapes.generate_pairs(600, 0, image_size=16, split="train")["scenes"]
  test = negshapes.generate_pairs(300, 0, image_size=16, split="eval")["scenes"]
  oracle = lambda scenes: P._object_labels(scenes).astype(float)
  out = P.probe_objects(oracle(train), train, oracle(test), test, "image_probe")
  assert len(out) == len(P.OBJECTS) + 2
  assert out["image_probe_min"] == out["image_probe_red_circle"] == 1.0
  rng = np.random.default_rng(0)
  blind = P.probe_objects(
    rng.normal(size=(600, 8)), train, rng.normal(size=(300, 8)), test, "image_probe"
  )
  assert abs(blind["image_probe_mean"] - 0.5) < 0.05


def test_fit_pairs_are_the_runs_training_pairs():
  """With the run's seed and hard fraction, the fit task's hard pairs are a prefix of the
  training data's presence table (item i does not depend on num)."""
  small = negshapes.generate_pairs(16, 3, image_size=16, hard_fraction=0.5)
  full = negshapes.generate_pairs(64, 3, image_size=16, hard_fraction=0.5)
  for key in ("presence_captions", "presence_negated", "hard"):
    assert small[key] == full[key][:16]
  assert any(small["hard"]) and not all(small["hard"])


def test_fit_reports_the_negation_count_rule_on_its_items():
  """The word count solves the paper-style pairs and guesses on the hard ones (both negated)."""
  from negclip_jax.eval import registry
  from negclip_jax.model import clip as model_lib
  from negclip_jax.model.tokenizer import ClipTokenizer

  model = model_lib.CLIP(model_lib.get_config("tiny"))
  params = model_lib.init_params(model, jax.random.key(0))
  out = registry.run_task(
    "negshapes-fit", model, params, ClipTokenizer(), progress=False, num=32, seed=0
  )
  assert out["presence_train_rule_fewer_negations"] == 1.0
  assert out["presence_hard_train_rule_fewer_negations"] == 0.5
  assert out["n"] == out["presence_hard_train_n"] == 32


def test_mention_counts_reads_present_and_denied_objects():
  counts = P.mention_counts(["a photo of a red circle but not a blue square", "no red circle"])
  k = len(P.OBJECTS)
  red, blue = P.OBJECTS.index(("red", "circle")), P.OBJECTS.index(("blue", "square"))
  assert counts[0, red] == counts[0, k + blue] == 1 and counts[0].sum() == 2
  assert counts[1, k + red] == 1 and counts[1].sum() == 1
  with pytest.raises(ValueError, match="not a NegShapes caption"):
    P.mention_counts(["a dog"])


def _features_by_scene(seed: int, num: int, eval_num: int, size: int, blind: bool):
  """image_features for `text_oracle`: every image it embeds (found by its bytes in the
  same generators' outputs) -> its scene's normalised object indicators, or, `blind`, a
  random unit vector that does not depend on the scene."""
  from negclip_jax.eval.tasks import negshapes_task

  scenes = {}
  train = negshapes.generate_pairs(num, seed, size, split="train", hard_fraction=1.0)
  image_hard = negshapes.generate_pairs(
    num, seed, size, split="train", distractors=True, image_hard_fraction=1.0
  )
  pairs = [
    (train["images"], train["scenes"]),
    (image_hard["distractor_images"], image_hard["distractor_scenes"]),
  ]
  for name, task in negshapes_task.generate(eval_num, seed, size).items():
    if name in negshapes_task.TASKS:
      keys = ("images_pos", "images_neg") if "texts" in task else ("images",)
      pairs += [(task[k], task[k.replace("images", "scenes")]) for k in keys]
  for images, scene_list in pairs:
    scenes.update({image.tobytes(): scene for image, scene in zip(images, scene_list)})
  rng = np.random.default_rng(0)
  cache = {}

  def features(images):
    rows = []
    for image in images:
      scene = scenes[image.tobytes()]
      if blind:
        row = cache.setdefault(image.tobytes(), rng.normal(size=len(P.OBJECTS)))
      else:
        row = P._object_labels([scene])[0].astype(float)
      rows.append(row / np.linalg.norm(row))
    return np.array(rows)

  return features


def test_the_oracles_hard_and_image_hard_draws_share_their_images():
  """`text_oracle` embeds the training images once for both kinds of comparison."""
  hard = negshapes.generate_pairs(64, 5, 16, split="train", hard_fraction=1.0)
  image_hard = negshapes.generate_pairs(
    64, 5, 16, split="train", distractors=True, image_hard_fraction=1.0
  )
  np.testing.assert_array_equal(hard["images"], image_hard["images"])
  assert hard["scenes"] == image_hard["scenes"]


def test_text_oracle_on_perfect_and_blind_image_features():
  """Image features that are the scene's object indicators admit an additive text side
  ("no X" = -X) that solves every shortcut-free task, held-out compositions included;
  features that do not depend on the scene leave it at chance."""
  args = dict(num=300, eval_num=120, seed=2, image_size=16)
  perfect = P.text_oracle(_features_by_scene(2, 300, 120, 16, blind=False), **args)
  for name in ("presence_hard", "absence_hard", "presence", "absence"):
    for split in ("", "_heldout"):
      assert perfect[f"oracle_{name}{split}_acc"] >= 0.98, (name, split, perfect)
      assert perfect[f"oracle_{name}{split}_n"] == 120
  assert perfect["oracle_mcq_heldout_negation_acc"] > 0.9
  assert perfect["oracle_mcq_heldout_chance"] == 0.25
  blind = P.text_oracle(_features_by_scene(2, 300, 120, 16, blind=True), **args)
  for name in ("presence_hard_heldout", "absence_hard_heldout"):
    acc, se = blind[f"oracle_{name}_acc"], blind[f"oracle_{name}_se"]
    assert abs(acc - 0.5) < 4 * max(se, 0.045), (name, acc, se)
