"""NegShapes: a deterministic, seeded, offline, procedurally generated negation dataset.

Scenes
  An object is a ``(colour, shape)`` pair from `COLOURS` x `SHAPES`; a `Scene` is a tuple
  of 1-3 objects with pairwise distinct shapes. Images are uint8 RGB [S, S, 3]: a dark gray
  background (level 25-75, random per image, plus per-pixel, per-channel noise uniform in
  0-15) and flat-colour objects (`RGB`, each channel offset per object by up to +-15) whose
  bounding boxes are 14-26 px wide at S=64 (scaled with S), lie inside the image and share
  at most 2 px (at S=64) with each other along each axis, so each object's centre pixel
  shows its colour. Shapes: a disc, an axis-aligned square, an apex-up triangle, a plus.

Caption grammar (lowercase; an object mention is "a red circle" or, negated, "no red circle")
  plain     PREFIX LIST                    "a photo of a red circle and a blue square"
  negation  PREFIX LIST CLAUSE(x)          "a red circle, a blue square but not a green cross"
            ALONE(x)                       "no red circle", "an image without a red circle"
  PREFIX is one of `PREFIXES`; LIST is "A", "A and B" or "A, B and C" (objects asserted
  present); CLAUSE(x) / ALONE(x) is one of `NEGATION_CLAUSES` / `NEGATION_ALONE`, which
  assert that object x is absent, using the cues "not", "no", "without" and "but not".
  A caption is true for a scene iff every asserted-present object is in the scene and no
  asserted-absent object is (`caption_is_true`; `parse_caption` rejects other text).

Per example (`generate_pairs`)
  caption  plain caption listing every object of the scene, in random order: true.
  negated  negation caption over the scene's objects whose absence clause names one
           present object (``negated_object``): false (CC-Neg style).
  distractor image  (on request) the same drawing without ``negated_object``: ``negated``
           is true for it, ``caption`` false (CoN-CLIP's distractor image).
  image-hard (on request, a fraction of the examples) the absence_hard pair as training
           data: the image shows A+Y (Y = ``negated_object``), the pair of texts is
           "A, no X" (true) / "A, no Y" (false), and the distractor image draws X in Y's
           box on the same layout (A+X: "A, no Y" true, "A, no X" false). Image and
           distractor hold equal object counts, texts equal word counts and one negation
           each: only which object is named and shown separates them.
  updated  ``caption`` + an absence clause naming an object not in the scene
           (``absent_object``), chosen to share its shape, its colour, or nothing with the
           present objects: true (NegationCLIP style).

Held-out compositions
  `HELD_OUT_PAIRS`, a fixed eighth of the 216 object pairs with distinct shapes, never
  occur together in the "train" split: no training image or text holds both objects of
  a held-out pair (`has_held_out_pair`). Every evaluation task takes ``compositions``:
  "any" (no constraint), "in_distribution" (no held-out pair among all objects the item
  draws or mentions) or "held_out" (the image whose text is true shows a held-out pair,
  so that scene never occurs in training; it needs >= 2 objects).

Shortcut-free tasks (each item: exactly one true option; chance 1/2 or 1/4)
  presence_hard  one image of S; "P, not C" (true, C absent) vs "P, not B" (false, B in
                 S), P = S without B, same prefix, order and template: both texts negated,
                 equal length in words; B and C are exchangeable given P.
  absence_hard   "A, no X" vs the images A+Y (true) and A+X (false), drawn on one layout:
                 equal object counts, X and Y exchangeable.
  mcq            NegBench-style, 4 options of one template over a random 4-cycle of
                 objects o0..o3 with all four shapes: affirmation "a oj and a oj+1"
                 (image {o0, o1}), negation "no oj" (image without o0), hybrid "a oj
                 but not a oj+1" (image: o0 and 0-2 of its cycle predecessors). The option
                 set is rotation-symmetric, so no text-only rule beats chance.

Randomness: every dataset draws from its own stream, ``SeedSequence([seed, stream])``, with
one stream per `generate_pairs` split and per evaluation task; equal arguments give equal
arrays and strings, and example i does not depend on ``num`` in `generate_pairs`,
`presence_task` and `absence_task`.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import re
from typing import Iterator, Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
RGB = {
  "red": (220, 40, 40),
  "green": (40, 200, 70),
  "blue": (50, 90, 240),
  "yellow": (235, 220, 50),
  "purple": (165, 60, 215),
  "white": (240, 240, 240),
}
MAX_OBJECTS = 3
PREFIXES = ("", "a photo of ", "an image of ", "a picture of ")
NEGATION_CLAUSES = (
  " but not a {}",
  ", not a {}",
  " and no {}",
  ", but no {}",
  " without a {}",
  ", without a {}",
  ", with no {}",
  " and not a {}",
)
NEGATION_ALONE = ("not a {}", "no {}", "an image without a {}", "a photo with no {}")

Object = tuple[str, str]  # (colour, shape)
Scene = tuple[Object, ...]

_OBJECTS = tuple((c, s) for c in COLOURS for s in SHAPES)
_STREAMS = {
  "train": 0,
  "eval": 1,
  "presence": 2,
  "absence": 3,
  "retrieval": 4,
  "presence_hard": 5,
  "absence_hard": 6,
  "mcq": 7,
  "train_hard": 8,
  "train_image_hard": 9,
  "train_image_hard_affirmed": 10,
}
COMPOSITIONS = ("any", "in_distribution", "held_out")
MCQ_TEMPLATES = ("affirmation", "negation", "hybrid")
_HELD_OUT_SEED = 20261129  # fixed: the held-out pairs do not depend on any run's seed
_REF_SIZE = 64  # image size at which the pixel constants below hold
_MIN_SIZE, _MAX_SIZE = 14.0, 26.0  # object bounding-box side, px
_MAX_OVERLAP = 2.0  # px two bounding boxes may share along each axis
_LAYOUT_CANDIDATES = 8
_COLOUR_JITTER = 15  # max |offset| per channel, levels
_BACKGROUND_LEVEL = (25.0, 75.0)  # gray level, before noise
_BACKGROUND_NOISE = 15  # bit mask: per-pixel, per-channel noise uniform in 0..15 levels

_OBJECT_PHRASE = re.compile(rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_PAIRS = {n: np.triu_indices(n, 1) for n in range(1, MAX_OBJECTS + 1)}  # box index pairs


def _joins(templates: Sequence[str]) -> frozenset[str]:
  """Text a template puts before the colour of its object."""
  return frozenset(t[: t.index("{}")] for t in templates)


# Text allowed before an object's colour, by (first object?, asserted present?).
_JOINS = {
  (True, True): frozenset(p + "a " for p in PREFIXES),
  (False, True): frozenset((", a ", " and a ")),
  (True, False): _joins(NEGATION_ALONE),
  (False, False): _joins(NEGATION_CLAUSES),
}


def _held_out_pairs() -> frozenset[frozenset]:
  """A fixed eighth of the object pairs with distinct shapes (27 of 216)."""
  pairs = [frozenset(p) for p in itertools.combinations(_OBJECTS, 2) if p[0][1] != p[1][1]]
  rng = np.random.default_rng(_HELD_OUT_SEED)
  return frozenset(pairs[i] for i in rng.choice(len(pairs), len(pairs) // 8, replace=False))


HELD_OUT_PAIRS = _held_out_pairs()


def has_held_out_pair(objects: Sequence[Object]) -> bool:
  """Whether two of `objects` form a pair in `HELD_OUT_PAIRS`."""
  return any(frozenset(p) in HELD_OUT_PAIRS for p in itertools.combinations(set(objects), 2))


def _composition_ok(
  compositions: str, true_scene: Sequence[Object], all_objects: Sequence[Object]
) -> bool:
  """Whether an item belongs to `compositions` (see the module docstring)."""
  if compositions == "any":
    return True
  if compositions == "in_distribution":
    return not has_held_out_pair(all_objects)
  if compositions == "held_out":
    return has_held_out_pair(true_scene)
  raise ValueError(f"compositions must be one of {COMPOSITIONS}, got {compositions!r}")


def _stream(seed: int, task: str, compositions: str) -> np.random.Generator:
  """The task's stream; "any" keeps the original stream of each task."""
  if compositions not in COMPOSITIONS:
    raise ValueError(f"compositions must be one of {COMPOSITIONS}, got {compositions!r}")
  if compositions == "any":
    return _rng(seed, task)
  index = COMPOSITIONS.index(compositions)
  return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[task], index]))


