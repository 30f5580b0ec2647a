"""Resume faults: a changed config, a corrupt final checkpoint, a changed state tree.

One 6-step tiny run (checkpoints 2, 4, 6) is trained once per module; each test works on a
copy of its workdir.
"""

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import optax
import pytest
from flax import traverse_util
from helpers import ROOT, leaves, steps_on_disk, tiny_config, tiny_train_cmd

from negclip_jax import rundir
from negclip_jax.train import resume, trainer


def snapshot(workdir: Path) -> dict:
  """{relative path: (size, mtime)} of every file and folder under `workdir`."""
  return {
    str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
    for p in workdir.rglob("*")
  }


# Representative keys of each kind: model, init, layers, objective and its weights, optimizer,
# schedule, clipping, batch, seed, data source, gathering, dtype, schedule length (shrunk).
STATE_CHANGES = {
  "model": ("tiny", "small"),
  "init": ("", "RUN_DIR"),  # a loadable init: the run directory itself
  "layers": ("front", "whole"),
  "extra_trainable": ([], ["layers/3/layer_norm1"]),
  "objective": ("omni_negclip", "plain_clip"),
  "lambda_text": (1.0, 0.5),
  "margin": (0.9, 0.5),
  "learning_rate": (1e-3, 2e-3),
  "weight_decay": (0.05, 0.1),
  "b2": (0.999, 0.98),
  "warmup_steps": (2, 3),
  "schedule": ("original", "warmup_cosine"),
  "grad_clip_norm": (0.0, 1.0),
  "batch_size": (8, 16),
  "seed": (0, 1),
  "data.negshapes_num": (64, 48),
  "data.on_error": ("raise", "skip"),
  "global_negatives": (True, False),
  "dtype": ("float32", "bfloat16"),
}
CLI_VALUE = {"extra_trainable": ("layers/3/layer_norm1",)}


@pytest.mark.parametrize("key", sorted(STATE_CHANGES))
def test_state_changing_config_stops_before_writing_anything(run_copy, key):
  old, new = STATE_CHANGES[key]
  new = str(run_copy) if new == "RUN_DIR" else new
  before = snapshot(run_copy)
  with pytest.raises(ValueError, match="was saved with a different config") as e:
    trainer.train(tiny_config(**{key: CLI_VALUE.get(key, new)}), run_copy)
  message = str(e.value)
  assert message.startswith(f"{run_copy}/checkpoints/6 was saved with a different config")
  assert f"\n  {key}: {old!r} -> {new!r}\n" in message
  assert "new --workdir" in message and f"--config.init={run_copy}" in message
  assert snapshot(run_copy) == before  # nothing written, moved or deleted
  assert isinstance(e.value, resume.ResumeError)  # the CLI prints it without a traceback


def test_every_changed_key_gets_a_line_and_shrinking_the_schedule_is_a_change(run_copy):
  with pytest.raises(resume.ResumeError) as e:
    trainer.train(tiny_config(grad_clip_norm=1.0, seed=3, total_steps=4), run_copy)
  lines = str(e.value).splitlines()
  assert lines[1:4] == [
    "  grad_clip_norm: 0.0 -> 1.0",
    "  seed: 0 -> 3",
    "  total steps (num_epochs, total_steps): 6 -> 4",
  ]
  assert steps_on_disk(run_copy) == [2, 4, 6]


def test_issue_scenario_clip_and_extend_keeps_the_old_run(run_copy):
  """Issue 13 #1: grad_clip_norm changed and total_steps extended used to restart at 0 and
  queue the old checkpoints for deletion."""
  before = snapshot(run_copy)
  with pytest.raises(resume.ResumeError, match="grad_clip_norm: 0.0 -> 1.0"):
    trainer.train(
      tiny_config(grad_clip_norm=1.0, total_steps=64, save_every=1, max_to_keep=3), run_copy
    )
  assert snapshot(run_copy) == before


def test_state_neutral_changes_resume_and_are_logged(run_copy, caplog, capsys):
  caplog.set_level(logging.INFO, logger="negclip_jax")
  c = tiny_config(log_every=1, save_every=1, max_to_keep=5, layers="0,1", total_steps=8)
  c.evals.shapes = {"task": "negshapes", "num": 16}
  out = trainer.train(c, run_copy)
  assert f"Resuming from {run_copy}/checkpoints/6" in capsys.readouterr().out
  assert out["step"] == 8 and steps_on_disk(run_copy) == [2, 4, 6, 7, 8]
  for key, change in (
    ("log_every", "2 -> 1"),
    ("save_every", "2 -> 1"),
    ("max_to_keep", "3 -> 5"),
    ("evals.shapes.num", "(not recorded) -> 16"),
  ):
    assert f"Resuming with {key} changed: {change}" in caplog.text
  assert "layers" not in caplog.text  # "0,1" is "front" on the 4-layer tiny text tower
  assert "total steps 6 -> 8: the learning-rate schedule is stretched from step 6" in caplog.text


