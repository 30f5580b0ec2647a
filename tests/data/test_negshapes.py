"""NegShapes: determinism, caption truth labels, rendering, the evaluation tasks, held-out
compositions and the shortcut audit."""

import re

import numpy as np
import pytest

from negclip_jax.data import negshapes as ns
from negclip_jax.eval.tasks import negshapes_task as T

N = 600  # examples per generated set; ~0.1 s each


@pytest.fixture(scope="module")
def pairs():
  return ns.generate_pairs(N, seed=0, distractors=True)


@pytest.fixture(scope="module")
def presence():
  return ns.presence_task(300, seed=0)


@pytest.fixture(scope="module")
def absence():
  return ns.absence_task(300, seed=0)


def _bag_of_words(text, scene):
  """Mentioned objects that are in the scene, ignoring negation."""
  present, absent = ns.parse_caption(text)
  return sum(o in scene for o in present + absent)


# -------------------------------------------------------------------------- determinism


def test_generate_pairs_deterministic(pairs):
  again = ns.generate_pairs(N, seed=0, distractors=True)
  assert set(again) == set(pairs)
  np.testing.assert_array_equal(again["images"], pairs["images"])
  for key in ("captions", "negated", "updated", "scenes", "negated_objects", "absent_objects"):
    assert again[key] == pairs[key], key
  np.testing.assert_array_equal(again["distractor_images"], pairs["distractor_images"])
  # A shorter set without distractors is a prefix of the same data.
  prefix = ns.generate_pairs(10, seed=0)
  assert "distractor_images" not in prefix
  np.testing.assert_array_equal(prefix["images"], pairs["images"][:10])
  for key in ("captions", "negated", "updated"):
    assert prefix[key] == pairs[key][:10], key


@pytest.mark.parametrize("kwargs", [dict(seed=1), dict(seed=0, split="eval")])
def test_generate_pairs_streams_differ(pairs, kwargs):
  other = ns.generate_pairs(20, **kwargs)
  assert other["captions"] != pairs["captions"][:20]
  assert all((a != b).any() for a, b in zip(other["images"], pairs["images"][:20]))


def test_tasks_deterministic(presence, absence):
  again = ns.presence_task(300, seed=0)
  np.testing.assert_array_equal(again["images"], presence["images"])
  assert again["negated"] == presence["negated"]
  again = ns.absence_task(300, seed=0)
  np.testing.assert_array_equal(again["images_neg"], absence["images_neg"])
  assert again["texts"] == absence["texts"]
  a, b = ns.retrieval_task(50, seed=3), ns.retrieval_task(50, seed=3)
  np.testing.assert_array_equal(a["images"], b["images"])
  assert a["captions"] == b["captions"]
  assert ns.retrieval_task(50, seed=4)["captions"] != a["captions"]


def test_bad_split():
  with pytest.raises(ValueError):
    ns.generate_pairs(1, seed=0, split="test")


# ----------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
  "text, expected",
  [
    ("a red circle", True),
    ("a photo of a red circle and a blue square", True),
    ("a blue square and a red circle and a green cross", False),
    ("an image of a red circle, a blue square and a green cross", False),
    ("a red circle but not a blue square", False),
    ("a red circle but not a green cross", True),
    ("a red circle, but no red square", True),
    ("a red circle, with no blue square", False),
    ("a blue square without a red circle", False),
    ("a blue square, without a blue circle", True),
    ("a picture of a red circle and a blue square and not a white triangle", True),
    ("not a red circle", False),
    ("no green circle", True),
    ("an image without a blue square", False),
    ("a photo with no purple cross", True),
  ],
)
def test_caption_is_true_handwritten(text, expected):
  assert ns.caption_is_true(text, (("red", "circle"), ("blue", "square"))) is expected


@pytest.mark.parametrize(
  "text",
  [
    "",
    "a red star",
    "a red circle.",
    "a red circle or a blue square",
    "A red circle",
    "a red circle a blue square",
    "a photo of no red circle",
    "an image of not a red circle",
    "a red circle and without a blue square",
  ],
)
def test_parse_caption_rejects(text):
  with pytest.raises(ValueError):
    ns.parse_caption(text)


def test_parse_caption():
  assert ns.parse_caption("a photo of a red circle and a white cross, but no green square") == (
    (("red", "circle"), ("white", "cross")),
    (("green", "square"),),
  )


