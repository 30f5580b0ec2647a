"""What checkpoint checksums cost: save and restore time of a training state (params + both
AdamW moments + step) with and without them, for the tiny and ViT-B/32 presets.

  python benchmarks/checkpoint_checksums.py [--presets tiny,vit-b-32] [--repeats 3]

"with" is `Checkpointer.save` / `restore_latest` as training runs them (synchronous save);
"without" saves the same items minus `checksums` and restores unverified, as a step
written before checksums existed. Prints one markdown row per preset: medians in seconds.
"""

import argparse
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from common import machine_description, median

from negclip_jax.model import clip as model_lib
from negclip_jax.train import checkpoint, optim, param_groups
from negclip_jax.train import step as train_step


def training_state(preset: str):
  model = model_lib.CLIP(model_lib.get_config(preset))
  params = model_lib.init_params(model, jax.random.key(0))
  labels = param_groups.label_params(params, "whole")  # every text block: both moments large
  tx = optim.masked_adamw(labels, lambda step: 1e-5, 0.1, None)
  return train_step.create_train_state(params, tx)


def timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def measure(preset: str, repeats: int) -> dict:
  state = jax.device_put(training_state(preset), jax.devices()[0])  # committed, as restored
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  data = {"epoch": 0, "position": 123, "seed": 0}
  mbytes = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
  times = {
    k: [] for k in ("save_with", "save_without", "restore_with", "restore_without", "digest")
  }
  compile_s = timed(lambda: checkpoint.digests(state, data)["state"])  # once per process
  for r in range(repeats):
    with tempfile.TemporaryDirectory() as tmp:
      ckpt = checkpoint.Checkpointer(
        f"{tmp}/c", f"{tmp}/u", save_interval_steps=1, async_save=False
      )
      times["save_with"].append(timed(lambda: ckpt.save(2 * r + 1, state, data, {}, force=True)))
      plain = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
        config=ocp.args.JsonSave({}),
      )
      times["save_without"].append(
        timed(lambda: ckpt.manager.save(2 * r + 2, args=plain, force=True))
      )
      ckpt.manager.wait_until_finished()
      # restore_latest takes the newest step: 2r+2 has no checksums (unverified), then
      # with it gone, 2r+1 (verified).
      times["restore_without"].append(timed(lambda: ckpt.restore_latest(abstract)[0]))
      ckpt.manager.delete(2 * r + 2)
      times["restore_with"].append(timed(lambda: ckpt.restore_latest(abstract)[0]))
      times["digest"].append(timed(lambda: checkpoint.digests(state, data)["state"]))
      ckpt.close()
  print(preset, {k: [round(t, 3) for t in v] for k, v in times.items()}, flush=True)
  return {
    "preset": preset,
    "MiB": mbytes,
    "compile": compile_s,
    **{k: median(v) for k, v in times.items()},
  }


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--presets", default="tiny,vit-b-32")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  print(machine_description())
  print(
    "| state | MiB | save without | save with | restore without | restore with | digests alone "
    "| digest compile (once per process) |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for preset in args.presets.split(","):
    m = measure(preset, args.repeats)
    print(
      f"| {m['preset']} | {m['MiB']:.0f} | {m['save_without']:.3f} | {m['save_with']:.3f} | "
      f"{m['restore_without']:.3f} | {m['restore_with']:.3f} | {m['digest']:.3f} | "
      f"{m['compile']:.2f} |",
      flush=True,
    )


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