@pytest.mark.parametrize("item", ["state", "config"])
def test_corrupt_final_checkpoint_is_moved_aside_and_a_rerun_recovers(
  run_copy, base_run, item, caplog
):
  """Issue 13 #2: the forced final save used to hit StepAlreadyExistsError on every rerun."""
  corrupted = [f for f in (run_copy / "checkpoints/6" / item).rglob("*") if f.is_file()]
  for f in corrupted:
    f.write_bytes(f.read_bytes()[:3])
  out = trainer.train(tiny_config(), run_copy)
  assert "Checkpoint" in caplog.text and f"/6 is unreadable ({item}" in caplog.text
  assert out["step"] == 6 and steps_on_disk(run_copy) == [2, 4, 6]
  for a, b in zip(leaves(out["params"]), leaves(base_run[1]["params"])):  # exact resume from 4
    np.testing.assert_array_equal(a, b)
  aside = list((run_copy / rundir.UNREADABLE_DIR).iterdir())
  assert [p.name.split(".")[0] for p in aside] == ["6"]
  sizes = [f.stat().st_size for f in (aside[0] / item).rglob("*") if f.is_file()]
  assert sizes == [3] * len(corrupted)  # kept as found
  again = trainer.train(tiny_config(), run_copy)  # and the next rerun finds nothing to do
  assert again["step"] == 6
  rows = (run_copy / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in rows]
  assert steps == [2, 4, 6]  # step 6 retrained and logged once (tiny logs every 2 steps)


def test_every_checkpoint_unreadable_starts_over_keeping_them_only_when_told(run_copy):
  """Issue 26 #4: this used to restart at step 0 silently."""
  for f in (run_copy / "checkpoints").rglob("*"):
    if f.is_file() and "state" in f.parts:
      f.write_bytes(b"")
  with pytest.raises(resume.ResumeError, match="--config.restart=true"):
    trainer.train(tiny_config(), run_copy)
  assert steps_on_disk(run_copy) == [2, 4, 6]
  out = trainer.train(tiny_config(restart=True), run_copy)
  assert out["step"] == 6 and steps_on_disk(run_copy) == [2, 4, 6]
  aside = sorted(p.name.split(".")[0] for p in (run_copy / rundir.UNREADABLE_DIR).iterdir())
  assert aside == ["2", "4", "6"]


def test_changed_state_tree_is_an_error_not_corruption(run_copy, monkeypatch):
  """The same config with a different optimizer state (another code version)."""
  make = trainer.optimizer_from_config
  monkeypatch.setattr(
    trainer,
    "optimizer_from_config",
    lambda *a: optax.chain(optax.clip_by_global_norm(1.0), make(*a)),
  )
  with pytest.raises(
    resume.ResumeError,
    match=r"checkpoints/6: the saved training state "
    r"does not match .*another version of negclip_jax",
  ):
    trainer.train(tiny_config(), run_copy)
  assert steps_on_disk(run_copy) == [2, 4, 6]
  assert not (run_copy / rundir.UNREADABLE_DIR).exists()


def test_new_run_from_a_run_directory(run_copy, base_run, tmp_path):
  """The way forward the error names: --config.init=OLD_WORKDIR in a new workdir."""
  _, params, _ = trainer.load_model(tiny_config(init=str(run_copy)))
  for a, b in zip(leaves(params), leaves(base_run[1]["params"])):
    np.testing.assert_array_equal(a, b)
  out = trainer.train(
    tiny_config(init=str(run_copy), grad_clip_norm=1.0, total_steps=2), tmp_path / "new"
  )
  assert out["step"] == 2
  saved = json.loads((tmp_path / "new/model_config.json").read_text())
  assert saved == json.loads((run_copy / "model_config.json").read_text())


def test_load_model_skips_an_unreadable_latest_step(run_copy, base_run, caplog):
  for f in (run_copy / "checkpoints/6/state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  _, params, _ = rundir.load_model(run_copy)
  assert "checkpoints/6 is unreadable" in caplog.text
  assert steps_on_disk(run_copy) == [2, 4, 6]  # read-only: nothing moved
  final = leaves(base_run[1]["params"])
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(params), final))  # step 4's


def test_cli_prints_the_mismatch_without_a_traceback(run_copy):
  proc = subprocess.run(
    tiny_train_cmd(run_copy, "--config.grad_clip_norm=1.0"),
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  error, change, ways = proc.stderr.strip().splitlines()[-3:]
  assert error.startswith(f"error: {run_copy}/checkpoints/6 was saved with a different config")
  assert change == "  grad_clip_norm: 0.0 -> 1.0" and f"--config.init={run_copy}" in ways


BEFORE_REDESIGN = ROOT / "tests" / "fixtures" / "run_written_before_redesign"


def test_a_run_written_before_the_package_redesign_resumes_where_it_would_have_gone(
  tmp_path, capsys
):
  """Checkpoint 2 of a tiny run written by the code before the package moved (commit
  c613cb4; see expected_step_4.json) resumes here and ends where that code's uninterrupted
  run ended at step 4 (per-leaf sums, sums of squares and first entries)."""
  run = tmp_path / "run"
  shutil.copytree(BEFORE_REDESIGN, run)
  out = trainer.train(tiny_config(total_steps=4, save_every=2, log_every=1, max_to_keep=5), run)
  assert out["step"] == 4 and not out["stopped_early"]
  assert f"Resuming from {run}/checkpoints/2" in capsys.readouterr().out
  expected = json.loads((BEFORE_REDESIGN / "expected_step_4.json").read_text())["step_4_params"]
  flat = traverse_util.flatten_dict(out["params"], sep="/")
  assert sorted(flat) == sorted(expected)
  for key, value in flat.items():
    if key.endswith("k_proj/bias"):  # analytically zero gradient: Adam amplifies float noise
      continue
    v = np.asarray(value, np.float64)
    want = expected[key]
    np.testing.assert_allclose(
      [v.sum(), np.square(v).sum(), v.reshape(-1)[0]],
      [want["sum"], want["sum_sq"], want["first"]],
      rtol=1e-5,
      atol=1e-6,
      err_msg=key,
    )
  assert [r["step"] for r in rundir.read_metrics(run)] == [1, 2, 3, 4]