# ----------------------------------------------------------------------------- captions


def parse_caption(text: str) -> tuple[tuple[Object, ...], tuple[Object, ...]]:
  """(objects asserted present, objects asserted absent) of a caption in our grammar.

  Raises ValueError for text the grammar does not produce (see the module docstring).
  """
  present, absent = [], []
  end = 0
  for match in _OBJECT_PHRASE.finditer(text):
    join = text[end : match.start()]
    if join in _JOINS[end == 0, True]:
      present.append(match.groups())
    elif join in _JOINS[end == 0, False]:
      absent.append(match.groups())
    else:
      raise ValueError(f"not a NegShapes caption: {text!r} (unexpected {join!r})")
    end = match.end()
  if end == 0 or end != len(text):
    raise ValueError(f"not a NegShapes caption: {text!r}")
  return tuple(present), tuple(absent)


def caption_is_true(text: str, scene: Scene) -> bool:
  """Whether the scene holds every object the caption asserts present and none it denies."""
  present, absent = parse_caption(text)
  return all(o in scene for o in present) and not any(o in scene for o in absent)


def _pick(options: Sequence, rng: np.random.Generator):
  return options[rng.integers(len(options))]


def _object_list(objects: Sequence[Object]) -> str:
  """ "a red circle", "a red circle and a blue square", "a, b and c"."""
  items = [f"a {c} {s}" for c, s in objects]
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _plain_caption(objects: Sequence[Object], rng: np.random.Generator) -> str:
  """PREFIX LIST over `objects` in random order."""
  order = rng.permutation(len(objects))
  return _pick(PREFIXES, rng) + _object_list([objects[i] for i in order])