def test_caption_labels(pairs):
  for i, scene in enumerate(pairs["scenes"]):
    caption, negated, updated = pairs["captions"][i], pairs["negated"][i], pairs["updated"][i]
    assert ns.caption_is_true(caption, scene), caption
    assert not ns.caption_is_true(negated, scene), negated
    assert ns.caption_is_true(updated, scene), updated
    assert sorted(ns.parse_caption(caption)[0]) == sorted(scene)
    asserted, denied = ns.parse_caption(negated)
    assert denied == (pairs["negated_objects"][i],)
    assert sorted(asserted + denied) == sorted(scene)
    assert ns.parse_caption(updated)[1] == (pairs["absent_objects"][i],)
    assert updated.startswith(caption)
    assert pairs["negated_objects"][i] in scene
    assert pairs["absent_objects"][i] not in scene
    for text in (caption, negated, updated):
      assert text == text.lower()


def test_templates_and_cues(pairs):
  texts = pairs["negated"] + pairs["updated"]
  for cue in ("not", "no", "without", "but not"):
    assert any(re.search(rf"\b{cue}\b", t) for t in texts), cue
  used = set(pairs["negated"] + pairs["updated"])
  for template in ns.NEGATION_CLAUSES:
    pattern = re.escape(template).replace(r"\{\}", r"\w+ \w+") + "$"
    assert any(re.search(pattern, t) for t in used), template
  for template in ns.NEGATION_ALONE:
    pattern = "^" + re.escape(template).replace(r"\{\}", r"\w+ \w+") + "$"
    assert any(re.match(pattern, t) for t in pairs["negated"]), template
  for prefix in ns.PREFIXES[1:]:
    assert any(t.startswith(prefix) for t in pairs["captions"]), prefix


def test_absent_object_kinds(pairs):
  kinds = set()
  for scene, (colour, shape) in zip(pairs["scenes"], pairs["absent_objects"]):
    kinds.add((shape in {s for _, s in scene}, colour in {c for c, _ in scene}))
  assert kinds >= {(True, False), (False, True), (False, False)}


# ------------------------------------------------------------------------------- scenes


