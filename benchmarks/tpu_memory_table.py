r"""The TPU compiler's per-chip memory of the training step, preset x batch x slice x placement.

python benchmarks/tpu_memory_table.py [--out benchmarks/tpu_memory_rows.jsonl]
    [--models vit-b-32,...] [--batches 128,4096] [--slices v5e-256,v5e-8,...]
    [--modes fsdp,pmap] [--timeout 1800] [--redo_before 2026-12-03T06:00:00Z]
python benchmarks/tpu_memory_table.py --markdown [--out ...]

One `negclip-compile --programs train --json --nofixes --nocost_model` process per row
(bytes only: the cost model's time would take a second compile per row; the paper's
config `omni_negclip_vitb32` with `--config.model`, `--config.batch_size` and
`--config.parallelism` set; compiles take minutes on 2 cores, and one process per row keeps
a slow or failing row from holding the others). Each finished row is appended to `--out`
as one JSON line at once, so the matrix can be stopped and resumed: rows already in the
file are skipped (`--redo_before T`: except those finished before T, compiled again; the
last line of a row wins). Rows run in the order of the questions a user asks first (does preset X
at the pod batch fit a v5e-256 under fsdp; does the paper's batch fit a v5e-8; v4-8 and
v6e-8; then the rest), smallest preset first within each group. A row whose global batch
the slice's chips do not divide is not a configuration and is not run. Needs the `tpu`
extra (libtpu), no TPU; `--slices h100-8` (8 H100s, `negclip-compile --gpu h100`) needs
JAX's CUDA plugin instead (the `cuda12` extra), no GPU.

`--markdown` prints the table for docs/performance.md from `--out`: every row of the
matrix, compiled or "not compiled" (never estimated). A row the compiler refused for want of
HBM is DOES NOT FIT with the bytes it named (`compile.parse_refusal`; also for error rows
recorded before negclip-compile reported refusals).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from negclip_jax import compile as compile_lib  # noqa: E402

CONFIG = "omni_negclip_vitb32"
MODELS = ("vit-b-32", "vit-l-14", "vit-h-14", "vit-bigg-14")
BATCHES = (128, 4096)
# Accelerator type -> (negclip-compile's target flags, chips); v4 as megacore (one device per
# chip: v4-8 is 4 chips). h100-8 (not run by default): 8 H100s through JAX's CUDA plugin,
# which the interpreter must see (e.g. PYTHONPATH naming a folder holding jax_cuda12_plugin).
SLICES = {
  "v5e-8": (("--topology=v5e:2x4",), 8),
  "v5e-32": (("--topology=v5e:4x8",), 32),
  "v5e-256": (("--topology=v5e:16x16",), 256),
  "v4-8": (("--topology=v4:2x2x1",), 4),
  "v6e-8": (("--topology=v6e:2x4",), 8),
  "h100-8": (("--gpu=h100", "--gpus=8"), 8),
}
TPU_SLICES = ("v5e-8", "v5e-32", "v5e-256", "v4-8", "v6e-8")
MODES = ("fsdp", "pmap")
GIB = 2**30


def value_order(models, batches, slices, modes) -> list[tuple]:
  """Every (model, batch, slice, mode) of the matrix, the questions users ask first first."""
  groups = [
    (4096, ("v5e-256",), ("fsdp",)),  # the pod question
    (128, ("v5e-8",), ("pmap", "fsdp")),  # the paper's batch on the smallest v5e slice
    (128, ("v4-8", "v6e-8"), ("pmap", "fsdp")),
    (128, ("v5e-32",), ("fsdp", "pmap")),
    (4096, ("v5e-256",), ("pmap",)),
    (4096, ("v5e-32", "v5e-8", "v6e-8", "v4-8"), ("fsdp", "pmap")),
  ]
  out = []
  for batch, group_slices, group_modes in groups:
    for s in group_slices:
      for mode in group_modes:
        for model in models:
          row = (model, batch, s, mode)
          if batch in batches and s in slices and mode in modes and row not in out:
            out.append(row)
  # Anything the groups missed (none for the defaults), in matrix order.
  for model in models:
    for batch in batches:
      for s in slices:
        for mode in modes:
          if (model, batch, s, mode) not in out:
            out.append((model, batch, s, mode))
  return [r for r in out if r[1] % SLICES[r[2]][1] == 0]


def key(row: dict) -> tuple:
  return (row["model"], row["batch"], row["slice"], row["parallelism"])


def load(path: str) -> dict:
  """{(model, batch, slice, mode): row} of the JSONL file (empty when missing)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {key(r): r for r in rows}