def _absence_clause(obj: Object, rng: np.random.Generator) -> str:
  return _pick(NEGATION_CLAUSES, rng).format(f"{obj[0]} {obj[1]}")


def _negation_caption(
  positives: Sequence[Object], negated: Object, rng: np.random.Generator
) -> str:
  """Caption asserting `positives` present and `negated` absent."""
  if not positives:
    return _pick(NEGATION_ALONE, rng).format(f"{negated[0]} {negated[1]}")
  return _plain_caption(positives, rng) + _absence_clause(negated, rng)


def _negation_pair(
  positives: Sequence[Object], first: Object, second: Object, rng: np.random.Generator
) -> tuple[str, str]:
  """Two captions asserting `positives` present, one denying `first`, one `second`, with
  the same prefix, object order and negation template (they differ in one object)."""
  if not positives:
    template = _pick(NEGATION_ALONE, rng)
  else:
    head = _plain_caption(positives, rng)
    template = head + _pick(NEGATION_CLAUSES, rng)
  return tuple(template.format(f"{c} {s}") for c, s in (first, second))


def _affirmation_pair(
  positives: Sequence[Object], first: Object, second: Object, rng: np.random.Generator
) -> tuple[str, str]:
  """Two plain captions listing `positives` and `first` / `second`, with the same prefix
  and object order (they differ in one object)."""
  prefix = _pick(PREFIXES, rng)
  order = rng.permutation(len(positives) + 1)
  listed = lambda obj: prefix + _object_list([[*positives, obj][i] for i in order])
  return listed(first), listed(second)


# ------------------------------------------------------------------------------- scenes


def _sample_scene(num_objects: int, rng: np.random.Generator) -> Scene:
  """Distinct shapes, independent uniform colours."""
  shapes = rng.permutation(len(SHAPES))[:num_objects]
  colours = rng.integers(len(COLOURS), size=num_objects)
  return tuple((COLOURS[c], SHAPES[s]) for c, s in zip(colours, shapes))


def _sample_absent(
  scene: Scene, rng: np.random.Generator, new_shape: bool, seen_only: bool = False
) -> Object:
  """An object not in `scene`: its group (shares a shape / shares only a colour / shares
  nothing with the scene) uniform over the non-empty groups, then uniform in the group.
  With `new_shape`, only objects whose shape is not in the scene; with `seen_only`, only
  objects that form no held-out pair with the scene."""
  shapes = {s for _, s in scene}
  colours = {c for c, _ in scene}
  groups = ([], [], [])
  for obj in _OBJECTS:
    if obj in scene or (new_shape and obj[1] in shapes):
      continue
    if seen_only and has_held_out_pair(scene + (obj,)):
      continue
    groups[0 if obj[1] in shapes else 1 if obj[0] in colours else 2].append(obj)
  return _pick(_pick([g for g in groups if g], rng), rng)


