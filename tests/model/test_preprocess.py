"""`negclip_jax.preprocess` against transformers' CLIP image processor ("hf") and an
independent PIL + torch rendering of OpenAI `clip`'s transform ("original").

Without torchvision, `transformers.CLIPImageProcessor` resolves to
`CLIPImageProcessorPil` (PIL bicubic resize, NumPy crop / rescale / normalize),
which is used here directly and built with explicit openai/clip-vit-base-patch32
arguments. Our pipeline performs the same operations in the same precision, so
its output is bitwise equal (arrays with alpha, composited by each side's own numpy
arithmetic: ATOL = 1e-5). torchvision is not
installable here, so its `Resize` / `CenterCrop` / `ToTensor` / `Normalize` on PIL
images are written out from their definitions (`_compute_resized_output_size`,
`crop_top = int(round((h - crop) / 2.0))`); the "original" path must equal them exactly.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from negclip_jax.data import parallel_read
from negclip_jax.model import preprocess
from negclip_jax.model.preprocess import (
  CLIP_MEAN,
  CLIP_STD,
  crop_box,
  denormalize,
  get_preprocess,
  preprocess_image,
  preprocess_image_openai,
  preprocess_images,
)

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
    do_convert_rgb=True,
    do_resize=True,
    size={"shortest_edge": image_size},
    resample=3,
    do_center_crop=True,
    crop_size={"height": image_size, "width": image_size},
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=CLIP_MEAN.tolist(),
    image_std=CLIP_STD.tolist(),
  )


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
    np.testing.assert_array_equal(ours, expected)


def openai_clip_transform(image: Image.Image, size: int) -> np.ndarray:
  """torchvision Resize(size, BICUBIC), CenterCrop(size), convert("RGB"), ToTensor,
  Normalize(OpenAI mean / std) on a PIL image -> HWC float32."""
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  image = image.crop((left, top, left + size, top + size)).convert("RGB")
  x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().float().div(255)
  mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(-1, 1, 1)
  std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(-1, 1, 1)
  return x.sub(mean).div(std).permute(1, 2, 0).numpy()


def _modes():
  rgba = np.concatenate(
    [IMAGES["chelsea"], np.linspace(0, 255, 451).astype(np.uint8)[None, :, None].repeat(300, 0)], -1
  )
  return {
    "rgb": Image.fromarray(IMAGES["coffee"]),
    "L": Image.fromarray(IMAGES["camera"]),
    "RGBA": Image.fromarray(rgba),
    "P": Image.fromarray(IMAGES["astronaut"]).convert("P", palette=Image.Palette.ADAPTIVE),
  }


@pytest.mark.parametrize("image_size", [224, 64])
@pytest.mark.parametrize("name", [*IMAGES, *_modes()])
def test_openai_matches_clip_transform(name, image_size):
  image = Image.fromarray(IMAGES[name]) if name in IMAGES else _modes()[name]
  ours = preprocess_image_openai(image, image_size)
  assert ours.shape == (image_size, image_size, 3) and ours.dtype == np.float32
  np.testing.assert_array_equal(ours, openai_clip_transform(image, image_size))


def test_crop_offsets_differ_where_roundings_differ():
  """512x151 -> 759x224 at 224: offset (759 - 224) / 2 = 267.5 is 268 (torchvision) vs 267."""
  image = Image.fromarray(IMAGES["tall"])
  original, hf = preprocess_image_openai(image, 224), preprocess_image(image, 224)
  resized = np.asarray(image.resize((224, 759), Image.BICUBIC), np.float32) / 255
  rows = lambda x: (x[:, :, 0] * CLIP_STD[0] + CLIP_MEAN[0])[:, 0]  # first column, red
  np.testing.assert_allclose(rows(original), resized[268 : 268 + 224, 0, 0], atol=1e-6)
  np.testing.assert_allclose(rows(hf), resized[267 : 267 + 224, 0, 0], atol=1e-6)
  assert not np.array_equal(original, hf)
  square = Image.fromarray(IMAGES["coffee"][:, :400])  # 400x400: no crop, the same pixels
  np.testing.assert_allclose(
    preprocess_image_openai(square, 224), preprocess_image(square, 224), atol=1e-6
  )


def test_get_preprocess():
  assert get_preprocess("original") is preprocess_image_openai
  assert get_preprocess("hf") is preprocess_image
  with pytest.raises(ValueError, match="unknown protocol 'x'"):
    get_preprocess("x")


def test_rgba_matches_transformers():
  rgb = IMAGES["chelsea"]
  alpha = np.linspace(0, 255, rgb.shape[1]).astype(np.uint8)[None, :, None].repeat(rgb.shape[0], 0)
  rgba = np.concatenate([rgb, alpha], axis=-1)
  for image in (rgba, Image.fromarray(rgba)):
    np.testing.assert_allclose(
      preprocess_image(image, 64), hf_nhwc(image, 64)[0], rtol=0, atol=ATOL
    )


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
  gray = Image.fromarray(IMAGES["camera"])
  assert crop_box(gray, (0, 0, 5, 5), rgb=False).mode == "L"
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


def _file_images():
  rgba = _modes()["RGBA"]
  return {
    "rgb.jpg": Image.fromarray(IMAGES["chelsea"]),
    "gray.jpg": Image.fromarray(IMAGES["camera"]),
    "rgba.png": rgba,
    "palette.gif": _modes()["P"],
    "rgb.webp": Image.fromarray(IMAGES["coffee"]),
    "rgb.tiff": Image.fromarray(IMAGES["astronaut"]),
  }


@pytest.mark.parametrize("name", list(_file_images()))
def test_files_match_the_references(tmp_path, name):
  """From a path (`load_image`: one open, the decoded image returned without a copy, the
  normalization looked up per uint8 value) both protocols give the bits their references
  give on PIL's own decode of the same file."""
  path = tmp_path / name
  _file_images()[name].save(path)
  with Image.open(path) as decoded:
    decoded.load()
    hf, original = hf_nhwc(decoded, 64)[0], openai_clip_transform(decoded, 64)
  np.testing.assert_array_equal(preprocess_image_openai(path, 64), original)
  np.testing.assert_array_equal(preprocess_image(str(path), 64), hf)


