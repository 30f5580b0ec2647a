"""CLIP image preprocessing under two protocols; outputs are NHWC float32.

Both resize the short side to ``image_size`` with PIL bicubic (long side
``int(image_size * long / short)``, i.e. floored), center crop ``image_size`` x
``image_size`` and normalize ``(x - CLIP_MEAN) / CLIP_STD``. EXIF orientation is
never applied. They differ in the crop offset, the colour conversion and the scaling:

- "hf" (`preprocess_image`): transformers' `CLIPImageProcessor` (PIL backend), bit
  for bit. Convert to RGB first (alpha composited onto white), crop at offset
  ``(size - crop) // 2``, scale by 1/255 in float64, then float32.
- "original" (`preprocess_image_openai`): OpenAI `clip`'s transform, which every
  original evaluation script uses (torchvision ``Resize(bicubic)``,
  ``CenterCrop``, ``convert("RGB")``, ``ToTensor``, ``Normalize``). Resize in the
  image's own mode, crop at offset ``int(round((size - crop) / 2))`` (round half
  to even), then convert to RGB (alpha dropped), scale by ``/ 255`` in float32.

Scaling and normalizing are looked up: each protocol's float32 result for every uint8 value
and channel is computed once with exactly those operations (`_normalized_values`), so a
pixel's lookup has the same bits as its arithmetic.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from negclip_jax import storage
from negclip_jax.data import parallel_read

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
CLIP_MEAN.flags.writeable = False
CLIP_STD.flags.writeable = False

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]


# PIL's decompression-bomb limit is the one limit: `load_image` refuses larger images with
# a ValueError, so PIL's warning between 1x and 2x the limit would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def set_max_image_pixels(limit: int | None) -> None:
  """Images of more than `limit` pixels (width x height) are refused by `load_image`
  (None: no limit); default PIL's `Image.MAX_IMAGE_PIXELS` (89,478,485, about 9459^2),
  which this sets, process-wide (config `data.max_image_pixels`)."""
  Image.MAX_IMAGE_PIXELS = limit


def read_image_bytes(path: str | os.PathLike) -> bytes:
  """The bytes of the image file at `path`: one open, no stat first (a ``gs://`` object:
  one read, no existence check). FileNotFoundError if it does not exist, ValueError for
  anything else that goes wrong opening or reading it (e.g. a NUL byte in the path)."""
  try:
    with storage.open(path, "rb") as file:
      return file.read()
  except (FileNotFoundError, IsADirectoryError) as e:
    raise FileNotFoundError(f"image file not found: {path}") from e
  except Exception as e:  # noqa: BLE001 - every fault opening the file is this file's
    raise ValueError(f"cannot decode image file {path}: {e}") from e


def decode_image(data: bytes, path: str | os.PathLike) -> Image.Image:
  """Decode the bytes `data` of the image file `path` (pixels loaded, mode unchanged).

  ValueError naming `path` for anything that goes wrong: a corrupt or truncated file, an
  image of more pixels than `set_max_image_pixels` allows (checked before decoding).
  """
  try:
    image = Image.open(io.BytesIO(data))
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
      raise ValueError(
        f"{image.width}x{image.height} = {image.width * image.height} pixels, more than "
        f"the limit {limit} (data.max_image_pixels)"
      )
    image.load()
    return image
  except Exception as e:  # noqa: BLE001 - every decoder fault is this file's
    reason = str(e)
    if isinstance(e, UnidentifiedImageError):  # PIL's message names the BytesIO object
      reason = "not an image file PIL can identify"
    elif isinstance(e, Image.DecompressionBombError):
      reason = f"{e} (data.max_image_pixels)"
    raise ValueError(f"cannot decode image file {path}: {reason}") from e


def load_image(path: str | os.PathLike) -> Image.Image:
  """Read and decode the image file at `path` in this thread (`read_image_bytes`, then
  `decode_image`, with their errors)."""
  return decode_image(read_image_bytes(path), path)


def preprocess_encoded(
  data: bytes, path: str, protocol: str, image_size: int, max_pixels: int | None
) -> np.ndarray:
  """An image file's bytes -> `protocol`'s float32 [S, S, 3], under the pixel limit
  `max_pixels`: what a decoding process runs (picklable); raises as `decode_image`."""
  Image.MAX_IMAGE_PIXELS = max_pixels
  return PREPROCESS[protocol](decode_image(data, path), image_size)


def _decoded_elsewhere(protocol: str, image: ImageLike, image_size: int) -> np.ndarray | None:
  """`image` preprocessed by this reader thread's decoding processes if it is a path and the
  thread has them (`parallel_read.thread_decoder`), else None. The thread reads the bytes."""
  pool = parallel_read.thread_decoder()
  if pool is None or not isinstance(image, (str, os.PathLike)):
    return None
  data = read_image_bytes(image)
  limit = Image.MAX_IMAGE_PIXELS
  return pool.submit(preprocess_encoded, data, str(image), protocol, image_size, limit).result()


def _to_rgb(image: ImageLike) -> Image.Image:
  """RGB PIL image from a PIL image, a uint8 HxW / HxWx1 / HxWx3 / HxWx4 array, or a path."""
  if isinstance(image, (str, os.PathLike)):
    image = load_image(image)
  if isinstance(image, Image.Image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      white = Image.new("RGBA", image.size, (255, 255, 255, 255))
      return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # the callers never modify it
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


def _resize_short_side(image: Image.Image, image_size: int) -> Image.Image:
  """Bicubic resize of the short side to `image_size`, the long side floored."""
  width, height = image.size
  short, long = min(width, height), max(width, height)
  new_long = int(image_size * long / short)
  new_size = (image_size, new_long) if width <= height else (new_long, image_size)
  return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, image_size: int, offset: Callable[[int], int]) -> Image.Image:
  """Square crop of side `image_size` at (left, top) = offset(W - size), offset(H - size)."""
  left, top = offset(image.width - image_size), offset(image.height - image_size)
  return image.crop((left, top, left + image_size, top + image_size))


def _normalized_values(scale: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """float32 [3, 256]: ``(scale(v) - CLIP_MEAN[c]) / CLIP_STD[c]`` for every channel c and
  uint8 value v, computed once with the very operations a per-image computation would do,
  so looking a pixel up gives the same bits at a third of the cost (no per-pixel float
  arithmetic, no broadcast over a last axis of 3)."""
  scaled = scale(np.arange(256, dtype=np.uint8)[:, None])  # [256, 1]
  values = np.ascontiguousarray(((scaled - CLIP_MEAN) / CLIP_STD).T)  # [3, 256]
  values.flags.writeable = False
  return values


# The two protocols' scalings of a uint8 value: "hf" 1/255 in float64, then float32;
# "original" (torchvision `ToTensor`) / 255 in float32.
_HF_VALUES = _normalized_values(lambda v: (v.astype(np.float64) * (1 / 255)).astype(np.float32))
_OPENAI_VALUES = _normalized_values(lambda v: v.astype(np.float32) / np.float32(255))


def _lookup(values: np.ndarray, pixels: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [H, W, 3] with out[..., c] = values[c, pixels[..., c]]."""
  out = np.empty(pixels.shape, np.float32)
  for c in range(3):
    np.take(values[c], pixels[..., c], out=out[..., c], mode="clip")  # uint8: in range
  return out


