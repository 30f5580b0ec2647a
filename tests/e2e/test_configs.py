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


def test_eval_overrides_create_evaluators():
  argv = ["prog", "--config.evals.cc.task=ccneg", "--config.evals.cc.every", "5", "--x=1"]
  rest, found = configs.split_eval_overrides(argv)
  assert rest == ["prog", "--x=1"]
  config = configs.load("tiny")
  config.evals.negshapes = dict(num=24)
  found += [("negshapes", "num", "48"), ("negshapes", "seed", "3"), ("cc", "data", "a.jsonl")]
  configs.apply_eval_overrides(config, found)
  assert config.evals.cc.to_dict() == {"task": "ccneg", "every": 5, "data": "a.jsonl"}
  assert config.evals.negshapes.to_dict() == {"num": 48, "seed": 3}
  with pytest.raises(ValueError, match=r"--config\.evals\.NAME\.KEY=VALUE"):
    configs.split_eval_overrides(["--config.evals.cc=ccneg"])


def _train(tmp_path, *flags):
  return subprocess.run(
    [sys.executable, "-m", "negclip_jax.train", "--config", "tiny", *flags],
    cwd=tmp_path,
    env={**os.environ, "PYTHONPATH": str(ROOT)},
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_an_evaluator_added_on_the_command_line_is_validated_as_one_from_a_file(tmp_path):
  out = _train(
    tmp_path,
    "--workdir",
    str(tmp_path / "run"),
    "--config.evals.cc.task=ccneg",
    f"--config.evals.cc.data={tmp_path / 'missing.jsonl'}",
    f"--config.evals.cc.image_root={tmp_path}",
  )
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
    f"error: config.evals.cc.data: no such file or directory: {tmp_path / 'missing.jsonl'}"
  )


def test_help_mentions_evals_and_verbosity(tmp_path):
  out = _train(tmp_path, "--help")
  assert out.returncode == 0, out.stderr
  assert "--config.evals.NAME.KEY" in out.stdout and "--verbosity" in out.stdout


def test_every_shipped_config_is_valid():
  from negclip_jax.train import trainer

  assert "omni_negclip_vitb32_tpu" in configs.NAMES
  for name in configs.NAMES:
    trainer.validate_config(configs.load(name))
    assert (configs.DIR.parent.parent / "configs" / f"{name}.py").is_file(), name  # the alias
  bad = configs.load("tiny")
  bad.attention = "flash"
  with pytest.raises(trainer.ConfigError, match=r"config.attention='flash'; choose from"):
    trainer.validate_config(bad)


def test_tpu_config_is_the_papers_run_with_the_speed_choices():
  """`omni_negclip_vitb32_tpu` changes only the accelerator keys of the paper's config, which
  stays float32 (the reproduction default)."""
  base = flat_config(json.loads(configs.load(configs.BASE).to_json()))
  tpu = flat_config(json.loads(configs.load("omni_negclip_vitb32_tpu").to_json()))
  assert set(tpu) == set(base)
  changed = {k: (base[k], tpu[k]) for k in base if base[k] != tpu[k]}
  assert set(changed) <= {"dtype", "parallelism", "attention", "remat", "fsdp"}
  assert changed["dtype"] == ("float32", "bfloat16")
  assert base["dtype"] == "float32" and base["attention"] == "einsum" and base["remat"] is False
