"""Shipped configs: names or paths from any directory, a meaning for every key, --help."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from negclip_jax import configs
from negclip_jax.configs import flat_config


def test_every_config_key_has_a_meaning():
  base = flat_config(json.loads(configs.load(configs.BASE).to_json()))
  meanings = configs.meanings()
  assert sorted(k for k in base if not meanings.get(k)) == []
  assert meanings["learning_rate"] == "AdamW peak learning rate"


def test_config_names_resolve_and_unknown_names_fail_in_one_line(tmp_path):
  assert configs.resolve("tiny") == str(configs.DIR / "tiny.py")
  assert configs.resolve("tiny.py:x") == str(configs.DIR / "tiny.py") + ":x"
  own = tmp_path / "mine.py"
  own.write_text("from negclip_jax.configs import tiny\nget_config = tiny.get_config\n")
  assert configs.resolve(str(own)) == str(own)
  assert configs.load(str(own)).to_dict() == configs.load("tiny").to_dict()
  with pytest.raises(
    ValueError,
    match=r"^--config 'tinny' is neither a file nor a shipped "
    r"config name \(.*tiny.*\)$",
  ):
    configs.resolve("tinny")


def test_help_exits_0_with_config_keys_from_any_directory(tmp_path):
  # A config file by path, from a directory outside the repository.
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "negclip_jax.train",
      "--config",
      str(configs.DIR / "ablation_back.py"),
      "--help",
    ],
    cwd=tmp_path,
    env={**os.environ, "PYTHONPATH": str(ROOT)},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr
  assert "--workdir: Run directory" in out.stdout
  assert "defaults of " in out.stdout
  line = next(row for row in out.stdout.splitlines() if row.strip().startswith("--config.layers "))
  assert '"back"' in line and "text blocks" in line


def test_an_unknown_config_name_is_one_line_without_traceback(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "negclip_jax.train",
      "--config",
      "tinny",
      "--workdir",
      str(tmp_path / "run"),
    ],
    cwd=tmp_path,
    env={**os.environ, "PYTHONPATH": str(ROOT)},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert "--config 'tinny' is neither a file nor a shipped config name" in out.stderr
  assert not (tmp_path / "run").exists()
