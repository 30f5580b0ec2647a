r"""Bytes per device of one training step, pmap vs fsdp, from XLA's compiled memory analysis.

python benchmarks/memory.py [--models vit-b-32,vit-l-14,vit-h-14,vit-bigg-14]
    [--batches 128,4096] [--devices 8,32,256] [--layers front]

Nothing is allocated: the step is lowered on `jax.ShapeDtypeStruct`s (random-free abstract
params from `jax.eval_shape`) and compiled for a mesh of fake CPU devices
(`--xla_force_host_platform_device_count`, set here before JAX starts). For each model,
global batch B and device count n (skipped when n does not divide B):

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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from negclip_jax.model import clip as model_lib
from negclip_jax.train import optim, param_groups, sharding
from negclip_jax.train import step as train_step

GIB = 2**30
TEXT_KEYS = (
  "presence_caption_ids",
  "presence_negated_ids",
  "absence_caption_ids",
  "absence_updated_ids",
)


def abstract_setup(preset: str, layers: str):
  """(model, labels, tx, abstract state) for `preset`, nothing allocated."""
  model = model_lib.CLIP(model_lib.get_config(preset))
  params = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))
  labels = param_groups.label_params(params, layers)
  tx = optim.make_optimizer(labels)
  state = jax.eval_shape(lambda p: train_step.create_train_state(p, tx), params)
  return model, labels, tx, state


def abstract_batch(config, batch: int) -> dict:
  length = config.text.max_position_embeddings
  out = {k: jax.ShapeDtypeStruct((batch, length), jnp.int32) for k in TEXT_KEYS}
  for prefix in ("presence", "absence"):
    out[f"{prefix}_image_emb"] = jax.ShapeDtypeStruct((batch, config.projection_dim), jnp.float32)
  return out


def stats(compiled) -> dict:
  m = compiled.memory_analysis()
  args, temp = m.argument_size_in_bytes, m.temp_size_in_bytes
  return {
    "state": args / GIB,
    "temp": temp / GIB,
    "peak": (args + m.output_size_in_bytes - m.alias_size_in_bytes + temp) / GIB,
  }


def pmap_memory(model, labels, tx, state, batch: int, n: int) -> dict:
  mesh = Mesh(np.asarray(jax.devices()[:n]), (train_step.AXIS,))
  step = train_step.shard_map_train_step(train_step.make_train_step(model, labels, tx), mesh)
  replicated = sharding.with_shardings(
    state, jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
  )
  b = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, P(train_step.AXIS))
    ),
    abstract_batch(model.config, batch),
  )
  return stats(step.lower(replicated, b).compile())


def fsdp_memory(model, labels, tx, state, batch: int, n: int) -> dict:
  mesh = sharding.make_mesh(n if ARGS.fsdp == -1 else ARGS.fsdp, jax.devices()[:n])
  fsdp = sharding.Fsdp(mesh)
  step = fsdp.compile(train_step.make_train_step(model, labels, tx, **fsdp.step_options), state)
  b = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh)),
    abstract_batch(model.config, batch),
  )
  return stats(step.lower(fsdp.restore_target(state), b).compile())


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
    model, labels, tx, state = abstract_setup(preset, ARGS.layers)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
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
        pm = pmap_memory(model, labels, tx, state, batch, n)
        fs = fsdp_memory(model, labels, tx, state, batch, n)
        print(
          f"| {preset} | {count / 1e6:,.0f}M | {batch} | {n} | {pm['state']:.2f} | "
          f"{pm['temp']:.2f} | {pm['peak']:.2f} | {fs['state']:.3f} | {fs['temp']:.2f} | "
          f"{fs['peak']:.2f} | {time.perf_counter() - t0:.0f} |",
          flush=True,
        )


if __name__ == "__main__":
  main()