def test_scenes(pairs):
  counts = np.bincount([len(s) for s in pairs["scenes"]], minlength=4)
  assert counts[0] == 0 and (counts[1:] > N // 5).all()
  for scene in pairs["scenes"]:
    assert 1 <= len(scene) <= ns.MAX_OBJECTS
    assert len({s for _, s in scene}) == len(scene)
    assert all(c in ns.COLOURS and s in ns.SHAPES for c, s in scene)


def test_images(pairs):
  images = pairs["images"]
  assert images.shape == (N, 64, 64, 3) and images.dtype == np.uint8
  for image, scene, centres in zip(images, pairs["scenes"], pairs["centres"]):
    assert centres.shape == (len(scene), 2)
    for (colour, _), (x, y) in zip(scene, centres):
      pixel = image[int(y), int(x)].astype(int)
      assert np.abs(pixel - ns.RGB[colour]).max() <= 15, (colour, pixel)
    assert np.median(image) < 100  # objects cover under half the dark background


def test_distractor_images_drop_exactly_the_negated_object(pairs):
  for i in range(100):
    scene, negated = pairs["scenes"][i], pairs["negated_objects"][i]
    rest = tuple(o for o in scene if o != negated)
    assert ns.caption_is_true(pairs["negated"][i], rest)
    assert not ns.caption_is_true(pairs["captions"][i], rest)
    image, distractor = pairs["images"][i].astype(int), pairs["distractor_images"][i].astype(int)
    changed = np.abs(image - distractor).max(-1) > 0
    for obj, (x, y) in zip(scene, pairs["centres"][i]):
      at_centre = distractor[int(y), int(x)]
      if obj == negated:  # background (dark gray) where the object was
        assert changed[int(y), int(x)] and at_centre.max() < 100, (i, obj, at_centre)
      else:  # the other objects are untouched
        np.testing.assert_array_equal(at_centre, image[int(y), int(x)])
    assert changed.sum() < 0.3 * changed.size  # one object, not a new canvas


def test_white_differs_from_background():
  scene = (("white", "square"),)
  for seed in range(20):
    image = ns.render(scene, np.random.default_rng(seed))
    assert (image.min(-1) >= 225).sum() >= 100  # >= 10x10 px of white
    assert np.median(image) < 100


def test_image_size():
  data = ns.generate_pairs(20, seed=0, image_size=32)
  assert data["images"].shape == (20, 32, 32, 3)
  for image, scene, centres in zip(data["images"], data["scenes"], data["centres"]):
    for (colour, _), (x, y) in zip(scene, centres):
      assert np.abs(image[int(y), int(x)].astype(int) - ns.RGB[colour]).max() <= 15


# -------------------------------------------------------------------------------- tasks


def test_presence_task(presence):
  assert presence["images"].shape == (300, 64, 64, 3)
  assert np.mean([len(s) >= 2 for s in presence["scenes"]]) > 0.8
  for i, scene in enumerate(presence["scenes"]):
    assert ns.caption_is_true(presence["captions"][i], scene)
    assert not ns.caption_is_true(presence["negated"][i], scene)
    mentioned = sum(ns.parse_caption(presence["negated"][i]), ())
    assert sorted(mentioned) == sorted(scene)


def test_absence_task(absence):
  for i, text in enumerate(absence["texts"]):
    pos, neg = absence["scenes_pos"][i], absence["scenes_neg"][i]
    absent = absence["absent_objects"][i]
    assert absent not in pos
    assert neg == pos + (absent,)
    assert len({s for _, s in neg}) == len(neg) <= ns.MAX_OBJECTS
    assert ns.caption_is_true(text, pos) and not ns.caption_is_true(text, neg)
    assert ns.parse_caption(text)[1] == (absent,)
    # The images differ only inside the added object's box.
    changed = np.argwhere((absence["images_pos"][i] != absence["images_neg"][i]).any(-1))
    assert len(changed) > 0
    assert (changed.max(0) - changed.min(0) < 27).all()
    painted = absence["images_neg"][i][tuple(changed.T)].astype(int)
    assert np.abs(painted - ns.RGB[absent[0]]).max() <= 15


def test_retrieval_task():
  data = ns.retrieval_task(200, seed=0)
  assert data["images"].shape == (200, 64, 64, 3)
  assert len({frozenset(s) for s in data["scenes"]}) == 200
  for caption, scene in zip(data["captions"], data["scenes"]):
    assert sorted(ns.parse_caption(caption)[0]) == sorted(scene)
  with pytest.raises(ValueError):
    ns.retrieval_task(1105, seed=0)  # 1104 distinct scenes


def test_bag_of_words_fails(presence, absence):
  """A text score blind to negation is at chance on presence and always wrong on absence."""
  ties = [
    _bag_of_words(c, s) == _bag_of_words(n, s)
    for c, n, s in zip(presence["captions"], presence["negated"], presence["scenes"])
  ]
  assert all(ties)  # both texts mention exactly the scene's objects
  wins = [
    _bag_of_words(t, p) > _bag_of_words(t, n)
    for t, p, n in zip(absence["texts"], absence["scenes_pos"], absence["scenes_neg"])
  ]
  assert not any(wins)


# ------------------------------------------------------------ held-out compositions


def _objects(texts, scenes=()):
  """Every object the texts mention or the scenes show."""
  return set(sum((sum(ns.parse_caption(t), ()) for t in texts), ())) | set(sum(scenes, ()))


def test_held_out_pairs():
  assert len(ns.HELD_OUT_PAIRS) == 27
  assert all(len({s for _, s in pair}) == 2 for pair in ns.HELD_OUT_PAIRS)
  assert ns.HELD_OUT_PAIRS == ns._held_out_pairs()  # fixed, independent of any seed
  assert ns.has_held_out_pair(tuple(next(iter(ns.HELD_OUT_PAIRS))))
  assert not ns.has_held_out_pair((("red", "circle"),))


def test_train_split_never_shows_a_held_out_pair():
  data = ns.generate_pairs(400, seed=2, image_size=16, hard_fraction=0.5)
  assert 150 < sum(data["hard"]) < 250
  for i, scene in enumerate(data["scenes"]):
    for key in ("captions", "negated", "updated", "presence_captions", "presence_negated"):
      text = data[key][i]  # each (image, text) pair: no held-out pair among its objects
      assert not ns.has_held_out_pair(tuple(_objects([text], [scene]))), (scene, text)
  # Without the constraint (the "eval" split) held-out pairs are common.
  other = ns.generate_pairs(400, seed=2, image_size=16, split="eval")
  assert sum(ns.has_held_out_pair(s) for s in other["scenes"]) > 40


def test_hard_negative_pairs(pairs):
  data = ns.generate_pairs(N, seed=0, distractors=True, hard_fraction=0.5)
  for key in pairs:  # hard negatives draw from their own stream
    if key in ("images", "distractor_images"):
      np.testing.assert_array_equal(data[key], pairs[key])
    elif key != "centres":
      assert data[key] == pairs[key], key
  for i, hard in enumerate(data["hard"]):
    scene = pairs["scenes"][i]
    true, false = data["presence_captions"][i], data["presence_negated"][i]
    assert ns.caption_is_true(true, scene) and not ns.caption_is_true(false, scene)
    if hard:
      assert ns.parse_caption(false)[1] == (pairs["negated_objects"][i],)
      assert len(true.split()) == len(false.split()) and ns.parse_caption(true)[1]
    else:
      assert (true, false) == (pairs["captions"][i], pairs["negated"][i])


def test_image_hard_pairs(pairs):
  data = ns.generate_pairs(N, seed=0, distractors=True, image_hard_fraction=0.5)
  flags = data["image_hard"]
  assert "hard" not in data and 0.4 * N < sum(flags) < 0.6 * N
  np.testing.assert_array_equal(data["images"], pairs["images"])  # own stream: rest unchanged
  for key in ("captions", "negated", "updated", "scenes", "negated_objects", "absent_objects"):
    assert data[key] == pairs[key], key
  for i, image_hard in enumerate(flags):
    scene, shown = data["scenes"][i], data["distractor_scenes"][i]
    true, false = data["presence_captions"][i], data["presence_negated"][i]
    image, distractor = data["images"][i].astype(int), data["distractor_images"][i].astype(int)
    if not image_hard:  # the ordinary example, untouched
      assert (true, false) == (pairs["captions"][i], pairs["negated"][i])
      assert shown == pairs["distractor_scenes"][i]
      np.testing.assert_array_equal(distractor, pairs["distractor_images"][i])
      continue
    y = data["negated_objects"][i]
    (x,) = set(shown) - set(scene)
    assert set(scene) - set(shown) == {y} and len(shown) == len(scene)  # equal object counts
    assert x[1] not in {s for _, s in scene} and not ns.has_held_out_pair(shown)
    # "A, no X" is true for A+Y and false for A+X; "A, no Y" the other way round.
    assert ns.caption_is_true(true, scene) and not ns.caption_is_true(false, scene)
    assert ns.caption_is_true(false, shown) and not ns.caption_is_true(true, shown)
    assert ns.parse_caption(true) == (ns.parse_caption(false)[0], (x,))
    assert ns.parse_caption(false)[1] == (y,) and len(true.split()) == len(false.split())
    # A negation-blind matcher prefers the false text for both images: wrong every time.
    assert _bag_of_words(false, scene) > _bag_of_words(true, scene)
    assert _bag_of_words(true, shown) > _bag_of_words(false, shown)
    # X is drawn in Y's box; every other pixel is the same image.
    k = scene.index(y)
    cx, cy = data["centres"][i][k]
    half = 0.5 * 26 + 1  # the largest box at S=64, plus a pixel
    changed = np.argwhere(np.abs(image - distractor).max(-1) > 0)
    assert len(changed) and (np.abs(changed[:, ::-1] + 0.5 - (cx, cy)) <= half).all()
    assert np.abs(distractor[int(cy), int(cx)] - ns.RGB[x[0]]).max() <= 15


def test_affirmed_image_hard_pairs():
  """Half the image-hard examples affirmed: ("A and Y", "A and X"), true for the image and
  the distractor respectively, equal word and object counts; nothing else changes."""
  negated = ns.generate_pairs(N, seed=0, distractors=True, image_hard_fraction=1.0)
  data = ns.generate_pairs(
    N, seed=0, distractors=True, image_hard_fraction=1.0, image_hard_affirmed_fraction=0.5
  )
  assert 0.3 * N < sum(data["affirmed"]) < 0.7 * N and "affirmed" not in negated
  np.testing.assert_array_equal(data["distractor_images"], negated["distractor_images"])
  assert data["distractor_scenes"] == negated["distractor_scenes"]
  for i, affirmed in enumerate(data["affirmed"]):
    true, false = data["presence_captions"][i], data["presence_negated"][i]
    if not affirmed:
      assert (true, false) == (negated["presence_captions"][i], negated["presence_negated"][i])
      continue
    scene, shown = data["scenes"][i], data["distractor_scenes"][i]
    (x,), y = set(shown) - set(scene), data["negated_objects"][i]
    assert set(ns.parse_caption(true)[0]) == set(scene) and not ns.parse_caption(true)[1]
    assert set(ns.parse_caption(false)[0]) == set(shown) and not ns.parse_caption(false)[1]
    assert ns.caption_is_true(true, scene) and not ns.caption_is_true(false, scene)
    assert ns.caption_is_true(false, shown) and not ns.caption_is_true(true, shown)
    assert true.replace(f"{y[0]} {y[1]}", f"{x[0]} {x[1]}") == false  # one object differs
  with pytest.raises(ValueError, match="needs image_hard_fraction"):
    ns.generate_pairs(8, seed=0, distractors=True, image_hard_affirmed_fraction=0.5)


def test_image_hard_needs_distractors_and_excludes_hard_fraction():
  with pytest.raises(ValueError, match="distractors=True"):
    ns.generate_pairs(8, seed=0, image_hard_fraction=0.5)
  with pytest.raises(ValueError, match="not both"):
    ns.generate_pairs(8, seed=0, distractors=True, hard_fraction=0.5, image_hard_fraction=0.5)


def test_image_hard_pairs_reach_the_presence_table():
  from negclip_jax.train import pipeline

  data = ns.generate_pairs(40, seed=0, image_size=16, distractors=True, image_hard_fraction=1.0)
  presence, absence = pipeline.negshapes_tables(data, distractors=True)
  assert list(presence.captions) == data["presence_captions"] != data["captions"]
  assert list(presence.negated) == data["presence_negated"]
  np.testing.assert_array_equal(presence.distractors, data["distractor_images"])
  assert list(absence.captions) == data["captions"]  # the absence stream is unchanged


@pytest.mark.parametrize(
  "task",
  [ns.presence_task, ns.absence_task, ns.presence_hard_task, ns.absence_hard_task, ns.mcq_task],
)
def test_compositions(task):
  for compositions in ("in_distribution", "held_out"):
    data = task(150, seed=0, image_size=16, compositions=compositions)
    again = task(20, seed=0, image_size=16, compositions=compositions)  # prefix property
    np.testing.assert_array_equal(
      again["images" if "images" in data else "images_pos"],
      (data["images"] if "images" in data else data["images_pos"])[:20],
    )
    for i in range(150):
      if "texts" in data:
        texts, true_scene, scenes = (
          [data["texts"][i]],
          data["scenes_pos"][i],
          [data["scenes_pos"][i], data["scenes_neg"][i]],
        )
      elif "options" in data:
        texts, true_scene = data["options"][i], data["scenes"][i]
        scenes = [true_scene]
      else:
        texts, true_scene = [data["captions"][i], data["negated"][i]], data["scenes"][i]
        scenes = [true_scene]
      if compositions == "held_out":
        assert ns.has_held_out_pair(true_scene)
      else:
        assert not ns.has_held_out_pair(tuple(_objects(texts, scenes)))
  with pytest.raises(ValueError):
    task(1, seed=0, compositions="novel")


# ------------------------------------------------------------------ shortcut-free tasks


def test_presence_hard_task():
  data = ns.presence_hard_task(300, seed=0, image_size=32)
  for i, scene in enumerate(data["scenes"]):
    true, false = data["captions"][i], data["negated"][i]
    assert ns.caption_is_true(true, scene) and not ns.caption_is_true(false, scene)
    assert ns.parse_caption(true)[1] == (data["absent_objects"][i],)
    assert ns.parse_caption(false)[1] == (data["negated_objects"][i],)
    assert ns.parse_caption(true)[0] == ns.parse_caption(false)[0]  # same listed objects
    assert len(true.split()) == len(false.split())
  assert ns.presence_hard_task(300, seed=0, image_size=32)["captions"] == data["captions"]


def test_absence_hard_task():
  data = ns.absence_hard_task(300, seed=0, image_size=32)
  for i, text in enumerate(data["texts"]):
    pos, neg = data["scenes_pos"][i], data["scenes_neg"][i]
    assert len(pos) == len(neg) and pos[:-1] == neg[:-1]
    assert ns.caption_is_true(text, pos) and not ns.caption_is_true(text, neg)
    assert neg[-1] == data["absent_objects"][i] != data["swapped_objects"][i] == pos[-1]
    changed = np.argwhere((data["images_pos"][i] != data["images_neg"][i]).any(-1))
    assert len(changed) == 0 or (changed.max(0) - changed.min(0) < 14).all()  # one box


def test_mcq_task():
  data = ns.mcq_task(600, seed=0, image_size=16)
  assert set(data["templates"]) == set(ns.MCQ_TEMPLATES)
  assert (np.bincount(data["labels"], minlength=4) > 100).all()
  for options, label, scene, template in zip(
    data["options"], data["labels"], data["scenes"], data["templates"]
  ):
    truth = [ns.caption_is_true(o, scene) for o in options]
    assert truth == [j == label for j in range(4)], (options, scene)
    assert len({len(o.split()) for o in options}) == 1
    assert len({T.negation_count(o) for o in options}) == 1
    assert (T.negation_count(options[0]) > 0) == (template != "affirmation")


# -------------------------------------------------------------------------- the audit


@pytest.fixture(scope="module")
def audited():
  data = T.generate(num=600, seed=0, image_size=16)
  return data, {name: T.audit(name, data[name], data["text_rule"]) for name in T.TASKS}


def test_choice_stats():
  scores = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [2.0, 2.0]])
  stats = T.choice_stats(scores, np.array([0, 0, 0, 1]))
  assert stats == {"acc": 0.25, "ties": 0.5, "guess": 0.5}  # ties wrong; guess: half each