def _sample_new_shape(scene: Scene, rng: np.random.Generator, seen_only: bool = False) -> Object:
  """An object whose shape is not in `scene`, uniform (with `seen_only`: forming no
  held-out pair with the scene)."""
  shapes = {s for _, s in scene}
  options = [
    o
    for o in _OBJECTS
    if o[1] not in shapes and not (seen_only and has_held_out_pair(scene + (o,)))
  ]
  return _pick(options, rng)


# ------------------------------------------------------------------------------ drawing


@dataclasses.dataclass(frozen=True)
class _Drawing:
  """A sampled canvas for up to n objects; `_draw` paints the first len(scene) of them."""

  background: np.ndarray  # uint8 [S, S, 3]
  centres: np.ndarray  # float64 [n, 2], (x, y) px
  sizes: np.ndarray  # float64 [n], bounding-box side, px
  jitter: np.ndarray  # int64 [n, 3], colour offset, levels


def _sample_drawing(num_objects: int, rng: np.random.Generator, image_size: int) -> _Drawing:
  """Background plus a layout of `num_objects` boxes, rejection-sampled for small overlap."""
  s = float(image_size)
  scale = s / _REF_SIZE
  noise = np.frombuffer(rng.bytes(image_size * image_size * 3), np.uint8)
  level = np.uint8(rng.uniform(*_BACKGROUND_LEVEL))
  background = ((noise & _BACKGROUND_NOISE) + level).reshape(image_size, image_size, 3)
  first, second = _PAIRS[num_objects]
  while True:
    sizes = rng.uniform(_MIN_SIZE, _MAX_SIZE, (_LAYOUT_CANDIDATES, num_objects)) * scale
    half = sizes[..., None] / 2
    centres = half + rng.random((_LAYOUT_CANDIDATES, num_objects, 2)) * (s - 2 * half)
    gap = np.abs(centres[:, first] - centres[:, second]).max(-1)  # Chebyshev, [C, pairs]
    need = half[:, first, 0] + half[:, second, 0] - _MAX_OVERLAP * scale
    valid = (gap >= need).all(1)
    if valid.any():
      i = int(valid.argmax())
      jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, (num_objects, 3))
      return _Drawing(background, centres[i], sizes[i], jitter)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, half: float) -> np.ndarray:
  """Pixels of `shape` at offsets (u, v) px from the box centre (v grows downwards)."""
  au, av = np.abs(u), np.abs(v)
  if shape == "circle":
    return u * u + v * v <= half * half
  if shape == "square":
    return np.maximum(au, av) <= 0.85 * half
  if shape == "triangle":  # apex up, base 2*half wide
    return (av <= half) & (au <= (v + half) / 2)
  arm = 0.3 * half  # cross: a plus sign
  return ((au <= half) & (av <= arm)) | ((au <= arm) & (av <= half))


def _without(drawing: _Drawing, index: int) -> _Drawing:
  """`drawing` with box `index` removed: the other objects keep their places and colours."""
  keep = np.arange(len(drawing.sizes)) != index
  return dataclasses.replace(
    drawing, centres=drawing.centres[keep], sizes=drawing.sizes[keep], jitter=drawing.jitter[keep]
  )


def _draw(scene: Scene, drawing: _Drawing) -> np.ndarray:
  """uint8 [S, S, 3]: `scene[i]` painted in box i of `drawing`, in order."""
  canvas = drawing.background.copy()
  size = canvas.shape[0]
  pixel_centres = np.arange(size) + 0.5
  for (colour, shape), (cx, cy), side, jitter in zip(
    scene, drawing.centres, drawing.sizes, drawing.jitter
  ):
    half = side / 2
    x0, y0 = max(int(cx - half), 0), max(int(cy - half), 0)
    x1, y1 = min(int(cx + half) + 1, size), min(int(cy + half) + 1, size)
    u = pixel_centres[None, x0:x1] - cx
    v = pixel_centres[y0:y1, None] - cy
    canvas[y0:y1, x0:x1][_shape_mask(shape, u, v, half)] = RGB[colour] + jitter
  return canvas


def render(scene: Scene, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
  """uint8 [S, S, 3] image of `scene` with a random background and layout."""
  return _draw(scene, _sample_drawing(len(scene), rng, image_size))


# ------------------------------------------------------------------------------ datasets


def _rng(seed: int, stream: str) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[stream]]))


def _num_objects(rng: np.random.Generator, probs: Sequence[float]) -> int:
  """1 + an index drawn with probabilities `probs`."""
  return 1 + bisect.bisect(list(itertools.accumulate(probs[:-1])), rng.random())