def preprocess_image(image: ImageLike, image_size: int = 224) -> np.ndarray:
  """One image -> normalized float32 [image_size, image_size, 3], as `CLIPImageProcessor`."""
  if (pixels := _decoded_elsewhere("hf", image, image_size)) is not None:
    return pixels
  resized = _resize_short_side(_to_rgb(image), image_size)
  pixels = np.asarray(_center_crop(resized, image_size, lambda extra: extra // 2))
  return _lookup(_HF_VALUES, pixels)


def _as_pil(image: ImageLike) -> Image.Image:
  """A PIL image in its own mode (paths decoded, uint8 arrays via `Image.fromarray`)."""
  if isinstance(image, (str, os.PathLike)):
    return load_image(image)
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, np.ndarray) and image.dtype == np.uint8:
    return Image.fromarray(
      np.ascontiguousarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    )
  return _to_rgb(image)  # raises the shared type / dtype / shape errors


def preprocess_image_openai(image: ImageLike, image_size: int = 224) -> np.ndarray:
  """One image -> normalized float32 [image_size, image_size, 3], as OpenAI `clip`'s transform."""
  if (pixels := _decoded_elsewhere("original", image, image_size)) is not None:
    return pixels
  resized = _resize_short_side(_as_pil(image), image_size)
  crop = _center_crop(resized, image_size, lambda extra: int(round(extra / 2.0)))
  return _lookup(_OPENAI_VALUES, np.asarray(crop.convert("RGB")))


PREPROCESS = {"original": preprocess_image_openai, "hf": preprocess_image}
"""Protocol name -> one-image preprocessing function `(image, image_size) -> [S, S, 3]`."""


def get_preprocess(protocol: str) -> Callable[[ImageLike, int], np.ndarray]:
  """The preprocessing function of `protocol` ("original" or "hf")."""
  if protocol not in PREPROCESS:
    raise ValueError(f"unknown protocol {protocol!r}; known: {sorted(PREPROCESS)}")
  return PREPROCESS[protocol]


def preprocess_images(images: Sequence[ImageLike], image_size: int = 224) -> np.ndarray:
  """Images -> normalized float32 [N, image_size, image_size, 3]."""
  out = np.empty((len(images), image_size, image_size, 3), np.float32)
  for i, image in enumerate(images):
    out[i] = preprocess_image(image, image_size)
  return out


def crop_box(image: ImageLike, box_xywh: Sequence[float], rgb: bool = True) -> Image.Image:
  """Crop of pixels (x, y, x + w, y + h) given a box (x, y, w, h) in pixels.

  Converted to RGB first when `rgb` (the "hf" path), else cropped in the image's own
  mode (OpenAI `clip` crops before its transform converts). Coordinates are rounded
  by PIL; parts of the box outside the image come back black.
  """
  x, y, w, h = box_xywh
  if w <= 0 or h <= 0:
    raise ValueError(f"box width and height must be positive, got {tuple(box_xywh)}")
  return (_to_rgb(image) if rgb else _as_pil(image)).crop((x, y, x + w, y + h))


def denormalize(x: np.ndarray) -> np.ndarray:
  """Normalized [..., 3] float images -> uint8 [..., 3] in [0, 255], for plots."""
  pixels = (np.asarray(x, np.float32) * CLIP_STD + CLIP_MEAN) * 255
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)
