"""A new user's first commands, from a directory outside the repository: bad inputs end in
one ``error:`` line naming the file or option and no traceback; Ctrl-C saves and exits 0.

  python scripts/new_user.py [--keep DIR]

Runs the console scripts (`negclip-train`, `-eval`, `-export` beside this Python, else
``python -m``) on the tiny model in a temporary directory, prints one line per check and
exits 1 if any fails. `tests/e2e/test_new_user.py` runs it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULES = {
  "negclip-train": "negclip_jax.train",
  "negclip-eval": "negclip_jax.evaluate",
  "negclip-export": "negclip_jax.export",
}
TINY = ["--config", "tiny", "--config.log_every=1", "--config.save_every=1000"]


def command(name: str) -> list[str]:
  script = Path(sys.executable).parent / name
  return [str(script)] if script.exists() else [sys.executable, "-m", MODULES[name]]


def run(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
  return subprocess.run(
    command(name) + list(args), cwd=cwd, capture_output=True, text=True, timeout=300
  )


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


class Checks:
  def __init__(self):
    self.failed = []

  def expect(self, what: str, ok: bool, detail: str = ""):
    print(f"{'ok  ' if ok else 'FAIL'} {what}" + ("" if ok else f"\n{detail[-3000:]}"), flush=True)
    if not ok:
      self.failed.append(what)

  def one_error(self, what: str, proc, *must_name: str, code: int | None = None):
    """`proc` failed with exactly one `error:` line naming each of `must_name`, no traceback."""
    out = proc.stdout + proc.stderr
    lines = error_lines(proc.stderr)
    ok = (
      proc.returncode != 0
      and (code is None or proc.returncode == code)
      and "Traceback" not in out
      and len(lines) == 1
      and all(name in lines[0] for name in must_name)
    )
    self.expect(f"{what}: {lines[0] if lines else '(no error line)'}", ok, out)


def interrupt(cmd: list[str], cwd: Path, when, signals: int = 1, timeout: float = 240):
  """Starts `cmd`, sends `signals` Ctrl-Cs (SIGINT) once `when(output so far)` holds ->
  (exit status, output)."""
  log = cwd / f"interrupted_{time.monotonic_ns()}.log"
  with open(log, "w") as out:
    proc = subprocess.Popen(
      cmd,
      cwd=cwd,
      stdout=out,
      stderr=subprocess.STDOUT,
      text=True,
      # As from a terminal: a background job (e.g. `make test &`) inherits an ignored SIGINT.
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + timeout
    while not when(log.read_text()) and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.1)
    for _ in range(signals):
      proc.send_signal(signal.SIGINT)
      time.sleep(0.05)
    proc.wait(timeout=timeout)
  return proc.returncode, log.read_text()


def steps_on_disk(workdir: Path) -> list[int]:
  checkpoints = workdir / "checkpoints"
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--keep", help="work in this directory and keep it")
  args = parser.parse_args(argv)
  home = Path(args.keep or tempfile.mkdtemp(prefix="negclip_new_user_")).resolve()
  home.mkdir(parents=True, exist_ok=True)
  c = Checks()
  try:
    # Ctrl-C after the first logged step: a checkpoint at the step it stopped at, exit 0.
    run_dir = home / "run"
    cmd = command("negclip-train") + TINY + ["--workdir", str(run_dir), "--config.total_steps=200"]
    metrics = run_dir / "metrics.jsonl"
    rc, out = interrupt(cmd, home, lambda text: metrics.is_file() and metrics.stat().st_size > 0)
    summary = [json.loads(row) for row in out.splitlines() if row.startswith('{"step"')]
    step = summary[-1]["step"] if summary else None
    c.expect(
      f"Ctrl-C saves: exit {rc}, stopped at step {step}, checkpoints {steps_on_disk(run_dir)}",
      rc == 0
      and "Traceback" not in out
      and "Fatal Python" not in out
      and summary[-1]["stopped_early"]
      and steps_on_disk(run_dir)[-1] == step,
      out,
    )
    # Twice: stops at once, saying so.
    rc, out = interrupt(cmd, home, lambda text: "train:" in text and "it/s" in text, signals=2)
    c.expect(
      f"Ctrl-C twice stops at once: exit {rc}",
      rc == 130
      and "Traceback" not in out
      and "Fatal Python" not in out
      and len(error_lines(out)) == 1,
      out,
    )
    # During set-up (loading, compiling): one line, no traceback, no crash.
    rc, out = interrupt(cmd, home, lambda text: text.startswith("JAX"))
    c.expect(
      f"Ctrl-C in set-up: exit {rc}",
      rc == 130 and "Traceback" not in out and "Fatal Python" not in out,
      out,
    )

    # Bad inputs: one line each.
    work = ["--workdir", str(home / "bad")]
    c.one_error(
      "train --config.init=/nonexistent",
      run("negclip-train", *TINY, *work, "--config.init=/nonexistent", cwd=home),
      "config.init",
      "/nonexistent",
    )
    c.one_error(
      "train data.presence=ccneg without a path",
      run("negclip-train", *TINY, *work, "--config.data.presence=ccneg", cwd=home),
      "config.data.ccneg_path",
    )
    c.one_error(
      "train with a missing ccneg_path file",
      run(
        "negclip-train",
        *TINY,
        *work,
        "--config.data.presence=ccneg",
        f"--config.data.ccneg_path={home}/missing.jsonl",
        f"--config.data.ccneg_image_root={home}",
        cwd=home,
      ),
      "config.data.ccneg_path",
      "missing.jsonl",
    )
    c.one_error(
      "export /nonexistent",
      run("negclip-export", "/nonexistent", "--out", str(home / "x"), cwd=home),
      "/nonexistent",
      code=1,
    )
    c.one_error(
      "eval --task nope",
      run("negclip-eval", "--model", str(run_dir), "--task", "nope", cwd=home),
      "--task",
      "--help",
      code=2,
    )
    c.one_error(
      "eval ccneg without --image-root",
      run(
        "negclip-eval", "--model", str(run_dir), "--task", "ccneg", "--data", "x.jsonl", cwd=home
      ),
      "--image-root",
      code=2,
    )
    hostile = home / "hostile"
    shutil.copytree(run_dir, hostile)
    config = json.loads((run_dir / "model_config.json").read_text())
    config["text"]["num_hidden_layers"] = 1e9
    (hostile / "model_config.json").write_text(json.dumps(config))
    started = time.monotonic()
    proc = run("negclip-eval", "--model", str(hostile), "--task", "negshapes", cwd=home)
    c.one_error(
      f"eval of a model with num_hidden_layers 1e9 ({time.monotonic() - started:.1f} s)",
      proc,
      "model_config.json",
      "num_hidden_layers",
      code=1,
    )

    # A run's export: no Orbax read-only warnings, no library info lines.
    proc = run("negclip-export", str(run_dir), "--out", str(home / "export"), cwd=home)
    c.expect(
      "export of the interrupted run, quietly",
      proc.returncode == 0
      and "read_only" not in proc.stderr
      and "read only" not in proc.stderr
      and "WARNING:absl" not in proc.stderr
      and "Traceback" not in proc.stderr
      and not [row for row in proc.stderr.splitlines() if row.startswith("I1")],
      proc.stdout + proc.stderr,
    )
  finally:
    if not args.keep:
      shutil.rmtree(home, ignore_errors=True)
  print(f"{len(c.failed)} check(s) failed" if c.failed else "all checks passed")
  return 1 if c.failed else 0


if __name__ == "__main__":
  sys.exit(main())
