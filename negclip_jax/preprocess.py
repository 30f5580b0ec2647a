"""CLIP image preprocessing, numerically matching transformers' `CLIPImageProcessor`.

Pipeline (openai/clip-vit-base-patch32 defaults, PIL backend): convert to RGB
(alpha composited onto white), resize the short side to ``image_size`` with PIL
bicubic (long side ``int(image_size * long / short)``, i.e. floored), center
crop ``image_size`` x ``image_size`` at offset ``(size - crop) // 2``, scale to
[0, 1] by 1/255 (in float64, then float32), normalize ``(x - CLIP_MEAN) / CLIP_STD``
in float32. Outputs are NHWC float32. EXIF orientation is not applied (as in
OpenAI CLIP and `CLIPImageProcessor` given a PIL image).
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
CLIP_MEAN.flags.writeable = False
CLIP_STD.flags.writeable = False

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]


def load_image(path: str | os.PathLike) -> Image.Image:
  """Decode the image file at `path` (pixels loaded, mode unchanged).

  Raises FileNotFoundError if `path` does not exist and ValueError if it cannot be decoded.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image file not found: {path}")
  try:
    with Image.open(path) as image:
      image.load()
      return image.copy()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"cannot decode image file {path}: {e}") from e


def _to_rgb(image: ImageLike) -> Image.Image:
  """RGB PIL image from a PIL image, a uint8 HxW / HxWx1 / HxWx3 / HxWx4 array, or a path."""
  if isinstance(image, (str, os.PathLike)):
    image = load_image(image)
  if isinstance(image, Image.Image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      white = Image.new("RGBA", image.size, (255, 255, 255, 255))
      return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
  if not isinstance(image, np.ndarray):
    raise TypeError(f"expected a PIL image, a numpy array or a path, got {type(image).__name__}")
  if image.dtype != np.uint8:
    raise ValueError(f"image arrays must be uint8, got {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image arrays must be HxW or HxWx{{1,3,4}}, got shape {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:  # alpha-composite onto white, as transformers does for arrays
    alpha = image[..., 3:] / 255
    image = np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return Image.fromarray(np.ascontiguousarray(image))


def preprocess_image(image: ImageLike, image_size: int = 224) -> np.ndarray:
  """One image -> normalized float32 [image_size, image_size, 3] (NHWC without N)."""
  rgb = _to_rgb(image)
  width, height = rgb.size
  short, long = min(width, height), max(width, height)
  new_long = int(image_size * long / short)
  new_size = (image_size, new_long) if width <= height else (new_long, image_size)
  pixels = np.asarray(rgb.resize(new_size, resample=Image.Resampling.BICUBIC))
  top = (pixels.shape[0] - image_size) // 2
  left = (pixels.shape[1] - image_size) // 2
  pixels = pixels[top:top + image_size, left:left + image_size]
  scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (scaled - CLIP_MEAN) / CLIP_STD


def preprocess_images(images: Sequence[ImageLike], image_size: int = 224) -> np.ndarray:
  """Images -> normalized float32 [N, image_size, image_size, 3]."""
  out = np.empty((len(images), image_size, image_size, 3), np.float32)
  for i, image in enumerate(images):
    out[i] = preprocess_image(image, image_size)
  return out


def crop_box(image: ImageLike, box_xywh: Sequence[float]) -> Image.Image:
  """RGB crop of pixels (x, y, x + w, y + h) given a box (x, y, w, h) in pixels.

  Coordinates are rounded by PIL; parts of the box outside the image come back black.
  """
  x, y, w, h = box_xywh
  if w <= 0 or h <= 0:
    raise ValueError(f"box width and height must be positive, got {tuple(box_xywh)}")
  return _to_rgb(image).crop((x, y, x + w, y + h))


def denormalize(x: np.ndarray) -> np.ndarray:
  """Normalized [..., 3] float images -> uint8 [..., 3] in [0, 255], for plots."""
  pixels = (np.asarray(x, np.float32) * CLIP_STD + CLIP_MEAN) * 255
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)
