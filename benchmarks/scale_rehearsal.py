#!/usr/bin/env python
"""Scale rehearsal: train a few steps on N generated images, as files and as tar shards, with
the image cache on and off, on 2 simulated hosts; peak RSS per process and wall time.

    python benchmarks/scale_rehearsal.py --sizes 2000,20000

Data per size N: N JPEGs (`--image-px` square, NegShapes-like colour fields), written once
as one file per image with a CC-Neg JSONL (presence) and a NegationCLIP COCO JSON
(absence), and once as webdataset shards of `--per-shard` samples (`.jpg`, `.txt`, `.json`
{"negated", "updated"}). Each run: `launch/local_cluster.sh --processes 2
--devices-per-process 1` training the `tiny` preset for `--steps` steps (global batch
`--batch`), `data.image_cache` on (every image embedded once, each process its block) or
off (the batches read their images). Each process runs under `/usr/bin/time`: its peak
resident set size. The claim checked: peak RSS does not grow with N beyond the per-record
metadata (paths and captions), i.e. no image data is held for the dataset as a whole.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="2000,20000")
  p.add_argument("--image-px", type=int, default=64)
  p.add_argument("--per-shard", type=int, default=1000)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--layouts", default="files,wds")
  p.add_argument("--cache", default="on,off")
  p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
  return p.parse_args(argv)


def write_data(root: Path, n: int, px: int, per_shard: int) -> dict:
  """Both layouts of n images under root; returns {layout: config.data overrides}."""
  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True)
  (root / "shards").mkdir()
  ccneg, coco_images, coco_annotations = [], [], []
  tar = None
  for i in range(n):
    if i % per_shard == 0:
      if tar:
        tar.close()
      tar = tarfile.open(root / "shards" / f"{i // per_shard:05d}.tar", "w")
    colour = rng.integers(0, 256, 3)
    pixels = np.clip(colour + rng.normal(0, 20, (px, px, 3)), 0, 255).astype(np.uint8)
    path = root / "images" / f"{i:07d}.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    caption, negated, updated = f"a photo {i} of colour {colour[0]}", f"no photo {i}", f"not {i}"
    ccneg.append({"image_path": str(path), "caption": caption, "negative_prompt": negated})
    coco_images.append({"id": i, "file_name": path.name})
    coco_annotations.append({"image_id": i, "caption": caption, "updated_caption": updated})
    members = {
      "jpg": path.read_bytes(),
      "txt": caption.encode(),
      "json": json.dumps({"negated": negated, "updated": updated}).encode(),
    }
    for field, data in members.items():
      info = tarfile.TarInfo(f"{i:07d}.{field}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  tar.close()
  (root / "ccneg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ccneg))
  (root / "coco.json").write_text(
    json.dumps({"images": coco_images, "annotations": coco_annotations})
  )
  shards = f"wds:{root}/shards/{{00000..{(n - 1) // per_shard:05d}}}.tar"
  return {
    "files": {
      "data.presence": "ccneg",
      "data.ccneg_path": str(root / "ccneg.jsonl"),
      "data.ccneg_image_root": str(root / "images"),
      "data.ccneg_eval_size": 0,
      "data.absence": "coco_negation",
      "data.coco_json": str(root / "coco.json"),
      "data.coco_image_dir": str(root / "images"),
    },
    "wds": {"data.presence": shards, "data.absence": shards},
  }


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run(workdir: Path, overrides: dict, args) -> dict:
  wrapper = workdir.parent / f"{workdir.name}_python.sh"
  wrapper.write_text(
    f'#!/usr/bin/env bash\nexec /usr/bin/time -f "peak_rss_kb %M" {sys.executable} "$@"\n'
  )
  wrapper.chmod(0o755)
  flags = {
    **overrides,
    "total_steps": args.steps,
    "batch_size": args.batch,
    "save_every": args.steps,
    "log_every": 1,
  }
  cmd = [
    "bash",
    str(ROOT / "launch/local_cluster.sh"),
    "--processes",
    "2",
    "--devices-per-process",
    "1",
    "--port",
    str(free_port()),
    "--",
    "--config",
    str(ROOT / "configs/tiny.py"),
    "--workdir",
    str(workdir),
    *(f"--config.{k}={v}" for k, v in flags.items()),
  ]
  env = {**os.environ, "PYTHON": str(wrapper), "PYTHONPATH": str(ROOT)}
  t0 = time.time()
  proc = subprocess.run(
    cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout
  )
  wall = time.time() - t0
  # Process 1's line is in its log; the launcher's output holds process 0's (and 1's).
  log1 = workdir / "cluster_logs" / "process_1.log"
  p1 = re.findall(r"peak_rss_kb (\d+)", log1.read_text() if log1.exists() else "")
  out = re.findall(r"peak_rss_kb (\d+)", proc.stdout + proc.stderr)
  for x in p1:
    if x in out:
      out.remove(x)
  rss = [int(x) for x in out[-1:] + p1[-1:]]
  if proc.returncode:
    print(proc.stderr[-3000:], file=sys.stderr)
  return {"rc": proc.returncode, "wall_s": wall, "peak_rss_mb": [r / 1024 for r in rss]}


def main(argv=None):
  args = parse_args(argv)
  base = Path(tempfile.mkdtemp(prefix="negclip-rehearsal-"))
  print(f"machine: {os.cpu_count()} CPUs; data and runs under {base}", flush=True)
  rows = []
  for n in [int(x) for x in args.sizes.split(",")]:
    t0 = time.time()
    layouts = write_data(base / f"data_{n}", n, args.image_px, args.per_shard)
    print(f"{n} images written (both layouts) in {time.time() - t0:.0f} s", flush=True)
    for layout in args.layouts.split(","):
      for cache in args.cache.split(","):
        overrides = {**layouts[layout], "data.image_cache": cache == "on"}
        out = run(base / f"run_{n}_{layout}_{cache}", overrides, args)
        rows.append((n, layout, cache, out))
        print(f"{n} {layout} cache={cache}: {out}", flush=True)
  print("\n| images | layout | image cache | rc | wall s | peak RSS MB, process 0, 1 |")
  print("| --- | --- | --- | --- | --- | --- |")
  for n, layout, cache, out in rows:
    rss = ", ".join(f"{r:.0f}" for r in out["peak_rss_mb"])
    print(f"| {n} | {layout} | {cache} | {out['rc']} | {out['wall_s']:.0f} | {rss} |")


if __name__ == "__main__":
  main()
