"""How closely our training trajectory follows the original recipe, and the float32 floor.

For each configuration (layers, lr, weight decay, warm-up, steps) prints, per trainable
tensor, |ours - reference| / |reference update| at its worst (the attention key bias left
out: its gradient is analytically zero), for:

  ours_vs_original_f32   ours vs the original recipe on OpenAI's `clip.model` (float32)
  ours_vs_exact_f32      ours in float32 vs the recipe in float64 (transformers' CLIPModel)
  original_vs_exact_f32  the original recipe in float32 vs the same float64 run

The last two show how far float32 rounding alone moves each implementation.

python benchmarks/recipe_parity.py front,1e-4,0.2,2,6 whole,5e-5,0.2,3,10
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import test_recipe as recipe  # noqa: E402  (the PyTorch recipe and our run, as tested)
from flax import traverse_util  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def worst(params, reference, initial, labels) -> tuple[str, float]:
  flat = lambda tree: traverse_util.flatten_dict(tree, sep="/")
  params, reference, initial, labels = map(flat, (params, reference, initial, labels))
  error = {
    p: np.linalg.norm(params[p].astype(np.float64) - reference[p])
    / np.linalg.norm(reference[p] - initial[p])
    for p, label in labels.items()
    if label == "trainable" and not p.endswith("k_proj/bias")
  }
  path = max(error, key=error.get)
  return path, float(error[path])


def main(specs):
  for spec in specs:
    layers, lr, wd, warmup, steps = spec.split(",")
    args = (layers, float(lr), float(wd), int(warmup))
    batches = recipe.make_batches(int(steps), 1)
    print(f"config: layers={layers} lr={lr} weight_decay={wd} warmup={warmup} steps={steps}")

    _, initial, ours, theirs, labels = recipe.train_both(recipe.openai_clip(0), batches, *args)
    print("  ours_vs_original_f32: %.2e (%s)" % worst(ours, theirs, initial, labels)[::-1])

    as64 = [
      {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in b.items()}
      for b in batches
    ]
    with jax.enable_x64(True):
      hf64 = recipe.hf_clip(0)  # initialized in float32, so the same start as hf32
      _, exact = recipe.to_params(recipe.run_original(hf64, as64, *args))
    hf32 = recipe.hf_clip(0)
    hf32.model.float()
    _, initial, ours, theirs, labels = recipe.train_both(hf32, batches, *args)
    print("  ours_vs_exact_f32: %.2e (%s)" % worst(ours, exact, initial, labels)[::-1])
    print("  original_vs_exact_f32: %.2e (%s)" % worst(theirs, exact, initial, labels)[::-1])


if __name__ == "__main__":
  main(sys.argv[1:] or ["front,1e-4,0.2,2,6"])
