"""Fault injection on a finished run's files: flipped checkpoint bytes, every step unreadable,
a torn metrics row, an empty image-cache shard. Each must end in a run that finishes (or
stops with one line) and loses nothing.

One 6-step tiny run (checkpoints 2, 4, 6) is trained once per module; each test works on a
copy of its workdir.
"""

import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import leaves, steps_on_disk, tiny_config

from negclip_jax import rundir
from negclip_jax.train import checkpoint, resume, trainer


def flip_bytes(step_dir: Path, n: int = 64) -> Path:
  """Inverts `n` bytes in the middle of the largest file of a step's `state` (same size)."""
  data_file = max(
    (f for f in (step_dir / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size
  )
  data = bytearray(data_file.read_bytes())
  middle = len(data) // 2
  data[middle : middle + n] = bytes(b ^ 0xFF for b in data[middle : middle + n])
  data_file.write_bytes(bytes(data))
  return data_file


def aside_steps(workdir: Path) -> list[str]:
  return sorted(p.name.split(".")[0] for p in (workdir / rundir.UNREADABLE_DIR).iterdir())


def test_flipped_checkpoint_bytes_are_caught_and_the_run_falls_back(run_copy, base_run, caplog):
  flip_bytes(run_copy / rundir.CHECKPOINTS_DIR / "6")
  out = trainer.train(tiny_config(), run_copy)
  warnings = [r.getMessage() for r in caplog.records if "does not match its checksum" in r.message]
  assert len(warnings) == 1, caplog.text
  assert f"{run_copy}/checkpoints/6 is unreadable" in warnings[0]
  assert "tensor params/" in warnings[0] or "tensor opt_state/" in warnings[0]
  assert aside_steps(run_copy) == ["6"]
  assert out["step"] == 6 and steps_on_disk(run_copy) == [2, 4, 6]
  for a, b in zip(leaves(out["params"]), leaves(base_run[1]["params"])):  # resumed from 4, exact
    np.testing.assert_array_equal(a, b)


def test_flipped_bytes_are_caught_by_every_reader(run_copy, base_run, caplog):
  flip_bytes(run_copy / rundir.CHECKPOINTS_DIR / "6")
  loaded = rundir.load(run_copy)  # negclip-eval --model RUN and negclip-export read this way
  assert loaded.step == 4
  assert "checkpoints/6 is unreadable (ChecksumError" in caplog.text
  with pytest.raises(FileNotFoundError):
    rundir.load(run_copy / rundir.CHECKPOINTS_DIR / "6")
  # An intact step restores bitwise, verified.
  exact = rundir.load(base_run[0])
  assert exact.step == 6
  for a, b in zip(leaves(exact.params), leaves(base_run[1]["params"])):
    np.testing.assert_array_equal(a, b)


def test_digests_do_not_depend_on_sharding_and_see_one_changed_word():
  x = np.arange(24, dtype=np.float32).reshape(6, 4)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  tree = {"a": x, "step": np.int32(3), "b": np.ones(3, np.float16)}
  plain = checkpoint.digests(tree, {"epoch": 1})
  assert checkpoint.digests({**tree, "a": sharded}, {"epoch": 1}) == plain
  changed = x.copy()
  changed[5, 3] = np.nextafter(changed[5, 3], np.inf)
  other = checkpoint.digests({**tree, "a": changed}, {"epoch": 1})
  assert other["state"]["a"] != plain["state"]["a"]
  assert other["state"]["b"] == plain["state"]["b"]
  assert checkpoint.digests(tree, {"epoch": 2})["data"] != plain["data"]


def test_every_step_unreadable_stops_with_one_line_and_keeps_everything(run_copy):
  for step in (2, 4, 6):
    flip_bytes(run_copy / rundir.CHECKPOINTS_DIR / str(step))
  rows_before = (run_copy / rundir.METRICS_FILE).read_text()
  with pytest.raises(resume.ResumeError) as e:
    trainer.train(tiny_config(), run_copy)
  message = str(e.value)
  assert "\n" not in message
  assert f"every checkpoint of {run_copy} is unreadable (steps 2, 4, 6" in message
  assert "--config.restart=true" in message
  assert steps_on_disk(run_copy) == [2, 4, 6]  # nothing moved
  assert (run_copy / rundir.METRICS_FILE).read_text() == rows_before

  out = trainer.train(tiny_config(restart=True), run_copy)
  assert out["step"] == 6 and aside_steps(run_copy) == ["2", "4", "6"]
  backups = list(run_copy.glob(rundir.METRICS_FILE + ".*.bak"))
  assert [b.read_text() for b in backups] == [rows_before]  # the history, kept
  steps = [json.loads(r)["step"] for r in (run_copy / rundir.METRICS_FILE).read_text().splitlines()]
  assert steps == [2, 4, 6]


def test_restart_is_a_resume_neutral_key(run_copy):
  out = trainer.train(tiny_config(restart=True, total_steps=8), run_copy)
  assert out["step"] == 8 and not (run_copy / rundir.UNREADABLE_DIR).exists()


@pytest.mark.parametrize(
  "damage",
  [
    pytest.param(b'{"step": 7, "total"', id="torn"),
    pytest.param(b'{"step": 1, "note": "\xe9t\xe9"}\n', id="latin1"),
  ],
)
def test_a_damaged_metrics_row_is_dropped_with_a_warning_and_the_run_finishes(
  run_copy, damage, caplog
):
  caplog.set_level(logging.WARNING)
  log = run_copy / rundir.METRICS_FILE
  original = log.read_bytes()
  log.write_bytes(original + damage)
  out = trainer.train(tiny_config(total_steps=8), run_copy)
  assert out["step"] == 8
  steps = [json.loads(r)["step"] for r in log.read_text().splitlines()]
  assert steps == [2, 4, 6, 8]
  assert len([r for r in caplog.records if "unreadable row" in r.getMessage()]) == 1
  assert [b.read_bytes() for b in run_copy.glob(rundir.METRICS_FILE + ".*.bak")] == [
    original + damage
  ]
  assert rundir.read_metrics(run_copy)[-1]["step"] == 8


def test_an_empty_or_short_image_cache_shard_is_recomputed(run_copy, caplog):
  shards = sorted((run_copy / rundir.IMAGE_CACHE_DIR).rglob("shard-*.npy"))
  assert shards
  shards[0].write_bytes(b"")
  if len(shards) > 1:
    shards[1].write_bytes(shards[1].read_bytes()[:100])
  out = trainer.train(tiny_config(total_steps=8), run_copy)
  assert out["step"] == 8
  assert "recomputing it" in caplog.text
  assert all(s.stat().st_size > 100 for s in shards)
