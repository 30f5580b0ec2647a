r"""Bytes per device of one training step, pmap vs fsdp, from XLA's compiled memory analysis.

python benchmarks/memory.py [--models vit-b-32,vit-l-14,vit-h-14,vit-bigg-14]
    [--batches 128,4096] [--devices 8,32,256] [--layers front]

Nothing is allocated: the step is lowered on `jax.ShapeDtypeStruct`s (random-free abstract
params from `jax.eval_shape`) and compiled for a mesh of fake CPU devices
(`--xla_force_host_platform_device_count`, set here before JAX starts). For each model,
global batch B and device count n (skipped when n does not divide B):

Both steps are `negclip-compile`'s (`negclip_jax.compile.train_step_program`: the step
`negclip-train` builds for the config), compiled for the fake CPU devices instead of a TPU
slice (`negclip-compile` gives the TPU compiler's figures):

  pmap: the per-device step (`train_step.make_train_step` under `jax.shard_map`, what
        `jax.pmap` runs): full state replica, B / n examples per device.
  fsdp: `sharding.fsdp_train_step` on mesh (1, n) (or (n / f, f) with `--fsdp f`): params
        and AdamW moments sharded over n (f), B / n examples per device.

The paper's step: float32, the image tower's features from the cache (`data.image_cache`,
so the frozen tower's weights are held but not run), 77-token texts, text blocks `--layers`
trainable. Columns (GiB per device): `state` = arguments (params + optimizer state + batch),
`temp` = XLA's temporaries (activations, gradients, gathered weights), `peak` = arguments +
outputs - donated aliases + temporaries. CPU compiles schedule differently from TPU/GPU, so
`temp` is indicative; `state` is exact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="vit-b-32,vit-l-14,vit-h-14,vit-bigg-14")
  p.add_argument("--batches", default="128,4096")
  p.add_argument("--devices", default="8,32,256")
  p.add_argument("--layers", default="front")
  p.add_argument(
    "--fsdp", type=int, default=-1, help="fsdp axis size (mesh (n / fsdp, fsdp)); -1: all n devices"
  )
  return p.parse_args(argv)


ARGS = parse_args()
os.environ["JAX_PLATFORMS"] = "cpu"
# No LLVM optimization: buffer assignment (what is measured) is unchanged, compiles are faster.
os.environ["XLA_FLAGS"] = " ".join(
  [
    os.environ.get("XLA_FLAGS", ""),
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    f"--xla_force_host_platform_device_count={max(int(n) for n in ARGS.devices.split(','))}",
  ]
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from negclip_jax import compile as compile_lib
from negclip_jax import configs

GIB = 2**30


def step_config(preset: str, batch: int, parallelism: str):
  """The paper's config (`omni_negclip_vitb32`) with this preset, batch and placement;
  unpacked 77-token texts."""
  c = configs.load("omni_negclip_vitb32")
  c.model, c.batch_size, c.layers, c.parallelism, c.fsdp = (
    preset,
    batch,
    ARGS.layers,
    parallelism,
    ARGS.fsdp,
  )
  c.data.pack_text = False
  return c


def stats(preset: str, batch: int, n: int, parallelism: str) -> dict:
  """GiB per device of `negclip-compile`'s train step, compiled for n fake CPU devices."""
  program = compile_lib.train_step_program(
    step_config(preset, batch, parallelism), jax.devices()[:n]
  )
  m = program.lower().compile().memory_analysis()
  return {
    "state": m.argument_size_in_bytes / GIB,
    "temp": m.temp_size_in_bytes / GIB,
    "peak": compile_lib.peak_bytes(m) / GIB,
  }


def main():
  models = ARGS.models.split(",")
  batches = [int(b) for b in ARGS.batches.split(",")]
  devices = [int(n) for n in ARGS.devices.split(",")]
  print(
    f"JAX {jax.__version__}, {jax.device_count()} fake CPU devices; float32, layers="
    f"{ARGS.layers}, cached image features, 77-token texts; fsdp axis "
    f"{'all devices' if ARGS.fsdp == -1 else ARGS.fsdp}; GiB per device",
    flush=True,
  )
  print(
    "| model | params | global batch | devices | pmap state | pmap temp | pmap peak | "
    "fsdp state | fsdp temp | fsdp peak | compile s |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for preset in models:
    model, params = compile_lib.abstract_model(step_config(preset, batches[0], "pmap"))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    for batch in batches:
      for n in devices:
        if batch % n:
          print(
            f"| {preset} | {count / 1e6:,.0f}M | {batch} | {n} | n/a (batch < devices) |"
            " | | | | | |",
            flush=True,
          )
          continue
        t0 = time.perf_counter()
        pm, fs = (stats(preset, batch, n, kind) for kind in ("pmap", "fsdp"))
        print(
          f"| {preset} | {count / 1e6:,.0f}M | {batch} | {n} | {pm['state']:.2f} | "
          f"{pm['temp']:.2f} | {pm['peak']:.2f} | {fs['state']:.3f} | {fs['temp']:.2f} | "
          f"{fs['peak']:.2f} | {time.perf_counter() - t0:.0f} |",
          flush=True,
        )


if __name__ == "__main__":
  main()
