r"""What installing libtpu (the `tpu` extra) costs a CPU process at start-up.

python benchmarks/libtpu_startup.py --without PYTHON [--with PYTHON] [--repeats 10]

Times fresh Python processes with JAX_PLATFORMS=cpu (as the tests run them), alternating
between an interpreter whose environment has libtpu (`--with`, default: this one) and one
whose environment is the same without it (`--without`; e.g. a venv whose site-packages
links every entry of this one's except `libtpu*`). Two snippets: JAX up to its CPU devices,
and the trainer module's imports (what a `negclip-train` subprocess pays before working).
Prints the median and spread of wall seconds per snippet and environment, and the median
difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPETS = {
  "import jax; jax.devices()": "import jax; jax.devices()",
  "import negclip_jax.train.trainer": "import negclip_jax.train.trainer",
}


def seconds(python: str, code: str) -> float:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  t0 = time.perf_counter()
  subprocess.run([python, "-c", code], check=True, env=env, capture_output=True)
  return time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--with", dest="with_", default=sys.executable)
  p.add_argument("--without", required=True)
  p.add_argument("--repeats", type=int, default=10)
  args = p.parse_args()
  pythons = {"with libtpu": args.with_, "without libtpu": args.without}
  for name, python in pythons.items():
    has = subprocess.run(
      [python, "-c", "import importlib.util as u; print(u.find_spec('libtpu') is not None)"],
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
    print(f"{name}: {python} (libtpu importable: {has})")
  for label, code in SNIPPETS.items():
    seconds(args.with_, code), seconds(args.without, code)  # warm the file cache
    times = {name: [] for name in pythons}
    for _ in range(args.repeats):  # alternate, so load changes hit both alike
      for name, python in pythons.items():
        times[name].append(seconds(python, code))
    for name, ts in times.items():
      print(
        f"{label} | {name}: median {statistics.median(ts):.2f} s "
        f"(min {min(ts):.2f}, max {max(ts):.2f}, n={len(ts)})"
      )
    diffs = [a - b for a, b in zip(times["with libtpu"], times["without libtpu"])]
    print(f"{label} | libtpu adds: median {statistics.median(diffs):+.3f} s per process")


if __name__ == "__main__":
  main()