@pytest.fixture(scope="module")
def process_pool():
  pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
  yield pool
  pool.shutdown()


@pytest.fixture
def decoder(process_pool):
  """A process pool decoding this thread's image files (as reader threads do), for one test."""
  parallel_read.set_thread_decoder(process_pool)
  yield process_pool
  parallel_read.set_thread_decoder(None)


@pytest.mark.parametrize("name", list(_file_images()))
def test_files_decoded_in_a_process_are_bitwise_the_same(tmp_path, name, decoder):
  path = tmp_path / name
  _file_images()[name].save(path)
  in_process = preprocess_image_openai(path, 64), preprocess_image(str(path), 64)
  parallel_read.set_thread_decoder(None)
  try:
    here = preprocess_image_openai(path, 64), preprocess_image(str(path), 64)
  finally:
    parallel_read.set_thread_decoder(decoder)
  for a, b in zip(in_process, here):
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("where", ["thread", "process"])
def test_faults_read_the_same_decoded_anywhere(tmp_path, where, decoder):
  """The same exception and message whether this thread or a decoding process decodes;
  an image of more than twice the pixel limit (PIL's own DecompressionBombError) is a
  ValueError naming the file and the config key, like one between 1x and 2x the limit."""
  parallel_read.set_thread_decoder(decoder if where == "process" else None)
  default_limit = Image.MAX_IMAGE_PIXELS
  try:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(ValueError, match=r"garbage.jpg: not an image file PIL can identify$"):
      preprocess_image(garbage)
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.jpg"):
      preprocess_image_openai(tmp_path / "missing.jpg")
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(big)  # 4800 pixels
    preprocess.set_max_image_pixels(3000)  # 1x-2x: refused by the size check
    with pytest.raises(ValueError, match=r"big.png: 80x60 = 4800 pixels, more than the limit 3000"):
      preprocess_image(big)
    preprocess.set_max_image_pixels(2000)  # > 2x: PIL's DecompressionBombError
    with pytest.raises(ValueError, match=r"big.png: .*4800 pixels.*\(data.max_image_pixels\)$"):
      preprocess_image(big)
  finally:
    preprocess.set_max_image_pixels(default_limit)
    parallel_read.set_thread_decoder(None)