def command(model: str, batch: int, slice_name: str, mode: str) -> list[str]:
  return [
    "negclip-compile",
    f"--config={CONFIG}",
    f"--config.model={model}",
    f"--config.batch_size={batch}",
    f"--config.parallelism={mode}",
    *SLICES[slice_name][0],
    "--programs=train",
    "--nofixes",
    "--nocost_model",
    "--json",
  ]


def compile_row(model, batch, slice_name, mode, timeout: float) -> dict:
  """Runs one `negclip-compile` process -> the JSONL row (status ok, error or timeout)."""
  cmd = command(model, batch, slice_name, mode)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  row = {"model": model, "batch": batch, "slice": slice_name, "parallelism": mode}
  row["command"] = " ".join(cmd)
  t0 = time.perf_counter()
  try:
    p = subprocess.run(
      [sys.executable, "-m", "negclip_jax.compile", *cmd[1:]],
      capture_output=True,
      text=True,
      timeout=timeout,
      env=env,
      cwd=ROOT,
    )
  except subprocess.TimeoutExpired:
    return {**row, "status": "timeout", "wall_s": round(time.perf_counter() - t0)}
  row["wall_s"] = round(time.perf_counter() - t0)
  try:  # exit 1 with the JSON object is "does not fit"; anything else is an error
    result = json.loads(p.stdout)
  except json.JSONDecodeError:
    lines = (p.stderr or p.stdout).strip().splitlines() or [f"exit status {p.returncode}"]
    return {**row, "status": "error", "error": lines[-1]}
  return {**row, "status": "ok", "result": result}


def program_row(row: dict) -> dict | None:
  """The train step's `negclip-compile` figures of a JSONL row; for an error row that is
  the compiler's out-of-memory refusal (rows compiled before negclip-compile reported it),
  the refused figures `compile.refused` gives; None for any other error or timeout."""
  if row["status"] == "ok":
    return row["result"]["programs"][0]
  refusal = row["status"] == "error" and compile_lib.parse_refusal(row["error"])
  if not refusal:
    return None
  flag, target = SLICES[row["slice"]][0][0].lstrip("-").split("=")
  hbm = (
    compile_lib.gpu_memory_bytes(target)
    if flag == "gpu"
    else compile_lib.HBM_GIB[target.split(":")[0]] * GIB
  )
  return {"program": "train step", **compile_lib.refused(refusal, hbm, None)}


def text_form(row: dict, r: dict) -> str:
  """The train step's text batch as negclip-compile recorded it; rows written before it did
  (all finished by 2026-12-03T05:02Z): "packed*" under pmap (the only form the paper's
  config compiled there), "not recorded*" under fsdp (packing came to fsdp meanwhile)."""
  if "text" in r:
    return r["text"]
  return "packed*" if row["parallelism"] == "pmap" else "not recorded*"


def summary(row: dict) -> str:
  r = program_row(row)
  if r is None:
    return row["status"] + (f": {row['error']}" if "error" in row else "")
  peak = compile_lib.memory_columns(r)[2]
  return (
    f"peak {peak} of {r['hbm_bytes'] // GIB} GiB {compile_lib.fit_text(r)} "
    f"(compile {r['compile_s'] or 0:.0f} s)"
  )


