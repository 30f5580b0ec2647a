"""The workdir lock: one trainer per run directory, stale locks taken over (issue 26 #7)."""

import json
import socket
import subprocess
import time

import pytest
from helpers import ROOT, subprocess_env, tiny_train_cmd

from negclip_jax import rundir


def write_lock(workdir, **fields):
  record = {"host": socket.gethostname(), "pid": 1, "started": "2026-01-01T00:00:00Z"}
  record.update({"heartbeat": time.time(), "token": "theirs", **fields})
  (workdir / rundir.LOCK_FILE).write_text(json.dumps(record))


def dead_pid() -> int:
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path):
  with rundir.WorkdirLock(tmp_path) as first:
    holder = json.loads((tmp_path / rundir.LOCK_FILE).read_text())
    with pytest.raises(rundir.WorkdirInUse) as e:
      rundir.WorkdirLock(tmp_path).acquire()
    message = str(e.value)
    assert "\n" not in message
    assert f"{tmp_path} is in use by another trainer: host {socket.gethostname()}, " in message
    assert f"pid {holder['pid']}, started {holder['started']}" in message
    assert first.held
  assert not (tmp_path / rundir.LOCK_FILE).exists()  # released
  with rundir.WorkdirLock(tmp_path):  # and free again
    pass


def test_negclip_train_is_refused_with_one_line_while_the_workdir_is_locked(tmp_path):
  with rundir.WorkdirLock(tmp_path / "run"):
    proc = subprocess.run(
      tiny_train_cmd(tmp_path / "run"),
      cwd=ROOT,
      env=subprocess_env(),
      capture_output=True,
      text=True,
      timeout=300,
    )
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  assert "in use by another trainer" in lines[0] and f"host {socket.gethostname()}" in lines[0]
  assert not list((tmp_path / "run").glob("checkpoints"))  # nothing started


@pytest.mark.parametrize(
  "fields",
  [
    pytest.param(dict(pid="DEAD"), id="dead-pid-this-host"),
    pytest.param(dict(host="another-host", heartbeat=time.time() - 3600), id="old-other-host"),
  ],
)
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, fields, caplog):
  write_lock(tmp_path, **{k: dead_pid() if v == "DEAD" else v for k, v in fields.items()})
  with rundir.WorkdirLock(tmp_path):
    record = json.loads((tmp_path / rundir.LOCK_FILE).read_text())
    assert record["token"] != "theirs"
  assert "Taking over the stale lock" in caplog.text


def test_a_fresh_lock_of_another_host_is_respected(tmp_path):
  write_lock(tmp_path, host="another-host", pid=4242)
  with pytest.raises(rundir.WorkdirInUse, match="host another-host, pid 4242"):
    rundir.WorkdirLock(tmp_path).acquire()
  assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["token"] == "theirs"


def test_the_holder_refreshes_its_heartbeat(tmp_path):
  with rundir.WorkdirLock(tmp_path, heartbeat_s=0.05):
    first = json.loads((tmp_path / rundir.LOCK_FILE).read_text())["heartbeat"]
    deadline = time.time() + 10
    while json.loads((tmp_path / rundir.LOCK_FILE).read_text())["heartbeat"] == first:
      assert time.time() < deadline
      time.sleep(0.05)
