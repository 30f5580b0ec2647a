r"""One row of the speed-choice table: the training step of a config compiled by the TPU
compiler for a slice (no TPU needed), with its per-chip bytes, FLOPs and bytes accessed.

python benchmarks/speed_choices.py --config omni_negclip_vitb32 [--config.KEY=VALUE ...] \
    --topology v5e:2x4 [--out row.json] [--sliced_prefetch]

The step is `negclip-compile`'s (`compile.train_step_program`: the step `negclip-train`
builds for the config). Printed (and written to `--out` as JSON): `compile.figures` (the
compiler's `memory_analysis()`, FLOPs, the cost model's `optimal_seconds`) plus the
`bytes accessed` of `cost_analysis()` and a roofline time computed from the compiler's own
counts: max(FLOPs / chip bf16 peak, bytes accessed / chip HBM bandwidth) per chip. The
roofline is ours, not the cost model's: it ignores collectives, overlap and the MXU's
shape efficiency; use it to rank variants, not as a step time. Chip figures: Google Cloud
TPU documentation, system architecture pages (`compile.PEAK_BF16_TFLOPS`, `HBM_GBPS`).

The step is compiled with sliced prefetching off (`compile.NO_SLICED_PREFETCH`; `--sliced_prefetch`
restores the compiler's default): with it on, the cost model's `optimal_seconds` comes back
as (its estimate - 1 s per ConcatBitcast custom call the prefetch slicing inserts), negative
for every step here; with it off the cost model answers (docs/performance.md, "Speed
choices on the TPU compiler").
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from negclip_jax import compile as compile_lib  # noqa: E402
from negclip_jax.train import trainer  # noqa: E402

# HBM bandwidth per chip, GB/s (Google Cloud TPU docs: v4, v5e, v5p, v6e system architecture).
HBM_GBPS = {"v4": 1200, "v5e": 819, "v5p": 2765, "v6e": 1640}
_OUT = flags.DEFINE_string("out", "", "Write the row as JSON here.")
_SLICED_PREFETCH = flags.DEFINE_bool(
  "sliced_prefetch",
  False,
  "Compile with the TPU compiler's sliced prefetch (its default). Off by default here: each "
  "sliced prefetch adds a ConcatBitcast custom call that the cost model cannot price, and "
  "each such op takes 1 s off optimal_seconds (negative totals, no estimate).",
)


def roofline_seconds(flops: float, bytes_accessed: float, generation: str) -> float:
  """max(compute time at the chip's bf16 peak, memory time at its HBM bandwidth), seconds."""
  return max(
    flops / (compile_lib.PEAK_BF16_TFLOPS[generation] * 1e12),
    bytes_accessed / (HBM_GBPS[generation] * 1e9),
  )


_CYCLES = re.compile(r'op_name="([^"]*)".*?"estimated_cycles":"(\d+)"')


def cycles_by_op(hlo_text: str, top: int = 12) -> list[tuple[str, int]]:
  """The compiler's `estimated_cycles` of each scheduled instruction (its backend config),
  summed per JAX op name (metadata, scopes collapsed): where the cost model's time goes."""
  totals: dict[str, int] = {}
  for name, cycles in _CYCLES.findall(hlo_text):
    key = re.sub(
      r"\[[^]]*\]|\d+", "#", name.split("/")[-1] + " @ " + "/".join(name.split("/")[-4:-1])
    )
    totals[key] = totals.get(key, 0) + int(cycles)
  return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def main(argv):
  del argv
  config = flags.FLAGS.config
  tpu = compile_lib.describe_slice(flags.FLAGS.topology, flags.FLAGS.num_slices)
  program = compile_lib.train_step_program(config, tpu.devices, flags.FLAGS.packed_rows)
  print(f"compiling the train step for {tpu.name} ...", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  options = None if _SLICED_PREFETCH.value else compile_lib.NO_SLICED_PREFETCH
  compiled = program.lower().compile(compiler_options=options)
  row = compile_lib.figures(compiled, program.examples, tpu, time.perf_counter() - t0)
  row["compiler_options"] = options or {}
  text = compiled.as_text()
  row["unpriced_concat_bitcasts"] = text.count('custom_call_target="ConcatBitcast"')
  row["estimated_cycles_by_op"] = cycles_by_op(text)
  cost = compile_lib.cost_analysis(compiled)
  row["bytes_accessed_per_chip"] = float(cost.get("bytes accessed", 0.0))
  row["roofline_seconds"] = roofline_seconds(
    row["flops_per_chip"], row["bytes_accessed_per_chip"], tpu.generation
  )
  row["roofline_examples_per_s"] = config.batch_size / row["roofline_seconds"]
  row["slice"] = tpu.name
  row["config"] = {
    k: config.get(k) for k in ("model", "dtype", "parallelism", "batch_size", "layers")
  }
  row["config"]["pack_text"] = config.data.pack_text
  for key in ("attention", "remat"):
    if key in config:
      row["config"][key] = config[key]
  text = json.dumps(row, indent=1)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_enable_compilation_cache", False)
  names = ("config", "topology", "num_slices", "packed_rows", "out", "sliced_prefetch")
  app.run(main, flags_parser=lambda argv: trainer.parse_flags(argv, __doc__, names))
