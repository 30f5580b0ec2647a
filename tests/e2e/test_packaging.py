"""The wheel: commands, shipped configs and data files, dependencies and extras.

The full clean-venv install (`scripts/check_install.sh EXTRA`, `make install-check`)
downloads the dependencies, so it is a separate check, not part of the test suite.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import ROOT

import negclip_jax


def test_wheel_ships_commands_configs_data_and_declares_extras(tmp_path):
  src = tmp_path / "src"
  package = Path(negclip_jax.__file__).parent  # the repository's, or an installed copy's
  shutil.copytree(package, src / "negclip_jax", ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--no-deps",
      "--no-build-isolation",
      "--no-index",
      "-q",
      str(src),
      "-w",
      str(tmp_path / "dist"),
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("negclip_jax-*.whl")))
  names = set(wheel.namelist())
  for config in (package / "configs").glob("*.py"):
    assert f"negclip_jax/configs/{config.name}" in names
  for data in (
    "assets/bpe_simple_vocab_16e6.txt.gz",
    "assets/zeroshot/templates.json",
    "assets/zeroshot/imagenet_classnames.json",
  ):
    assert f"negclip_jax/{data}" in names
  assert not any(n.startswith(("configs/", "tests/")) for n in names)
  info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
  scripts = wheel.read(info).decode()
  for line in (
    "negclip-train = negclip_jax.train.trainer:cli",
    "negclip-eval = negclip_jax.eval.cli:cli",
    "negclip-export = negclip_jax.export:cli",
    "negclip-demo = negclip_jax.demo:cli",
    "negclip-compile = negclip_jax.compile:cli",
  ):
    assert line in scripts
  metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  requires = [
    row.split(": ", 1)[1] for row in metadata.splitlines() if row.startswith("Requires-Dist")
  ]
  base = [r for r in requires if "extra ==" not in r]
  assert any(r.startswith("jax<0.11,>=0.10.2") or r.startswith("jax>=0.10.2") for r in base)
  assert not any(r.startswith(("torch", "jax[")) for r in base)  # torch is optional
  for extra, wanted in (
    ("tpu", "jax[tpu]"),
    ("cuda12", "jax[cuda12]"),
    ("torch", "torch"),
    ("test", "pytest"),
  ):
    assert any(r.startswith(wanted) and f'extra == "{extra}"' in r for r in requires), extra