def run_matrix(args) -> None:
  rows = value_order(args.models, args.batches, args.slices, args.modes)
  done = load(args.out)
  redo = lambda r: args.redo_before and done[r].get("finished", "") < args.redo_before
  todo = [r for r in rows if r not in done or redo(r)]
  print(
    f"{len(rows)} rows, {len(rows) - len(todo)} in {args.out}, {len(todo)} to compile", flush=True
  )
  for i, (model, batch, s, mode) in enumerate(todo, 1):
    print(f"[{i}/{len(todo)}] {model} batch {batch} {s} {mode} ...", end=" ", flush=True)
    row = compile_row(model, batch, s, mode, args.timeout)
    row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(args.out, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(f"{summary(row)} [{row['wall_s']} s wall]", flush=True)


def _gib(n: int) -> str:
  return f"{n / GIB:.3f}" if n < 0.1 * GIB else f"{n / GIB:.2f}"


def markdown(args) -> str:
  """The docs table of the compiled rows (value order), then every other row of the matrix
  as "not compiled" (stopped, failed or not reached), grouped by batch, slice and placement."""
  done = load(args.out)
  lines = [
    "| model | global batch | slice (chips) | placement | text | per chip batch | arguments "
    "| temporaries | peak | fits | TFLOP per chip | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  missing = {}  # (batch, slice, mode) -> ["model (why)"]
  for model, batch, s, mode in value_order(args.models, args.batches, args.slices, args.modes):
    row = done.get((model, batch, s, mode))
    r = None if row is None else program_row(row)
    if r is None:
      if row is None:
        note = ""
      elif row["status"] == "timeout":
        note = f" (stopped after {row['wall_s']} s)"
      else:
        note = f" (error: {row['error']})"
      missing.setdefault((batch, s, mode), []).append(model + note)
      continue
    target, chips = SLICES[s]
    where = f"{target[0].split('=')[1]}, {chips}" if s in TPU_SLICES else f"{chips} GPUs"
    hbm = r["hbm_bytes"] // GIB
    if "refusal" in r:  # the compiler's figure: the temporaries (the peak is at least that)
      memory = compile_lib.memory_columns(r)
      fit = f"**DOES NOT FIT** ({hbm}; refused by the compiler)"
    else:
      memory = (_gib(r["argument_bytes"]), _gib(r["temp_bytes"]), _gib(r["peak_bytes"]))
      fit = f"FITS ({hbm})" if r["fits"] else f"**DOES NOT FIT** ({hbm})"
    flops = r.get("flops_per_chip")
    tflop = "no figure" if flops is None else f"{flops / 1e12:.3g}"
    compile_s = "no figure" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
    lines.append(
      f"| {model} | {batch} | {s} ({where}) | {mode} | {text_form(row, r)} | {batch // chips} | "
      f"{' | '.join(memory)} | {fit} | {tflop} | {compile_s} |"
    )
  if missing:
    lines += ["", "Not compiled (no figure):", ""]
    for (batch, s, mode), models in missing.items():
      lines.append(f"- batch {batch}, {s}, {mode}: {', '.join(models)}")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "tpu_memory_rows.jsonl"))
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--batches", default=",".join(map(str, BATCHES)))
  p.add_argument("--slices", default=",".join(TPU_SLICES), help=f"of {','.join(SLICES)}")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--timeout", type=float, default=1800, help="seconds per row")
  p.add_argument("--markdown", action="store_true", help="print the docs table from --out")
  p.add_argument(
    "--redo_before",
    default="",
    help="also compile again the selected rows finished before this UTC time "
    "(2026-12-03T06:00:00Z); the file's last line of a row wins",
  )
  args = p.parse_args(argv)
  args.models = args.models.split(",")
  args.batches = [int(b) for b in args.batches.split(",")]
  args.slices = args.slices.split(",")
  args.modes = args.modes.split(",")
  unknown = sorted(set(args.slices) - set(SLICES))
  if unknown:
    p.error(f"--slices {','.join(unknown)}: known slices are {','.join(SLICES)}")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.markdown:
    print(markdown(args))
  else:
    run_matrix(args)


if __name__ == "__main__":
  main()