def _examples(
  num: int,
  rng: np.random.Generator,
  image_size: int,
  probs: Sequence[float],
  accept=lambda scene: True,
  keep_count: bool = False,
) -> Iterator[tuple[Scene, _Drawing]]:
  """`num` (scene, drawing); scenes are redrawn until `accept(scene)`, with
  `keep_count` keeping the object count drawn first (its distribution stays `probs`)."""
  for _ in range(num):
    count = _num_objects(rng, probs)
    scene = _sample_scene(count, rng)
    while not accept(scene):
      scene = _sample_scene(count if keep_count else _num_objects(rng, probs), rng)
    yield scene, _sample_drawing(len(scene), rng, image_size)


def generate_pairs(
  num: int,
  seed: int,
  image_size: int = 64,
  split: str = "train",
  distractors: bool = False,
  hard_fraction: float = 0.0,
  image_hard_fraction: float = 0.0,
  image_hard_affirmed_fraction: float = 0.0,
) -> dict:
  """Training data for the plain, negated and updated objectives (seed >= 0).

  Returns images uint8 [N, S, S, 3]; captions, negated, updated: list[str] of N (true,
  false, true for image i); with `distractors`, distractor_images uint8 [N, S, S, 3]:
  image i without negated_objects[i] (negated i true, caption i false; drawing them
  leaves every other output unchanged); scenes: list[Scene];
  negated_objects, absent_objects: list[Object]; centres: list of float [n_i, 2] (x, y)
  px of scene i's objects.
  With `hard_fraction` > 0 also presence_captions / presence_negated: list[str] of N,
  the (true, false) presence pair of image i: (captions[i], negated[i]), or with
  probability `hard_fraction` (own stream; other outputs unchanged) the shortcut-free
  pair ("P, not C", "P, not B") of `presence_hard_task`, B = negated_objects[i]; and
  hard: list[bool].
  With `image_hard_fraction` > 0 (needs `distractors`; not with `hard_fraction`), the
  same outputs, with probability `image_hard_fraction` (own stream) an image-hard
  example (module docstring): presence pair ("A, no X", "A, no Y"), distractor image
  A+X; and image_hard: list[bool]. With `image_hard_affirmed_fraction` > 0, that fraction
  of the image-hard examples (own stream) is affirmed: the pair ("A and Y", "A and X")
  instead, equal word and object counts, true for the image and the distractor
  respectively as the negated pair is; and affirmed: list[bool]. With `distractors`,
  distractor_scenes: list[Scene], what each distractor image shows.
  `split` is "train" or "eval" (independent streams). Scenes have 1-3 objects, uniformly.
  "train" never shows or mentions both objects of a held-out pair (`HELD_OUT_PAIRS`):
  such scenes are redrawn with the same object count.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if image_hard_fraction > 0 and not distractors:
    raise ValueError("image_hard_fraction > 0 needs distractors=True (the A+X images)")
  if image_hard_fraction > 0 and hard_fraction > 0:
    raise ValueError("use hard_fraction or image_hard_fraction, not both")
  if image_hard_affirmed_fraction > 0 and not image_hard_fraction > 0:
    raise ValueError("image_hard_affirmed_fraction > 0 needs image_hard_fraction > 0")
  rng = _rng(seed, split)
  hard_rng = _rng(seed, "train_hard")
  image_rng = _rng(seed, "train_image_hard")
  affirmed_rng = _rng(seed, "train_image_hard_affirmed")
  seen_only = split == "train"
  accept = (lambda scene: not has_held_out_pair(scene)) if seen_only else (lambda scene: True)
  out = {
    k: []
    for k in (
      "captions",
      "negated",
      "updated",
      "scenes",
      "negated_objects",
      "absent_objects",
      "centres",
    )
  }
  hard = {k: [] for k in ("presence_captions", "presence_negated", "hard", "image_hard")}
  affirmed = []
  distractor_scenes = []
  images = np.empty((num, image_size, image_size, 3), np.uint8)
  distractor_images = np.empty_like(images) if distractors else None
  for i, (scene, drawing) in enumerate(
    _examples(num, rng, image_size, (1 / 3,) * 3, accept, keep_count=True)
  ):
    images[i] = _draw(scene, drawing)
    caption = _plain_caption(scene, rng)
    k = rng.integers(len(scene))
    negated = scene[k]
    image_hard = bool(image_hard_fraction > 0 and image_rng.random() < image_hard_fraction)
    if image_hard:  # X in Y's box: A+X on the same layout
      swapped = _sample_new_shape(scene, image_rng, seen_only=seen_only)
      distractor_scenes.append(scene[:k] + (swapped,) + scene[k + 1 :])
      distractor_images[i] = _draw(distractor_scenes[-1], drawing)
    elif distractors:
      distractor_scenes.append(scene[:k] + scene[k + 1 :])
      distractor_images[i] = _draw(distractor_scenes[-1], _without(drawing, k))
    absent = _sample_absent(scene, rng, new_shape=False, seen_only=seen_only)
    rest = [o for o in scene if o != negated]
    out["captions"].append(caption)
    out["negated"].append(_negation_caption(rest, negated, rng))
    out["updated"].append(caption + _absence_clause(absent, rng))
    out["scenes"].append(scene)
    out["negated_objects"].append(negated)
    out["absent_objects"].append(absent)
    out["centres"].append(drawing.centres)
    if hard_fraction > 0 or image_hard_fraction > 0:
      is_hard = bool(hard_fraction > 0 and hard_rng.random() < hard_fraction)
      is_affirmed = bool(
        image_hard
        and image_hard_affirmed_fraction > 0
        and affirmed_rng.random() < image_hard_affirmed_fraction
      )
      if is_hard:
        other = _sample_new_shape(scene, hard_rng, seen_only=seen_only)
        true, false = _negation_pair(rest, other, negated, hard_rng)
      elif image_hard:
        true, false = _negation_pair(rest, swapped, negated, image_rng)
        if is_affirmed:  # after the draw above: the image-hard stream stays as it was
          true, false = _affirmation_pair(rest, negated, swapped, affirmed_rng)
      else:
        true, false = caption, out["negated"][-1]
      hard["presence_captions"].append(true)
      hard["presence_negated"].append(false)
      hard["hard"].append(is_hard)
      hard["image_hard"].append(image_hard)
      affirmed.append(is_affirmed)
  if hard_fraction > 0:
    del hard["image_hard"]
  elif image_hard_fraction > 0:
    del hard["hard"]
    if image_hard_affirmed_fraction > 0:
      hard["affirmed"] = affirmed
  else:
    hard = {}
  extra = (
    {"distractor_images": distractor_images, "distractor_scenes": distractor_scenes}
    if distractors
    else {}
  )
  return {"images": images, **extra, **out, **hard}


def presence_task(num: int, seed: int, image_size: int = 64, compositions: str = "any") -> dict:
  """Affirmation vs negation of a present object (CC-Neg style).

  Returns images uint8 [N, S, S, 3]; captions (plain, true) and negated (same objects,
  one present object negated, false): list[str]; scenes; negated_objects. Correct when
  sim(image, caption) > sim(image, negated); both texts mention exactly the scene's
  objects, so a negation-blind score ties on every example (ties count as wrong).
  Shortcut: only the false text carries a negation word. Scenes have 1/2/3 objects
  w.p. .1/.45/.45 (before the `compositions` filter).
  """
  rng = _stream(seed, "presence", compositions)
  accept = lambda scene: _composition_ok(compositions, scene, scene)
  images = np.empty((num, image_size, image_size, 3), np.uint8)
  captions, negated_captions, scenes, negated_objects = [], [], [], []
  for i, (scene, drawing) in enumerate(_examples(num, rng, image_size, (0.1, 0.45, 0.45), accept)):
    images[i] = _draw(scene, drawing)
    negated = scene[rng.integers(len(scene))]
    captions.append(_plain_caption(scene, rng))
    negated_captions.append(_negation_caption([o for o in scene if o != negated], negated, rng))
    scenes.append(scene)
    negated_objects.append(negated)
  return {
    "images": images,
    "captions": captions,
    "negated": negated_captions,
    "scenes": scenes,
    "negated_objects": negated_objects,
  }


def absence_task(num: int, seed: int, image_size: int = 64, compositions: str = "any") -> dict:
  """Which image satisfies an absence-updated caption (NegationCLIP style).

  Returns texts: list[str] like "a red circle, but no blue square"; images_pos uint8
  [N, S, S, 3] showing scenes_pos (true for the text); images_neg, the same image with
  absent_objects[i] painted in (scenes_neg = scenes_pos + (absent,), false for the text).
  Correct when sim(text, pos) > sim(text, neg). Positive scenes have 1/2 objects w.p.
  .3/.7; the absent object has a shape not in the scene (shapes stay distinct).
  Shortcut: the false image always holds one object more.
  """
  rng = _stream(seed, "absence", compositions)
  images_pos = np.empty((num, image_size, image_size, 3), np.uint8)
  images_neg = np.empty_like(images_pos)
  texts, scenes_pos, scenes_neg, absent_objects = [], [], [], []
  for i in range(num):
    while True:
      scene = _sample_scene(_num_objects(rng, (0.3, 0.7)), rng)
      absent = _sample_absent(scene, rng, new_shape=True)
      if _composition_ok(compositions, scene, scene + (absent,)):
        break
    drawing = _sample_drawing(len(scene) + 1, rng, image_size)
    images_pos[i] = _draw(scene, drawing)
    images_neg[i] = _draw(scene + (absent,), drawing)
    texts.append(_plain_caption(scene, rng) + _absence_clause(absent, rng))
    scenes_pos.append(scene)
    scenes_neg.append(scene + (absent,))
    absent_objects.append(absent)
  return {
    "texts": texts,
    "images_pos": images_pos,
    "images_neg": images_neg,
    "scenes_pos": scenes_pos,
    "scenes_neg": scenes_neg,
    "absent_objects": absent_objects,
  }


def presence_hard_task(
  num: int, seed: int, image_size: int = 64, compositions: str = "any"
) -> dict:
  """Presence without the negation-word shortcut: both texts negated, exactly one true.

  Returns images uint8 [N, S, S, 3] of scenes (1/2/3 objects w.p. .2/.4/.4); captions
  "P, not C" (true: C, absent_objects[i], has a shape not in the scene) and negated
  "P, not B" (false: B, negated_objects[i], is in the scene), P = the scene without B,
  with the same prefix, order and template: list[str]. Correct when sim(image, caption)
  > sim(image, negated). Given the text, B and C are exchangeable, so text-only rules
  are at chance; a negation-blind matcher prefers the false text.
  """
  rng = _stream(seed, "presence_hard", compositions)
  images = np.empty((num, image_size, image_size, 3), np.uint8)
  out = {k: [] for k in ("captions", "negated", "scenes", "negated_objects", "absent_objects")}
  for i in range(num):
    while True:
      scene = _sample_scene(_num_objects(rng, (0.2, 0.4, 0.4)), rng)
      other = _sample_new_shape(scene, rng)
      if _composition_ok(compositions, scene, scene + (other,)):
        break
    drawing = _sample_drawing(len(scene), rng, image_size)
    images[i] = _draw(scene, drawing)
    present = scene[rng.integers(len(scene))]
    true, false = _negation_pair([o for o in scene if o != present], other, present, rng)
    out["captions"].append(true)
    out["negated"].append(false)
    out["scenes"].append(scene)
    out["negated_objects"].append(present)
    out["absent_objects"].append(other)
  return {"images": images, **out}


def absence_hard_task(num: int, seed: int, image_size: int = 64, compositions: str = "any") -> dict:
  """Absence without the object-count shortcut: two images with equal object counts.

  Returns texts "A, no X": list[str]; images_pos uint8 [N, S, S, 3] showing A + Y
  (scenes_pos, true), images_neg showing A + X (scenes_neg, false) on the same layout
  and background; absent_objects X, swapped_objects Y. A has 1/2 objects w.p. .3/.7;
  X != Y are independent uniform objects with shapes not in A, so they are exchangeable
  (pixel counts carry no label information). Correct when sim(text, pos) > sim(text, neg).
  """
  rng = _stream(seed, "absence_hard", compositions)
  images_pos = np.empty((num, image_size, image_size, 3), np.uint8)
  images_neg = np.empty_like(images_pos)
  out = {k: [] for k in ("texts", "scenes_pos", "scenes_neg", "absent_objects", "swapped_objects")}
  for i in range(num):
    while True:
      scene = _sample_scene(_num_objects(rng, (0.3, 0.7)), rng)
      absent = _sample_new_shape(scene, rng)
      swapped = _sample_new_shape(scene, rng)
      if swapped != absent and _composition_ok(
        compositions, scene + (swapped,), scene + (absent, swapped)
      ):
        break
    drawing = _sample_drawing(len(scene) + 1, rng, image_size)
    images_pos[i] = _draw(scene + (swapped,), drawing)
    images_neg[i] = _draw(scene + (absent,), drawing)
    out["texts"].append(_plain_caption(scene, rng) + _absence_clause(absent, rng))
    out["scenes_pos"].append(scene + (swapped,))
    out["scenes_neg"].append(scene + (absent,))
    out["absent_objects"].append(absent)
    out["swapped_objects"].append(swapped)
  return {"images_pos": images_pos, "images_neg": images_neg, **out}


def _mcq_item(
  template: str, cycle: Sequence[Object], rng: np.random.Generator
) -> tuple[list[str], Scene]:
  """(4 options of `template` over the cycle's edges, option 0 true; the true scene)."""
  name = lambda o: f"{o[0]} {o[1]}"
  edges = [(cycle[j], cycle[(j + 1) % 4]) for j in range(4)]
  if template == "affirmation":
    prefix = _pick(PREFIXES, rng)
    return [prefix + _object_list(e) for e in edges], tuple(cycle[:2])
  if template == "negation":
    alone = _pick(NEGATION_ALONE, rng)
    return [alone.format(name(o)) for o in cycle], tuple(cycle[1:])
  prefix, clause = _pick(PREFIXES, rng), _pick(NEGATION_CLAUSES, rng)
  run = 1 + rng.integers(MAX_OBJECTS)  # o0 and its run - 1 cycle predecessors
  scene = tuple(cycle[-j] for j in range(run))
  return [prefix + _object_list([a]) + clause.format(name(b)) for a, b in edges], scene


def mcq_task(num: int, seed: int, image_size: int = 64, compositions: str = "any") -> dict:
  """NegBench-style multiple choice: one image, four options of one template, one true.

  Returns images uint8 [N, S, S, 3]; options: list of N lists of 4 str; labels: int [N],
  the true option; templates: list[str] (uniform over `MCQ_TEMPLATES`); scenes. Options
  share the template, prefix and negation wording (equal word counts and negation words)
  and come from a random 4-cycle over the four shapes (see the module docstring): any
  rule that sees only the texts is at chance (1/4). Correct when the true option has the
  highest sim(image, option).
  """
  rng = _stream(seed, "mcq", compositions)
  images = np.empty((num, image_size, image_size, 3), np.uint8)
  out = {k: [] for k in ("options", "templates", "scenes")}
  labels = np.empty(num, np.int64)
  for i in range(num):
    while True:
      template = _pick(MCQ_TEMPLATES, rng)
      cycle = _sample_scene(len(SHAPES), rng)
      options, scene = _mcq_item(template, cycle, rng)
      if _composition_ok(compositions, scene, cycle):
        break
    order = rng.permutation(4)
    images[i] = render(scene, rng, image_size)
    out["options"].append([options[j] for j in order])
    labels[i] = int(np.argmin(order))  # where option 0 went
    out["templates"].append(template)
    out["scenes"].append(scene)
  return {"images": images, "labels": labels, **out}


def _all_scenes() -> list[Scene]:
  """Every scene up to order (1104 of them), shapes in `SHAPES` order."""
  return [
    tuple(zip(colours, shapes))
    for k in range(1, MAX_OBJECTS + 1)
    for shapes in itertools.combinations(SHAPES, k)
    for colours in itertools.product(COLOURS, repeat=k)
  ]


def retrieval_task(num: int, seed: int, image_size: int = 64) -> dict:
  """Image-text retrieval with plain captions over `num` pairwise distinct scenes.

  Returns images uint8 [N, S, S, 3], captions list[str], scenes. No two scenes hold the
  same set of objects (num <= 1104), so caption i lists exactly the objects of image i
  and of no other image: the target of caption i is image i, and vice versa. Object
  counts 1/2/3 each get a third of the probability mass (sampling without replacement).
  """
  scenes = _all_scenes()
  if num > len(scenes):
    raise ValueError(f"retrieval_task has only {len(scenes)} distinct scenes, asked {num}")
  counts = np.bincount([len(s) for s in scenes])
  probs = np.array([1 / (MAX_OBJECTS * counts[len(s)]) for s in scenes])
  rng = _rng(seed, "retrieval")
  chosen = [scenes[i] for i in rng.choice(len(scenes), size=num, replace=False, p=probs)]
  images = np.empty((num, image_size, image_size, 3), np.uint8)
  for i, scene in enumerate(chosen):
    images[i] = render(scene, rng, image_size)
  return {"images": images, "captions": [_plain_caption(s, rng) for s in chosen], "scenes": chosen}
