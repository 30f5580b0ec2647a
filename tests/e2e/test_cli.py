"""The console scripts as a new user meets them: Ctrl-C, one-line errors, help, compiles."""

import errno
import logging
import subprocess
import sys

import pytest
from absl import flags
from helpers import ROOT, subprocess_env, tiny_config

from negclip_jax import export, rundir
from negclip_jax.eval import cli as eval_cli
from negclip_jax.train import packing, trainer


def test_new_user_script_passes_from_outside_the_repository(tmp_path):
  """scripts/new_user.py: Ctrl-C saves at the interrupted step (twice: stops at once; in
  set-up: one line), and each bad input is one `error:` line naming the file or option."""
  proc = subprocess.run(
    [sys.executable, str(ROOT / "scripts" / "new_user.py"), "--keep", str(tmp_path / "home")],
    cwd=tmp_path,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0 and "all checks passed" in proc.stdout, proc.stdout + proc.stderr
  assert proc.stdout.count("\nok   ") + proc.stdout.startswith("ok   ") >= 11, proc.stdout


@pytest.fixture
def train_flags(tmp_path):
  """Parses negclip-train's flags in this process (the tiny config) for `trainer.main`."""

  def parse(*extra):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(
      [
        "negclip-train",
        "--config",
        str(ROOT / "configs/tiny.py"),
        "--workdir",
        str(tmp_path / "run"),
        *extra,
      ]
    )

  yield parse
  flags.FLAGS.unparse_flags()


def _fail_with(errno_code):
  def write(*args, **kwargs):
    raise OSError(errno_code, "simulated", "/run/export/hf/model.safetensors")

  return write


def test_disk_full_is_one_line_naming_the_saved_checkpoint(train_flags, monkeypatch, capsys):
  train_flags()
  monkeypatch.setattr(export, "export_run", _fail_with(errno.ENOSPC))  # after the last save
  with pytest.raises(SystemExit) as info:
    trainer.main(["negclip-train"])
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert info.value.code == 1 and len(err) == 1, err
  assert "model.safetensors: simulated (the disk is full" in err[0]
  assert err[0].endswith(
    f"saved so far: checkpoint {flags.FLAGS.workdir}/checkpoints/6"
  )  # the last step


def test_read_only_workdir_is_one_line(train_flags, monkeypatch, capsys):
  train_flags()
  monkeypatch.setattr(rundir, "write_model", _fail_with(errno.EROFS))  # in set-up
  with pytest.raises(SystemExit) as info:
    trainer.main(["negclip-train"])
  err = capsys.readouterr().err.strip().splitlines()
  assert info.value.code == 1 and err[-1].startswith("error: /run/export"), err
  assert "read-only file system" in err[-1] and err[-1].endswith("nothing saved yet")
  assert not [line for line in err if "Traceback" in line]


def test_help_names_the_console_scripts_and_defaults(capsys):
  with pytest.raises(SystemExit):
    eval_cli.main(["--help"])
  assert capsys.readouterr().out.startswith("usage: negclip-eval ")
  with pytest.raises(SystemExit):
    export.main(["--help"])
  assert "(default: hf)" in " ".join(capsys.readouterr().out.split())


def test_tiny_run_compiles_the_step_once_and_says_so(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="negclip_jax")
  trainer.train(tiny_config(total_steps=14, log_every=7, save_every=14), tmp_path)
  compiles = [r.getMessage() for r in caplog.records if "compiling the train step" in r.message]
  assert len(compiles) <= 2, compiles
  assert compiles[0].startswith("Step 1: compiling the train step for packed text of ")


def test_rows_near_one_caption_per_row_take_the_full_shape():
  assert packing.batch_rows(26, 32) == packing.batch_rows(30, 32) == 32
  assert packing.batch_rows(9, 32) == packing.ladder_rows(9) == 9
  assert packing.batch_rows(100, 512) == packing.ladder_rows(100)


def test_ctrl_c_in_the_training_loop_saves_in_process(tmp_path, monkeypatch):
  """The loop stops at the step after a Ctrl-C and saves it (the subprocess check is in
  scripts/new_user.py)."""
  calls = {"n": 0}
  original = trainer.Due.after

  def after(run, step, preempt):
    calls["n"] += 1
    if step == 3:
      preempt._handle(2)  # SIGINT, as the watcher thread sees it
    return original(run, step, preempt)

  monkeypatch.setattr(trainer.Due, "after", staticmethod(after))
  out = trainer.train(tiny_config(total_steps=20, save_every=100, log_every=100), tmp_path)
  assert out["stopped_early"] and out["step"] == 3
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3]
