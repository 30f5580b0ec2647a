#!/usr/bin/env python
"""Omni-NegCLIP training-step throughput: ours (JAX) vs the PyTorch original.

    python benchmarks/step_throughput.py                               # CPU: global batch 16, float32
    python benchmarks/step_throughput.py --batch 128 --dtype bfloat16  # an accelerator

One step = one presence batch + one absence batch of `--batch` examples each (samples per
step = 2·batch), the paper's split: text embeddings, blocks 0-5, final LayerNorm, text
projection and logit_scale train; the vision tower and the other text blocks are frozen.
Full ViT-B/32 shapes, random weights (the same in every variant), NegShapes captions
tokenized with our `ClipTokenizer` to 77 tokens (short captions, like CC-Neg / COCO).

Variants, measured in one run on the same batch:
  ours            exact speed-ups on: the text batch truncated to its `packing.bucket_length`
                  (the causal mask makes EOT features independent of later padding),
                  cached image embeddings (`*_image_emb`, computed once by the frozen tower
                  before timing, so the step runs only the text tower), no weight gradients
                  for frozen leaves, pmap with a donated state.
  packed          ours with the texts packed (`negclip_jax.train.packing`, `data.pack_text`): the
                  step's captions share rows of 77 tokens, each with its own positions,
                  a block-diagonal causal mask and its own EOT pooling (the same features
                  to float rounding), so padding no longer costs FLOPs. What
                  `negclip_jax.train` does by default.
  ours_exact_off  our step, 77 tokens, pixels through the vision tower every step: the
                  framework/compiler gain alone.
  pytorch         transformers `CLIPModel` with the same weights, frozen parameters
                  requires_grad=False, eager, the original recipe's optimizer
                  `torch.optim.AdamW(lr=1e-6, weight_decay=0.2, betas=(0.9, 0.999), eps=1e-8)`
                  (ours: `optim.make_optimizer` with the same values), the same losses written
                  plainly in torch, logit_scale clamped; 77 tokens, pixels every step, all
                  texts in one `get_text_features` call and all images in one
                  `get_image_features` call.
Before timing, the first (untimed) step of each variant is checked: the losses and the
global gradient norms on the initial weights must agree (1e-4 relative in float32).

Timing: the first call of each variant (compilation, optimizer-state allocation) and
`--warmup - 1` more are untimed; then `--steps` rounds, one step of each variant per round
(interleaved, so a shared machine's load hits every variant alike); each variant reports its
median step time. JAX steps block on their outputs; torch steps are timed with
`time.perf_counter` around forward, backward and `optimizer.step()`.

Utilization: model FLOPs of the untruncated step (`common.train_step_flops`, formula in
`benchmarks/common.py` and docs/performance.md) / median step time of ours_exact_off,
divided by the measured dense-matmul FLOP/s of this machine (jitted jnp n×n @ n×n, n = 2048
on CPU, 8192 on an accelerator, in --dtype), sampled at start and after every round (median).

Padding: `padding_fraction_<variant>` is the share of the text tower's token slots that
hold no caption token (a caption's tokens run up to its EOT).

The last lines are `name: value` headline figures (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

from benchmarks import common  # noqa: E402
from negclip_jax.model import clip as model_lib
from negclip_jax.model.tokenizer import ClipTokenizer
from negclip_jax.train import optim, packing, param_groups
from negclip_jax.train import step as train_step
from negclip_jax.train.packing import bucket_length

TEXT_KEYS = ("presence_caption", "presence_negated", "absence_caption", "absence_updated")
LR, WEIGHT_DECAY, BETAS, EPS = 1e-6, 0.2, (0.9, 0.999), 1e-8  # the original recipe's AdamW
MAX_LOGIT_SCALE = math.log(100.0)


def parse_args(argv=None):
  accel = jax.default_backend() != "cpu"
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", default="vit-b-32", help="model preset (negclip_jax.model.PRESETS)")
  p.add_argument(
    "--batch",
    type=int,
    default=128 if accel else 16,
    help="global batch per stream (presence and absence each); samples/step = 2x",
  )
  p.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="compute dtype (params stay float32); torch uses autocast for bfloat16",
  )
  p.add_argument("--steps", type=int, default=10 if accel else 3, help="timed steps per variant")
  p.add_argument(
    "--warmup",
    type=int,
    default=3 if accel else 1,
    help="untimed steps per variant, including the first (compiling) one; >= 1",
  )
  p.add_argument("--skip-torch", action="store_true", help="skip the PyTorch reference")
  p.add_argument("--layers", default="front", help="trained text blocks (partition preset)")
  p.add_argument(
    "--matmul-size",
    type=int,
    default=8192 if accel else 2048,
    help="n of the n x n @ n x n matmul that measures the machine peak",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--profile",
    action="store_true",
    help="also time the packed step's pieces: the text forward alone, the step "
    "without the optimizer (forward + backward + loss), the whole step",
  )
  p.add_argument(
    "--breakdown",
    action="store_true",
    help="also time the untruncated step's pieces on both sides: the text part "
    "(77 tokens, cached image features) and the vision forward",
  )
  args = p.parse_args(argv)
  args.warmup = max(1, args.warmup)
  return args


# ---------------------------------------------------------------------------- data


def make_batches(config, batch: int, seed: int, model, params, n_dev: int):
  """-> (full, fast, packed, info): global numpy batches of the untruncated, bucketed and
  packed variants (packed: per-device rows flattened, [n_dev * R, T] and [n_dev * P])."""
  ctx = config.text.max_position_embeddings
  data = common.negshapes_texts(batch, seed, config.vision.image_size)
  tok = ClipTokenizer()
  ids = {k: tok(data[k], ctx) for k in TEXT_KEYS}
  pixels = common.preprocess_images(data["images"], config.vision.image_size)
  full = {f"{k}_ids": v for k, v in ids.items()}
  full["presence_pixels"], full["absence_pixels"] = pixels[:batch], pixels[batch:]
  bucket = bucket_length(np.concatenate(list(ids.values())))
  # The cache: image features from the frozen tower, computed once (as image_cache does).
  embed = jax.jit(lambda p, x: model.apply({"params": p}, x, method="get_image_features"))
  t0 = time.perf_counter()
  emb = np.asarray(embed(params, pixels))
  cache_s = time.perf_counter() - t0
  fast = {f"{k}_ids": v[:, :bucket] for k, v in ids.items()}
  fast["presence_image_emb"], fast["absence_image_emb"] = emb[:batch], emb[batch:]
  t0 = time.perf_counter()
  rows = packing.pack_text_batch(full, n_dev, ctx, config.text.eos_token_id)
  pack_s = time.perf_counter() - t0
  packed = {k: v.reshape((-1,) + v.shape[2:]) for k, v in rows.items()}
  packed.update({k: v for k, v in fast.items() if k.endswith("_image_emb")})
  lengths = common.token_lengths(np.concatenate(list(ids.values())))
  texts = len(lengths)
  info = dict(
    bucket=bucket,
    mean_len=float(lengths.mean()),
    max_len=int(lengths.max()),
    min_len=int(lengths.min()),
    cache_s=cache_s,
    context=ctx,
    example=data["presence_negated"][0],
    pack_s=pack_s,
    rows=rows[packing.PACKED_IDS].shape[1],
    padding={
      "ours": 1 - lengths.sum() / (texts * bucket),
      "packed": packing.padding_fraction(rows),
      "ours_exact_off": 1 - lengths.sum() / (texts * ctx),
    },
  )
  info["padding"]["pytorch"] = info["padding"]["ours_exact_off"]
  return full, fast, packed, info


def to_devices(batch: dict, n: int) -> dict:
  """Global [B, ...] numpy -> [n, B/n, ...] arrays already on the pmap devices."""
  shaped = {k: v.reshape((n, -1) + v.shape[1:]) for k, v in batch.items()}
  return jax.pmap(lambda x: x, axis_name=train_step.AXIS)(shaped)


# ------------------------------------------------------------------------ ours (JAX)


class JaxVariant:
  """Our pmapped step on a fixed device-resident batch; state donated every call."""

  def __init__(self, step_fn, state, batch, n_dev):
    self.fn = step_fn
    self.state = train_step.replicate(state)
    self.batch = to_devices(batch, n_dev)

  def __call__(self):
    self.state, metrics = self.fn(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return metrics

  def first(self) -> tuple[float, float, float]:
    """The compiling step -> (loss and gradient norm on the initial weights, seconds)."""
    t0 = time.perf_counter()
    metrics = self()
    get = lambda k: float(np.asarray(metrics[k])[0])
    return get("total"), get("grad_norm"), time.perf_counter() - t0


# ------------------------------------------------------------------------ PyTorch


def torch_losses(img, txt, batch, scale, margin=0.9):
  """Omni-NegCLIP loss written plainly in torch: presence (L1+L2+L3)/3 + absence.

  img [2B, D] = [presence; absence] images, txt [4B, D] = presence captions, presence
  negated, absence captions, absence updated; all L2-normalized; scale = logit_scale.exp().
  """
  import torch
  import torch.nn.functional as F

  b = batch
  labels = torch.arange(b, device=img.device)
  p_img, a_img = img[:b], img[b:]
  p_cap, p_neg, a_cap, a_upd = txt[:b], txt[b : 2 * b], txt[2 * b : 3 * b], txt[3 * b :]
  # Presence (CC-Neg): L1 image -> [captions; negated], L2 caption -> images, L3 2-way.
  l1 = F.cross_entropy(scale * p_img @ torch.cat([p_cap, p_neg]).T, labels)
  l2 = F.cross_entropy(scale * p_cap @ p_img.T, labels)
  pair = scale * torch.stack([(p_img * p_cap).sum(-1), (p_img * p_neg).sum(-1)], dim=-1)
  l3 = F.cross_entropy(pair, torch.zeros(b, dtype=torch.long, device=img.device))
  presence = (l1 + l2 + l3) / 3

  def clip(i, t):
    logits = scale * i @ t.T
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

  # Absence (NegationCLIP): L_neg + L_orig + L_text.
  l_text = F.relu((a_cap * a_upd).sum(-1) + margin).mean()
  absence = clip(a_img, a_upd) + clip(a_img, a_cap) + l_text
  return presence + absence


def hf_key(path: tuple) -> str:
  """Flax path -> HF state-dict key (kernel/embedding/scale -> weight)."""
  *prefix, leaf = path
  return ".".join([*prefix, "weight" if leaf in ("kernel", "embedding", "scale") else leaf])


class TorchVariant:
  """The original algorithm: HF CLIPModel, frozen requires_grad=False, AdamW, eager."""

  def __init__(self, config, params, labels, batch: dict, b: int, dtype: str):
    import torch

    self.torch = torch
    self.device = common.torch_device()
    self.model = common.build_torch_clip(config, params, self.device).train()
    trainable = {
      hf_key(p)
      for p, label in traverse_util.flatten_dict(labels).items()
      if label == param_groups.TRAINABLE
    }
    names = set()
    for name, p in self.model.named_parameters():
      p.requires_grad_(name in trainable)
      names.add(name)
    if trainable - names:
      raise RuntimeError(
        f"trainable keys missing in the torch model: {sorted(trainable - names)[:5]}"
      )
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.num_trainable = sum(p.numel() for p in self.params)
    self.opt = torch.optim.AdamW(
      self.params, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS
    )
    ids = np.concatenate([batch[f"{k}_ids"] for k in TEXT_KEYS])
    self.ids = torch.from_numpy(ids.astype(np.int64)).to(self.device)
    self.image_emb = self.pixels = None
    if "presence_image_emb" in batch:  # --breakdown only: the text part of the step
      emb = np.concatenate([batch["presence_image_emb"], batch["absence_image_emb"]])
      self.image_emb = torch.from_numpy(emb).to(self.device)
    else:
      pix = np.concatenate([batch["presence_pixels"], batch["absence_pixels"]]).transpose(
        0, 3, 1, 2
      )
      self.pixels = torch.from_numpy(np.ascontiguousarray(pix)).to(self.device)
    self.b = b
    self.autocast = dtype == "bfloat16"

  def __call__(self, grad_norm: bool = False):
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
      img = (
        self.image_emb
        if self.image_emb is not None
        else common.torch_features(self.model.get_image_features(pixel_values=self.pixels))
      )
      txt = common.torch_features(self.model.get_text_features(input_ids=self.ids))
    img = torch.nn.functional.normalize(img.float(), dim=-1)
    txt = torch.nn.functional.normalize(txt.float(), dim=-1)
    loss = torch_losses(img, txt, self.b, self.model.logit_scale.exp())
    loss.backward()
    norm = None
    if grad_norm:  # the check only; not in timed steps
      norm = float(
        torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in self.params]))
      )
    self.opt.step()
    with torch.no_grad():
      self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    common.torch_sync(self.device)
    return loss.detach(), norm

  def first(self) -> tuple[float, float, float]:
    """The first step -> (loss, gradient norm, seconds)."""
    t0 = time.perf_counter()
    loss, norm = self(grad_norm=True)
    return float(loss), norm, time.perf_counter() - t0


class VisionForward:
  """A forward-only piece, timed alone: --breakdown (the frozen tower's forward on the
  step's 2·batch images) and --profile (the packed text forward)."""

  def __init__(self, fn):
    self.fn = fn

  def __call__(self):
    return self.fn()

  def first(self):
    t0 = time.perf_counter()
    self.fn()
    return None, None, time.perf_counter() - t0


def vision_forward_pieces(model, params, torch_variant, full, n_dev):
  """-> {"ours_vision_fwd": ..., "pytorch_vision_fwd": ...} (torch only with a torch variant)."""
  pixels = np.concatenate([full["presence_pixels"], full["absence_pixels"]])
  fn = jax.pmap(lambda p, x: model.apply({"params": p}, x, method="get_image_features"))
  rparams = train_step.replicate(params)
  x = to_devices({"x": pixels}, n_dev)["x"]
  out = {"ours_vision_fwd": VisionForward(lambda: fn(rparams, x).block_until_ready())}
  if torch_variant is not None:
    tv = torch_variant
    torch = tv.torch

    def torch_fwd():
      with torch.no_grad(), torch.autocast(tv.device, dtype=torch.bfloat16, enabled=tv.autocast):
        tv.model.get_image_features(pixel_values=tv.pixels)
      common.torch_sync(tv.device)

    out["pytorch_vision_fwd"] = VisionForward(torch_fwd)
  return out


# ---------------------------------------------------------------------------- main


def main(argv=None):
  args = parse_args(argv)
  if not args.skip_torch:
    common.setup_torch_threads()
  print(f"machine: {common.machine_description()}", flush=True)
  n_dev = jax.local_device_count()
  if args.batch % n_dev:
    raise SystemExit(f"--batch {args.batch} must be divisible by {n_dev} local devices")
  dtype = jnp.dtype(args.dtype)
  config = model_lib.get_config(args.preset)

  # Machine matmul peak: sampled now and after every timed round (same load as the steps).
  probes = {"jax": common.MatmulProbe(args.matmul_size, args.dtype)}
  if not args.skip_torch:
    probes["torch"] = common.MatmulProbe(
      args.matmul_size, args.dtype, "torch", common.torch_device()
    )
  for name, probe in probes.items():
    probe.sample(5)
    print(
      f"matmul peak now ({name} {args.dtype} {args.matmul_size}^3): "
      f"{probe.flops() / 1e9:.1f} GFLOP/s",
      flush=True,
    )

  model = model_lib.CLIP(config, dtype=dtype)
  params = jax.device_get(model_lib.init_params(model_lib.CLIP(config), jax.random.key(args.seed)))
  labels = param_groups.label_params(params, args.layers)
  blocks = param_groups.text_layers(args.layers, config.text.num_hidden_layers)
  print(param_groups.summary(params, labels), flush=True)
  tx = optim.make_optimizer(
    labels,
    learning_rate=LR,
    weight_decay=WEIGHT_DECAY,
    warmup_steps=1,
    total_steps=100_000,
    b1=BETAS[0],
    b2=BETAS[1],
    eps=EPS,
  )
  state = train_step.create_train_state(params, tx)
  step_fn = train_step.pmap_train_step(train_step.make_train_step(model, labels, tx))

  full, fast, packed, info = make_batches(config, args.batch, args.seed, model, params, n_dev)
  print(
    f"batch: {args.batch} presence + {args.batch} absence examples ({2 * args.batch} "
    f"samples/step), {4 * args.batch} texts, {2 * args.batch} images "
    f"{config.vision.image_size}px, {n_dev} device(s)",
    flush=True,
  )
  print(
    f"tokens: length min/mean/max {info['min_len']}/{info['mean_len']:.1f}/{info['max_len']} "
    f"of {info['context']} -> bucket {info['bucket']} (e.g. {info['example']!r}); packed: "
    f"{info['rows']} rows of {info['context']} per device (packing took "
    f"{info['pack_s'] * 1e3:.1f} ms on the host)",
    flush=True,
  )
  print(
    f"image-embedding cache: {2 * args.batch} images in {info['cache_s']:.2f}s "
    "(once, incl. compile; excluded from the step time)",
    flush=True,
  )

  variants = {
    "ours": JaxVariant(step_fn, state, fast, n_dev),
    "packed": JaxVariant(step_fn, state, packed, n_dev),
    "ours_exact_off": JaxVariant(step_fn, state, full, n_dev),
  }
  if not args.skip_torch:
    variants["pytorch"] = TorchVariant(config, params, labels, full, args.batch, args.dtype)
  if args.profile:  # pieces of the packed step
    no_opt = optax.set_to_zero()  # the gradients (and their norm) are still computed
    variants["packed_no_optimizer"] = JaxVariant(
      train_step.pmap_train_step(train_step.make_train_step(model, labels, no_opt)),
      train_step.create_train_state(params, no_opt),
      packed,
      n_dev,
    )
    fwd = jax.pmap(lambda p, b: train_step.text_embeddings(model, p, b))
    rparams, dev_packed = train_step.replicate(params), to_devices(packed, n_dev)
    variants["packed_text_fwd"] = VisionForward(
      lambda: fwd(rparams, dev_packed).block_until_ready()
    )
  if args.breakdown:  # pieces of the untruncated step: text part + vision forward
    text77 = {
      **{k: v for k, v in full.items() if k.endswith("_ids")},
      **{k: v for k, v in fast.items() if k.endswith("_image_emb")},
    }
    variants["ours_text77"] = JaxVariant(step_fn, state, text77, n_dev)
    if not args.skip_torch:
      variants["pytorch_text77"] = TorchVariant(
        config, params, labels, text77, args.batch, args.dtype
      )
    variants.update(vision_forward_pieces(model, params, variants.get("pytorch"), full, n_dev))
  del state
  if not args.skip_torch:
    n_jax = sum(
      v.size
      for p, v in traverse_util.flatten_dict(params).items()
      if traverse_util.flatten_dict(labels)[p] == param_groups.TRAINABLE
    )
    if variants["pytorch"].num_trainable != n_jax:
      raise RuntimeError(
        f"trainable params differ: torch {variants['pytorch'].num_trainable:,} vs ours {n_jax:,}"
      )

  # First step of each variant: compile / allocate, and the check on the initial weights.
  first = {}
  for name, v in variants.items():
    loss, norm, secs = v.first()
    if loss is None:  # a forward-only piece
      print(f"first call {name}: {secs:.1f}s (untimed: compile / set-up)", flush=True)
      continue
    first[name] = loss, norm, secs
    print(
      f"first step {name}: loss {loss:.7f}, grad norm {norm:.6e}, {secs:.1f}s "
      "(untimed: compile / set-up)",
      flush=True,
    )
  ref_name = "pytorch" if "pytorch" in first else "ours_exact_off"
  tol = 1e-4 if args.dtype == "float32" else 2e-2
  ok = True
  for i, what in ((0, "loss"), (1, "grad norm")):
    ref = first[ref_name][i]
    worst = max(abs(f[i] - ref) / max(1e-30, abs(ref)) for f in first.values())
    ok &= worst <= tol
    print(
      f"{what} check vs {ref_name} ({ref:.7g}): "
      + ", ".join(f"{n} {f[i] - ref:+.2e}" for n, f in first.items() if n != ref_name)
      + f"; max rel diff {worst:.2e} -> {'OK' if worst <= tol else 'MISMATCH'} (tol {tol:g})",
      flush=True,
    )
  if not ok:
    print(
      "WARNING: the variants do not compute the same step; the comparison is invalid", flush=True
    )

  for name, v in variants.items():  # remaining warm-up
    for _ in range(args.warmup - 1):
      v()
  times = {name: [] for name in variants}
  cpu = {name: [] for name in variants}  # process CPU seconds (all threads), a load diagnostic
  for _ in range(args.steps):  # interleaved rounds
    for name, v in variants.items():
      c0, t0 = time.process_time(), time.perf_counter()
      v()
      times[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
    for probe in probes.values():
      probe.sample(3)
  peak = probes["jax"].flops()
  for name, probe in probes.items():
    print(
      f"matmul peak over the run ({name}): {probe.flops() / 1e9:.1f} GFLOP/s "
      f"(median of {len(probe.times)})",
      flush=True,
    )
  for name, t in times.items():
    print(
      f"step time {name}: {common.spread(t)}; all: {' '.join(f'{x:.3f}' for x in t)}; "
      f"CPU s/step (all threads) median {common.median(cpu[name]):.2f}",
      flush=True,
    )
  if args.breakdown and "pytorch" in times:
    for piece in ("text77", "vision_fwd"):
      ratio = common.median(times[f"pytorch_{piece}"]) / common.median(times[f"ours_{piece}"])
      print(
        f"breakdown {piece}: ours {common.median(times[f'ours_{piece}']):.3f}s, pytorch "
        f"{common.median(times[f'pytorch_{piece}']):.3f}s -> ours {ratio:.2f}x faster",
        flush=True,
      )

  if args.profile:
    med = lambda name: common.median(times[name])
    whole, no_opt, fwd = med("packed"), med("packed_no_optimizer"), med("packed_text_fwd")
    print(
      f"profile packed step: text forward {fwd:.3f}s ({100 * fwd / whole:.0f}%), backward "
      f"+ loss {no_opt - fwd:.3f}s ({100 * (no_opt - fwd) / whole:.0f}%), optimizer "
      f"(AdamW on the trainable leaves) {whole - no_opt:.3f}s "
      f"({100 * (whole - no_opt) / whole:.0f}%); whole step {whole:.3f}s",
      flush=True,
    )

  samples = 2 * args.batch
  sps = {name: samples / common.median(t) for name, t in times.items()}
  ctx = config.text.max_position_embeddings
  flops_full = common.train_step_flops(config, args.batch, ctx, blocks, pixels=True)
  flops_fast = common.train_step_flops(config, args.batch, info["bucket"], blocks, pixels=False)
  flops_packed = common.packed_text_step_flops(
    config, n_dev * info["rows"], ctx, 4 * args.batch, blocks
  )
  achieved = flops_full / common.median(times["ours_exact_off"])
  util = achieved / peak
  print(
    f"model FLOPs/step: untruncated {flops_full / 1e9:.1f} GFLOP (text fwd+bwd "
    f"{common.train_step_flops(config, args.batch, ctx, blocks, pixels=False) / 1e9:.1f}, "
    f"vision fwd {2 * args.batch * common.vision_forward_flops(config) / 1e9:.1f}); "
    f"ours (bucket {info['bucket']}, cached images) {flops_fast / 1e9:.1f} GFLOP; packed "
    f"({n_dev * info['rows']} rows of {ctx}, cached images) {flops_packed / 1e9:.1f} GFLOP",
    flush=True,
  )
  print(
    f"achieved: ours_exact_off {achieved / 1e9:.1f} GFLOP/s = {100 * util:.1f}% of the matmul "
    f"peak; ours {flops_fast / common.median(times['ours']) / 1e9:.1f} GFLOP/s, packed "
    f"{flops_packed / common.median(times['packed']) / 1e9:.1f} GFLOP/s",
    flush=True,
  )
  if "pytorch" in times:
    t_achieved = flops_full / common.median(times["pytorch"])
    print(
      f"achieved: pytorch {t_achieved / 1e9:.1f} GFLOP/s = {100 * t_achieved / peak:.1f}% of "
      f"the jnp matmul peak ({100 * t_achieved / probes['torch'].flops():.1f}% of torch's)",
      flush=True,
    )

  print("", flush=True)
  common.headline("samples_per_s_ours", sps["ours"])
  common.headline("samples_per_s_packed", sps["packed"])
  common.headline("samples_per_s_ours_exact_off", sps["ours_exact_off"])
  if "pytorch" in sps:
    common.headline("samples_per_s_pytorch", sps["pytorch"])
    common.headline("speedup_vs_pytorch", sps["ours"] / sps["pytorch"])
    common.headline("speedup_vs_pytorch_packed", sps["packed"] / sps["pytorch"])
    common.headline("speedup_vs_pytorch_exact_off", sps["ours_exact_off"] / sps["pytorch"])
  common.headline("speedup_exact_on_vs_off", sps["ours"] / sps["ours_exact_off"])
  common.headline("speedup_packed_vs_ours", sps["packed"] / sps["ours"])
  for name in times:
    if name in info["padding"]:
      common.headline(f"padding_fraction_{name}", float(info["padding"][name]))
  common.headline("utilization_untruncated", util)
  common.headline("matmul_peak_gflops", peak / 1e9)


if __name__ == "__main__":
  main()
