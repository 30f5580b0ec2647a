"""The training batch layout, in one place: key names, dtypes and shapes.

One step's batch is a dict (b examples, L text tokens, S pixels, D embedding width; the
input pipeline adds a leading local-device axis, the pmapped step sees one device's part):

  TEXT_KEYS: presence_caption_ids, presence_negated_ids, absence_caption_ids,
      absence_updated_ids: int32 [b, L], in the order the step embeds them
  pixels_key(p) = f"{p}_pixels": float32 [b, S, S, 3] (`preprocess_image`), or
  image_emb_key(p) = f"{p}_image_emb": float32 [b, D] (`get_image_features`, from the
      frozen-tower cache), for each image prefix p in IMAGE_PREFIXES present:
      "presence", "absence", and "presence_distractor" (an image for which the negated
      caption is true; `losses.DISTRACTOR_OBJECTIVES` only)
  STEP_KEY = "step": int32, the global step (pipeline batches only)
"""

from __future__ import annotations

import numpy as np

# stream -> its two texts: the true caption, then the stream's negation-bearing text.
STREAM_TEXTS = {"presence": ("caption", "negated"), "absence": ("caption", "updated")}
IMAGE_PREFIXES = ("presence", "absence", "presence_distractor")
STEP_KEY = "step"
TEXT_DTYPE = np.int32
IMAGE_DTYPE = np.float32


def text_key(stream: str, field: str) -> str:
  """Batch key of `stream`'s `field` token ids, e.g. ("absence", "updated")."""
  return f"{stream}_{field}_ids"


TEXT_KEYS = tuple(text_key(s, f) for s, fields in STREAM_TEXTS.items() for f in fields)


def pixels_key(prefix: str) -> str:
  return f"{prefix}_pixels"


def image_emb_key(prefix: str) -> str:
  return f"{prefix}_image_emb"
