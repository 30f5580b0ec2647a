"""Shared helpers of the benchmarks: timing, FLOP counting, matmul peak, the PyTorch reference.

Timing: `time_calls` runs `fn` `warmup` times untimed (compilation, allocator and
optimizer-state set-up land there), then `steps` timed calls; callers report the median.
`fn` must block until its work is done (`jax.block_until_ready`, `torch.cuda.synchronize`).

FLOPs (multiply-add = 2 FLOPs; LayerNorm, softmax, activations, embedding gathers and the
optimizer's elementwise work are not counted). One pre-LN transformer block of width d on
n tokens with MLP width m (m = 4d in CLIP) costs per example, forward:

    F_block = W + A,  W = 2·n·(4d² + 2·d·m)  (q, k, v, out projections; fc1, fc2)
                      A = 2·n·(2·n·d)        (q·kᵀ and weights·v)
            = 24·n·d² + 4·n²·d               (m = 4d)

Backward: a matmul x·w costs 2x its forward when both the input gradient and the weight
gradient are needed (trainable block), 1x when only the input gradient is (a frozen block
that sits between the loss and a trainable parameter: no weight gradient is computed). The
attention core A multiplies two activations, so it costs 2x in both cases:

    trainable block backward = 2W + 2A,  frozen block backward = W + 2A.

Blocks below every trainable parameter would need no backward at all; in Omni-NegCLIP the
token/position embeddings are trainable, so every text block is differentiated. The vision
tower is frozen and upstream of nothing trainable: forward only. Patch embedding
(2·P·3p²·d_v per image, P patches of p×p pixels) and the projections (2·d·proj per
pooled vector) are counted.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Sequence

import numpy as np

# ----------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], object], warmup: int, steps: int) -> list[float]:
  """Seconds of each of `steps` calls of `fn`, after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def median(xs: Sequence[float]) -> float:
  return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
  """'median (min-max, n=...)' in seconds, for the log."""
  return f"{median(xs):.3f}s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


# ------------------------------------------------------------------------------ FLOPs


def block_flops(n: int, d: int, m: int) -> tuple[int, int]:
  """(W, A) forward FLOPs per example of one block: weight matmuls, attention core."""
  return 2 * n * (4 * d * d + 2 * d * m), 2 * n * (2 * n * d)


