"""`negclip_jax.preprocess` against transformers' CLIP image processor.

Without torchvision, `transformers.CLIPImageProcessor` resolves to
`CLIPImageProcessorPil` (PIL bicubic resize, NumPy crop / rescale / normalize),
which is used here directly and built with explicit openai/clip-vit-base-patch32
arguments. Our pipeline performs the same operations in the same precision, so
the measured difference is 0; the tolerance is ATOL = 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from negclip_jax.preprocess import (CLIP_MEAN, CLIP_STD, crop_box, denormalize, preprocess_image,
                                    preprocess_images)

ATOL = 1e-5

IMAGES = {
    "astronaut": skimage.data.astronaut(),  # 512x512 RGB
    "coffee": skimage.data.coffee(),  # 400x600 RGB
    "chelsea": skimage.data.chelsea(),  # 300x451 RGB
    "camera": skimage.data.camera(),  # 512x512 grayscale (HxW)
    "tall": skimage.data.astronaut()[:, 100:251],  # 512x151
    "wide": skimage.data.coffee()[150:261],  # 111x600
}


def hf_processor(image_size):
  return CLIPImageProcessorPil(
      do_convert_rgb=True, do_resize=True, size={"shortest_edge": image_size}, resample=3,
      do_center_crop=True, crop_size={"height": image_size, "width": image_size},
      do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
      image_mean=CLIP_MEAN.tolist(), image_std=CLIP_STD.tolist())


def hf_nhwc(image, image_size):
  return hf_processor(image_size)(image, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


@pytest.mark.parametrize("image_size", [224, 64])
@pytest.mark.parametrize("name", list(IMAGES))
def test_matches_transformers(name, image_size):
  array = IMAGES[name]
  expected = hf_nhwc(Image.fromarray(array), image_size)[0]
  for image in (array, Image.fromarray(array)):
    ours = preprocess_image(image, image_size)
    assert ours.shape == (image_size, image_size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)


def test_rgba_matches_transformers():
  rgb = IMAGES["chelsea"]
  alpha = np.linspace(0, 255, rgb.shape[1]).astype(np.uint8)[None, :, None].repeat(rgb.shape[0], 0)
  rgba = np.concatenate([rgb, alpha], axis=-1)
  for image in (rgba, Image.fromarray(rgba)):
    np.testing.assert_allclose(preprocess_image(image, 64), hf_nhwc(image, 64)[0], rtol=0, atol=ATOL)


def test_batch_and_path_inputs(tmp_path):
  path = tmp_path / "coffee.png"
  Image.fromarray(IMAGES["coffee"]).save(path)
  batch = preprocess_images([str(path), path, IMAGES["coffee"]], image_size=64)
  assert batch.shape == (3, 64, 64, 3) and batch.dtype == np.float32
  np.testing.assert_array_equal(batch[0], batch[2])
  np.testing.assert_array_equal(batch[1], batch[2])


def test_denormalize_roundtrip():
  image = IMAGES["astronaut"][:64, :64]  # already 64x64: resize and crop are identities
  np.testing.assert_array_equal(denormalize(preprocess_image(image, 64)), image)


def test_crop_box():
  image = IMAGES["astronaut"]
  crop = crop_box(Image.fromarray(image), (10, 20, 30, 40))
  assert crop.size == (30, 40) and crop.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(crop), image[20:60, 10:40])
  with pytest.raises(ValueError, match="positive"):
    crop_box(image, (0, 0, 0, 5))


def test_missing_path(tmp_path):
  path = tmp_path / "missing.jpg"
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    preprocess_image(path)


def test_corrupt_files(tmp_path):
  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"this is not a jpeg" * 10)
  with pytest.raises(ValueError, match="garbage.jpg"):
    preprocess_image(str(garbage))
  good = tmp_path / "good.jpg"
  Image.fromarray(IMAGES["coffee"]).save(good)
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(good.read_bytes()[:2000])
  with pytest.raises(ValueError, match="truncated.jpg"):
    preprocess_image(truncated)


def test_rejects_non_uint8_arrays():
  with pytest.raises(ValueError, match="uint8"):
    preprocess_image(IMAGES["coffee"].astype(np.float32))
