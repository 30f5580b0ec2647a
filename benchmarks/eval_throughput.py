#!/usr/bin/env python
"""Evaluation embedding throughput: our `Embedder` vs transformers' `CLIPModel` (PyTorch).

    python benchmarks/eval_throughput.py                  # CPU defaults, a few minutes
    python benchmarks/eval_throughput.py --batch 256 --num-images 4096 --num-texts 8192

Full ViT-B/32 shapes, random weights (the same on both sides). Inputs: NegShapes images
rendered at 224 px and preprocessed (`negclip_jax.model.preprocess`, done before timing, for both
sides), NegShapes captions / negated / updated texts tokenized to 77 tokens.

  ours     `embed.Embedder(model, params, batch_size, pack=False)`: jitted + pmapped, fixed
           batch shape (last batch padded), texts truncated to their `bucket_length`,
           L2-normalized float32 results back on the host. Timed end to end (host batching
           included).
  ours_packed  the Embedder's default (`pack=True`): the texts packed several to a row of 77
           tokens (`negclip_jax.train.packing`), up to batch_size rows per call; timed end to end
           (the host packing included), the Embedder's kept features dropped before each pass.
  pytorch  `CLIPModel.get_image_features` / `get_text_features` under `torch.no_grad()`,
           eager, the same batch size, 77-token texts (what `clip.tokenize` gives the
           original code); outputs L2-normalized and copied to numpy like ours.
Extra, to separate the bucketing gain from the framework gain: ours on untruncated 77-token
texts and torch on the same bucketed texts.

Timing: `--warmup` untimed calls on one batch per case (compilation, allocation; the text
warm-up batch holds the longest texts, so it has the same bucket), then `--repeats` rounds,
each timing one full pass of every case (interleaved, so a shared machine's load hits all
cases alike); throughput = items / median pass time. A parity line compares the two sides'
embeddings. The last lines are `name: value` headline figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from negclip_jax.eval import embed
from negclip_jax.model import clip as model_lib
from negclip_jax.model.tokenizer import ClipTokenizer
from negclip_jax.train import packing


def parse_args(argv=None):
  accel = jax.default_backend() != "cpu"
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", default="vit-b-32")
  p.add_argument("--batch", type=int, default=256 if accel else 32, help="embedding batch size")
  p.add_argument("--num-images", type=int, default=4096 if accel else 64)
  p.add_argument("--num-texts", type=int, default=8192 if accel else 96)
  p.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="compute dtype; torch uses autocast for bfloat16",
  )
  p.add_argument("--repeats", type=int, default=5 if accel else 3, help="timed passes")
  p.add_argument(
    "--warmup",
    type=int,
    default=1,
    help="untimed calls on one batch per case (compilation, allocation)",
  )
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument(
    "--skip-extra", action="store_true", help="skip ours-at-77-tokens and torch-on-bucketed-texts"
  )
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def make_inputs(config, num_images: int, num_texts: int, seed: int):
  from negclip_jax.data import negshapes

  size = config.vision.image_size
  n_pairs = max(num_images, -(-num_texts // 3))
  data = negshapes.generate_pairs(n_pairs, seed, image_size=size)
  pixels = common.preprocess_images(data["images"][:num_images], size)
  texts = [
    t for i in range(n_pairs) for t in (data["captions"][i], data["negated"][i], data["updated"][i])
  ][:num_texts]
  ids = ClipTokenizer()(texts, config.text.max_position_embeddings)
  return pixels, ids


def ours_texts_untruncated(embedder: embed.Embedder, ids: np.ndarray) -> np.ndarray:
  """Embedder.texts without the bucketing step (same batching, 77 tokens)."""
  return embedder._run("text", len(ids), lambda lo, hi: ids[lo:hi], "texts")


class TorchEmbedder:
  def __init__(self, config, params, batch: int, dtype: str):
    import torch

    self.torch = torch
    self.device = common.torch_device()
    self.model = common.build_torch_clip(config, params, self.device).eval()
    self.batch = batch
    self.autocast = dtype == "bfloat16"

  def _run(self, method, x):
    torch = self.torch
    outs = []
    with torch.no_grad(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
      for lo in range(0, len(x), self.batch):
        feats = common.torch_features(method(x[lo : lo + self.batch]))
        outs.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
    return np.concatenate(outs)

  def images(self, pixels_nchw):
    return self._run(lambda x: self.model.get_image_features(pixel_values=x), pixels_nchw)

  def texts(self, ids):
    return self._run(lambda x: self.model.get_text_features(input_ids=x), ids)


def main(argv=None):
  args = parse_args(argv)
  if not args.skip_torch:
    common.setup_torch_threads()
  print(f"machine: {common.machine_description()}", flush=True)
  config = model_lib.get_config(args.preset)
  model = model_lib.CLIP(config, dtype=jnp.dtype(args.dtype))
  params = jax.device_get(model_lib.init_params(model_lib.CLIP(config), jax.random.key(args.seed)))
  pixels, ids = make_inputs(config, args.num_images, args.num_texts, args.seed)
  bucket = packing.bucket_length(ids)
  lengths = common.token_lengths(ids)
  print(
    f"inputs: {len(pixels)} images {config.vision.image_size}px, {len(ids)} texts "
    f"(tokens min/mean/max {lengths.min()}/{lengths.mean():.1f}/{lengths.max()} of "
    f"{ids.shape[1]} -> bucket {bucket}); batch {args.batch}; {jax.local_device_count()} "
    f"device(s); warm-up {args.warmup} batch, median of {args.repeats} passes",
    flush=True,
  )
  n_img, n_txt = len(pixels), len(ids)
  # Warm-up input: one batch holding the longest texts, so it has the full set's bucket.
  longest = ids[np.argsort(-lengths, kind="stable")[: args.batch]]
  warm_pixels = pixels[: args.batch]
  cases = {}  # name -> (timed pass, warm-up call, items per pass)

  ours = embed.Embedder(model, params, batch_size=args.batch, progress=False, pack=False)
  packed = embed.Embedder(model, params, batch_size=args.batch, progress=False)
  cases["images_ours"] = (lambda: ours.images(pixels), lambda: ours.images(warm_pixels), n_img)
  cases["texts_ours"] = (lambda: ours.texts(ids), lambda: ours.texts(longest), n_txt)

  # Warm-up on the whole set: the packed call shape depends on the set's row count.
  def packed_pass():  # from scratch: the Embedder keeps packed features for reuse
    packed.forget_texts()
    return packed.texts(ids)

  cases["texts_ours_packed"] = (packed_pass, packed_pass, n_txt)
  if not args.skip_extra:
    cases["texts_ours_77"] = (
      lambda: ours_texts_untruncated(ours, ids),
      lambda: ours_texts_untruncated(ours, longest),
      n_txt,
    )
  if not args.skip_torch:
    import torch

    ref = TorchEmbedder(config, params, args.batch, args.dtype)
    pix_t = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).to(ref.device)
    ids_t = torch.from_numpy(ids.astype(np.int64)).to(ref.device)

    def sync(f):
      def g():
        out = f()
        common.torch_sync(ref.device)
        return out

      return g

    cases["images_pytorch"] = (
      sync(lambda: ref.images(pix_t)),
      sync(lambda: ref.images(pix_t[: args.batch])),
      n_img,
    )
    cases["texts_pytorch"] = (
      sync(lambda: ref.texts(ids_t)),
      sync(lambda: ref.texts(ids_t[: args.batch])),
      n_txt,
    )
    if not args.skip_extra:
      cases["texts_pytorch_bucketed"] = (
        sync(lambda: ref.texts(ids_t[:, :bucket])),
        sync(lambda: ref.texts(ids_t[: args.batch, :bucket])),
        n_txt,
      )

  for name, (_, warm, _) in cases.items():  # compile / allocate, one batch each
    for _ in range(args.warmup):
      warm()
  times = {name: [] for name in cases}
  results = {}
  for _ in range(args.repeats):  # interleaved rounds: one pass of every case per round
    for name, (fn, _, _) in cases.items():
      t0 = time.perf_counter()
      results[name] = fn()
      times[name].append(time.perf_counter() - t0)
  rates = {}
  for name, (_, _, n) in cases.items():
    rates[name] = n / common.median(times[name])
    print(f"{name}: {rates[name]:.2f}/s (pass of {n}: {common.spread(times[name])})", flush=True)
  if "images_pytorch" in results:
    diff_i = np.abs(results["images_ours"] - results["images_pytorch"]).max()
    diff_t = np.abs(results["texts_ours"] - results["texts_pytorch"]).max()
    diff_p = np.abs(results["texts_ours_packed"] - results["texts_pytorch"]).max()
    print(
      f"parity (max |ours - pytorch| of normalized embeddings): images {diff_i:.2e}, "
      f"texts (ours bucketed vs torch 77 tokens) {diff_t:.2e}, texts (ours packed vs torch) "
      f"{diff_p:.2e}",
      flush=True,
    )

  print("", flush=True)
  common.headline("images_per_s_ours", rates["images_ours"])
  if "images_pytorch" in rates:
    common.headline("images_per_s_pytorch", rates["images_pytorch"])
  common.headline("texts_per_s_ours", rates["texts_ours"])
  common.headline("texts_per_s_ours_packed", rates["texts_ours_packed"])
  if "texts_pytorch" in rates:
    common.headline("texts_per_s_pytorch", rates["texts_pytorch"])
    common.headline("images_speedup_vs_pytorch", rates["images_ours"] / rates["images_pytorch"])
    common.headline("texts_speedup_vs_pytorch", rates["texts_ours"] / rates["texts_pytorch"])
    common.headline(
      "texts_speedup_vs_pytorch_packed", rates["texts_ours_packed"] / rates["texts_pytorch"]
    )
  if not args.skip_extra:
    common.headline("texts_per_s_ours_77", rates["texts_ours_77"])
    if "texts_pytorch_bucketed" in rates:
      common.headline("texts_per_s_pytorch_bucketed", rates["texts_pytorch_bucketed"])
      common.headline(
        "texts_speedup_vs_pytorch_same_length", rates["texts_ours_77"] / rates["texts_pytorch"]
      )


if __name__ == "__main__":
  main()
