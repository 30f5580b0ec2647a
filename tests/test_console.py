"""The console scripts' shared error boundary, argparse and compilation cache (console.py)."""

import errno
import io
import os
import signal
import time

import jax
import pytest

from negclip_jax import console
from negclip_jax.train import checkpoint


def _exit_line(capsys, fn, code=1) -> str:
  with pytest.raises(SystemExit) as info:
    fn()
  err = capsys.readouterr().err
  assert info.value.code == code, err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  return err.strip()


def test_known_faults_are_one_line_and_unknown_ones_keep_their_traceback(capsys, monkeypatch):
  monkeypatch.delenv(console.TRACEBACK_ENV, raising=False)

  @console.boundary()
  def missing():
    open("/no/such/file.jsonl")

  assert _exit_line(capsys, missing) == "error: /no/such/file.jsonl: No such file or directory"

  @console.boundary()
  def bug():
    raise KeyError("a bug")

  with pytest.raises(KeyError):
    bug()
  monkeypatch.setenv(console.TRACEBACK_ENV, "1")  # known faults show their traceback too
  with pytest.raises(FileNotFoundError):
    missing()


def test_disk_full_and_read_only_name_the_progress_already_saved(capsys):
  def failing(err, saved):
    @console.boundary(saved=lambda: saved)
    def write():
      raise OSError(err, os.strerror(err), "/run/metrics.jsonl")

    return write

  full = _exit_line(capsys, failing(errno.ENOSPC, "checkpoint /run/checkpoints/8"))
  assert full.startswith("error: /run/metrics.jsonl: No space left on device")
  assert "disk is full" in full and full.endswith("saved so far: checkpoint /run/checkpoints/8")
  read_only = _exit_line(capsys, failing(errno.EROFS, None))
  assert "Read-only file system" in read_only and read_only.endswith("nothing saved yet")


def test_argparse_errors_are_one_line_with_a_pointer_to_help(capsys):
  parser = console.ArgumentParser(prog="negclip-eval")
  parser.add_argument("--task", required=True, choices=["a", "b"])
  line = _exit_line(capsys, lambda: parser.parse_args(["--task", "c"]), code=2)
  assert line.startswith("error: argument --task: invalid choice: 'c'")
  assert line.endswith("(see negclip-eval --help)")


def test_compilation_cache_is_on_by_default_and_can_be_disabled(tmp_path, monkeypatch):
  monkeypatch.delenv(console.CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert console.compilation_cache_dir() == tmp_path / "negclip_jax" / "jax_cache"
  monkeypatch.setenv(console.CACHE_ENV, "0")
  assert console.compilation_cache_dir() is None
  monkeypatch.setenv(console.CACHE_ENV, str(tmp_path / "mine"))
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert console.enable_compilation_cache() == tmp_path / "mine"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv(console.CACHE_ENV, "off")
    assert console.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_ctrl_c_requests_a_save_like_sigterm():
  # Python's own handler, as in a fresh process (the watcher leaves an ignored SIGINT alone;
  # earlier tests in the session may leave one behind).
  signal.signal(signal.SIGINT, signal.default_int_handler)
  watcher = checkpoint.PreemptionWatcher()
  try:
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the watcher's thread acts
    deadline = time.monotonic() + 5
    while not watcher.requested and time.monotonic() < deadline:
      time.sleep(0.01)
    assert watcher.requested
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_full_disk_reported_as_another_type_is_a_write_fault(capsys):
  @console.boundary(saved=lambda: "checkpoint /run/checkpoints/4")
  def save():  # what tensorstore raises through Orbax when the disk fills
    raise ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params.x/0.0" in OCDBT database at local file '
      '"/run/checkpoints/6.orbax-checkpoint-tmp/state/": Failed writing: '
      '"/run/checkpoints/6.orbax-checkpoint-tmp/state/d/ab": Failed to write 3383296 bytes '
      "to file 12: No space left on device [os_error_code='28']"
    )

  line = _exit_line(capsys, save)
  assert line == (
    "error: /run/checkpoints/6.orbax-checkpoint-tmp/state/d/ab: No space left on device (the "
    "disk is full; free space and rerun the same command); saved so far: checkpoint "
    "/run/checkpoints/4"
  )


def test_progress_bars_in_a_log_end_with_one_100_percent_line():
  log = io.StringIO()  # not a terminal
  for _ in console.progress(range(3), file=log, mininterval=0):
    pass
  assert log.getvalue().count("100%") == 1, log.getvalue()


def test_ctrl_c_outside_training_is_one_line_and_status_130(capsys):
  @console.boundary()
  def evaluate():
    raise KeyboardInterrupt

  assert _exit_line(capsys, evaluate, code=130) == "error: interrupted (Ctrl-C)"