def vision_forward_flops(config) -> int:
  """Per image: patch embedding + blocks + visual projection."""
  v = config.vision
  patches = (v.image_size // v.patch_size) ** 2
  n = patches + 1  # + class token
  w, a = block_flops(n, v.hidden_size, v.intermediate_size)
  conv = 2 * patches * (v.num_channels * v.patch_size**2) * v.hidden_size
  return conv + v.num_hidden_layers * (w + a) + 2 * v.hidden_size * config.projection_dim


def text_forward_flops(config, length: int) -> int:
  """Per text of `length` tokens: blocks + text projection (of the pooled token)."""
  t = config.text
  w, a = block_flops(length, t.hidden_size, t.intermediate_size)
  return t.num_hidden_layers * (w + a) + 2 * t.hidden_size * config.projection_dim


def text_backward_flops(
  config,
  length: int,
  trainable_blocks: Sequence[int],
  embeddings_trainable: bool = True,
  projection_trainable: bool = True,
) -> int:
  """Per text: backward of the text tower for the given trainable blocks (see module doc)."""
  t = config.text
  w, a = block_flops(length, t.hidden_size, t.intermediate_size)
  trainable = set(trainable_blocks)
  lowest = -1 if embeddings_trainable else min(trainable, default=t.num_hidden_layers)
  total = 0
  for i in range(t.num_hidden_layers):
    if i in trainable:
      total += 2 * w + 2 * a
    elif i > lowest:  # a trainable parameter sits below: input gradients only
      total += w + 2 * a
  proj = 2 * t.hidden_size * config.projection_dim
  return total + (2 * proj if projection_trainable else proj)


def train_step_flops(
  config, batch: int, text_length: int, trainable_blocks: Sequence[int], pixels: bool = True
) -> int:
  """Model FLOPs of one Omni-NegCLIP step on `batch` presence + `batch` absence examples.

  4·batch texts (captions, negated, captions, updated) forward + backward; 2·batch images
  forward through the frozen tower when `pixels` (0 with cached image embeddings).
  The loss (a few [B, 2B] matmuls of width proj) is negligible and not counted.
  """
  text = text_forward_flops(config, text_length) + text_backward_flops(
    config, text_length, trainable_blocks
  )
  vision = vision_forward_flops(config) if pixels else 0
  return 4 * batch * text + 2 * batch * vision


def packed_text_step_flops(
  config, rows: int, row_length: int, captions: int, trainable_blocks: Sequence[int]
) -> int:
  """Model FLOPs of a packed step's text part (cached image features): `rows` rows of
  `row_length` tokens through the blocks, forward + backward, with the attention core
  over the whole row (masked across captions, but computed), and the text projection of
  the `captions` pooled vectors, forward + backward."""
  proj = 2 * config.text.hidden_size * config.projection_dim  # forward, per pooled vector
  per_row = (
    text_forward_flops(config, row_length)
    + text_backward_flops(config, row_length, trainable_blocks)
  ) - 3 * proj
  return rows * per_row + captions * 3 * proj


# ------------------------------------------------------------------------ matmul peak


class MatmulProbe:
  """Dense-matmul FLOP/s of this machine: an n×n @ n×n matmul (2·n³ FLOPs), timed repeatedly.

  library="jax": jitted `a @ b` with JAX's default matmul precision, as the model uses;
  library="torch": `torch.mm` (diagnostic: both sides call an optimized GEMM). Call
  `sample(k)` several times during a run (interleaved with the measured work, so a shared
  machine's load affects both alike); `flops()` is 2·n³ / median of every timed call.
  """

  def __init__(
    self, n: int = 2048, dtype: str = "float32", library: str = "jax", device: str = "cpu"
  ):
    self.n, self.times, self.library, self.device = n, [], library, device
    if library == "jax":
      import jax
      import jax.numpy as jnp

      k1, k2 = jax.random.split(jax.random.key(0))
      a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
      b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
      f = jax.jit(lambda a, b: a @ b)
      self._call = lambda: f(a, b).block_until_ready()
    else:
      import torch

      a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
      b = torch.randn(n, n, device=device).to(getattr(torch, dtype))

      def call():
        a @ b
        torch_sync(device)

      self._call = call
    time_calls(self._call, 2, 0)  # compile / warm caches

  def sample(self, k: int = 3) -> None:
    self.times += time_calls(self._call, 0, k)

  def flops(self) -> float:
    return 2 * self.n**3 / median(self.times)


# ----------------------------------------------------------------------------- inputs


def negshapes_texts(batch: int, seed: int = 0, image_size: int = 224) -> dict:
  """NegShapes data for one step: `batch` presence and `batch` absence examples.

  Returns images uint8 [2·batch, S, S, 3] (first half presence, second half absence) and
  the texts: presence captions / negated, absence captions / updated (lists of `batch`).
  Captions are short (about 8-24 tokens), like CC-Neg or COCO captions.
  """
  from negclip_jax.data import negshapes

  data = negshapes.generate_pairs(2 * batch, seed, image_size=image_size)
  p, a = slice(0, batch), slice(batch, 2 * batch)
  return {
    "images": data["images"],
    "presence_caption": data["captions"][p],
    "presence_negated": data["negated"][p],
    "absence_caption": data["captions"][a],
    "absence_updated": data["updated"][a],
  }


def preprocess_images(images: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 [N, S, S, 3] -> normalized float32 NHWC, the model's input."""
  from negclip_jax.model import preprocess

  return preprocess.preprocess_images(list(images), image_size)


def token_lengths(ids: np.ndarray) -> np.ndarray:
  """Per row: index of the last non-zero token + 1."""
  nonzero = ids != 0
  return ids.shape[-1] - np.argmax(nonzero[..., ::-1], axis=-1)


# ---------------------------------------------------------------------- PyTorch side


def torch_device() -> str:
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def setup_torch_threads() -> int:
  """torch.set_num_threads(os.cpu_count()); returns the thread count."""
  import torch

  torch.set_num_threads(os.cpu_count())
  return torch.get_num_threads()


def build_torch_clip(config, params, device: str = "cpu"):
  """transformers.CLIPModel with exactly our `params` (via `negclip_jax.model.convert`)."""
  import torch
  import transformers

  from negclip_jax.model import convert

  hf_config = transformers.CLIPConfig(**convert.config_to_hf(config))
  model = transformers.CLIPModel(hf_config)
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in convert.params_to_state_dict(params).items()}
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [k for k in missing if not k.endswith("position_ids")]
  if missing or unexpected:
    raise RuntimeError(f"torch CLIPModel load: missing {missing[:5]}, unexpected {unexpected[:5]}")
  return model.to(device)


def torch_features(out):
  """`get_*_features` returns a tensor (transformers 4) or an output with pooler_output (5)."""
  import torch

  return out if torch.is_tensor(out) else out.pooler_output


def torch_sync(device: str) -> None:
  if device != "cpu":
    import torch

    torch.cuda.synchronize()


# -------------------------------------------------------------------------- reporting


def machine_description() -> str:
  """One line: CPU model and cores, JAX backend and devices, library versions."""
  import jax

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    load = "load avg %.2f %.2f %.2f" % os.getloadavg()
  except OSError:
    load = "load avg n/a"
  parts = [
    f"{cpu}, {os.cpu_count()} logical CPUs ({load})",
    f"jax {jax.__version__} {jax.default_backend()} x{jax.local_device_count()} "
    f"({jax.devices()[0].device_kind})",
  ]
  try:
    import torch
    import transformers

    parts.append(
      f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
      f"transformers {transformers.__version__}"
    )
  except ImportError:
    pass
  return "; ".join(parts)


def headline(name: str, value: float | int | str) -> None:
  """A `name: value` line, the format the README figures are read from."""
  if isinstance(value, float):
    value = f"{value:.4g}"
  print(f"{name}: {value}", flush=True)