def test_paper_style_tasks_fall_to_trivial_rules(audited):
  _, audit = audited
  for name in ("presence", "presence_heldout"):
    assert audit[name][f"{name}_rule_fewer_negations"] == 1.0
    assert audit[name][f"{name}_rule_text_only"] > 0.95
  for name in ("absence", "absence_heldout"):
    assert audit[name][f"{name}_rule_fewer_pixels"] == 1.0


def test_trivial_rules_at_chance_on_shortcut_free_tasks(audited):
  """With 600 items a rule's s.e. is about 0.02 (0.018 for 4-way): 0.06 is 3 s.e."""
  _, audit = audited
  for name in (
    "presence_hard",
    "presence_hard_heldout",
    "absence_hard",
    "absence_hard_heldout",
    "mcq",
    "mcq_heldout",
  ):
    chance = audit[name][f"{name}_chance"]
    rules = [
      r
      for r in ("fewer_negations", "text_only", "fewer_pixels")
      if f"{name}_rule_{r}" in audit[name]
    ]
    assert rules, name
    for rule in rules:
      assert abs(audit[name][f"{name}_rule_{rule}"] - chance) < 0.06, (name, rule)
    # Ignoring negation is worse than chance on the two-way hard tasks.
    if not name.startswith("mcq"):
      assert audit[name][f"{name}_rule_negation_blind"] == 0.0
      # ... and its mirror, preferring the option that names fewer shown objects, solves them
      assert audit[name][f"{name}_rule_negation_inverted"] == 1.0


def test_text_only_rule_fit_on_the_task_itself_is_at_chance(audited):
  """A bag of words trained on the hard tasks' own items (another seed) learns nothing."""
  data, _ = audited
  for name, generator in (("presence_hard", ns.presence_hard_task), ("mcq", ns.mcq_task)):
    train = generator(600, seed=1, image_size=16, compositions="in_distribution")
    options, labels = T.text_choices(train)
    rule = T.fit_text_rule(
      [t for row in options for t in row],
      [int(j == label) for row, label in zip(options, labels) for j in range(len(row))],
    )
    scores = T.rule_scores("text_only", data[name], rule)
    chance = 1 / scores.shape[1]
    assert abs(T.choice_stats(scores, T.text_choices(data[name])[1])["guess"] - chance) < 0.06


def test_hard_negatives_reach_the_presence_table():
  from negclip_jax.train import pipeline

  data = ns.generate_pairs(40, seed=0, image_size=16, hard_fraction=0.5)
  presence, absence = pipeline.negshapes_tables(data)
  assert list(presence.captions) == data["presence_captions"] != data["captions"]
  assert list(presence.negated) == data["presence_negated"]
  assert list(absence.captions) == data["captions"]  # the absence stream is unchanged
