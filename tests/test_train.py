"""Training runs end to end: checkpoints, metrics, preemption, exact resume, fallbacks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jax

from configs import tiny
from negclip_jax import checkpoint, train

ROOT = Path(__file__).resolve().parents[1]


def config(**overrides):
  c = tiny.get_config()
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def leaves(params):
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_run_writes_checkpoints_metrics_and_resumes_as_noop(tmp_path):
  out = train.train(config(), tmp_path)
  assert out["step"] == 6 and not out["stopped_early"]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert {"L1", "L2", "L3", "L_neg", "L_orig", "L_text", "total", "samples_per_s"} <= set(rows[0])
  assert list((tmp_path / "tensorboard").iterdir())
  model, params, _ = checkpoint.load_run(tmp_path)
  for a, b in zip(leaves(params), leaves(out["params"])):
    np.testing.assert_array_equal(a, b)
  again = train.train(config(), tmp_path)  # same command again: nothing left to do
  assert again["step"] == 6


def _wait_for(path, proc, timeout=240):
  deadline = time.time() + timeout
  while not path.exists():
    assert proc.poll() is None, proc.communicate()[0]
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def test_sigterm_saves_and_resume_is_bitwise_identical(tmp_path):
  steps = 60
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  cmd = [sys.executable, "-m", "negclip_jax.train", "--config", str(ROOT / "configs/tiny.py"),
         "--workdir", str(tmp_path / "interrupted"), f"--config.total_steps={steps}",
         "--config.save_every=4", "--config.log_every=4"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for(tmp_path / "interrupted" / "checkpoints" / "4", proc)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, output
  stopped = json.loads(output.strip().splitlines()[-1])
  assert stopped["stopped_early"] and 4 <= stopped["step"] < steps
  saved = {int(p.name) for p in (tmp_path / "interrupted" / "checkpoints").iterdir() if p.name.isdigit()}
  assert stopped["step"] in saved
  resumed = train.train(config(total_steps=steps, save_every=4, log_every=4), tmp_path / "interrupted")
  straight = train.train(config(total_steps=steps, save_every=100, log_every=4), tmp_path / "straight")
  assert resumed["step"] == straight["step"] == steps
  for a, b in zip(leaves(resumed["params"]), leaves(straight["params"])):
    np.testing.assert_array_equal(a, b)


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
  train.train(config(), tmp_path)
  for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  out = train.train(config(total_steps=8), tmp_path)
  assert "Checkpoint" in caplog.text and "unreadable" in caplog.text
  assert out["step"] == 8  # resumed from step 4, ran 4..8


def test_non_finite_loss_stops_with_step_and_keeps_good_checkpoints(tmp_path):
  with pytest.raises(train.NonFiniteLossError, match=r"at step \d+"):
    train.train(config(learning_rate=1e30, total_steps=12, save_every=1, log_every=1), tmp_path)
  ckpt = checkpoint.Checkpointer(tmp_path)
  steps = ckpt.manager.all_steps()
  ckpt.close()
  for step in steps:  # every checkpoint on disk was saved before the first bad step
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == step and np.isfinite(r["total"]) for r in rows)


def test_unknown_config_key_is_an_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "negclip_jax.train", "--config",
                         str(ROOT / "configs/tiny.py"), "--workdir", str(tmp_path),
                         "--config.learning_rte=1e-3"], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode != 0 and "learning_rte" in proc.stderr
