"""What every console script shares: one error boundary, a one-line argparse, the compile
cache, progress bars.

A known fault (a missing or unreadable file, a bad value, a full disk) ends a command with
exactly one ``error: ...`` line on stderr and exit status 1; a wrong command line (argparse)
exits 2 with one line and a pointer to ``--help``. Anything else is a bug and keeps its
traceback. ``NEGCLIP_TRACEBACK=1`` shows the traceback of known faults too. A Ctrl-C that
reaches the boundary (eval, export, demo) is one line and exit status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import re
import sys
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm as tqdm_auto

TRACEBACK_ENV = "NEGCLIP_TRACEBACK"
CACHE_ENV = "NEGCLIP_COMPILATION_CACHE"  # a directory, or 0/off/false to disable
USAGE_EXIT = 2  # argparse's status for a wrong command line
FAULT_EXIT = 1  # a known fault at run time
INTERRUPT_EXIT = 130  # Ctrl-C (128 + SIGINT), as a shell reports it

# Known faults: what a user's files, flags and disks raise. Our own error classes
# (ConfigError, DataError, ResumeError, ...) are ValueErrors.
KNOWN = (OSError, ValueError)
# Faults of a write, whose line says what progress is already saved.
WRITE_FAULTS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO)
_HINTS = {
  errno.ENOSPC: " (the disk is full; free space and rerun the same command)",
  errno.EDQUOT: " (over the disk quota; free space and rerun the same command)",
  errno.EROFS: " (a read-only file system; pass a writable directory)",
  errno.EACCES: " (no permission; pass a writable directory or fix its permissions)",
}


def _disk_full_elsewhere(e: BaseException) -> str | None:
  """The file of a full-disk write that a library reports as another type (tensorstore's
  `ValueError: RESOURCE_EXHAUSTED ... No space left on device`), else None."""
  text = str(e)
  if isinstance(e, OSError) or "No space left on device" not in text:
    return None
  files = re.findall(r'"(/[^"]+|gs://[^"]+)"', text)
  return files[-1] if files else "a file"


def is_write_fault(e: BaseException) -> bool:
  """A full disk, a read-only or unwritable directory: the line names the saved progress."""
  return (isinstance(e, OSError) and e.errno in WRITE_FAULTS) or bool(_disk_full_elsewhere(e))


def one_line(e: BaseException) -> str:
  """The message of `e`; for an OSError its file and strerror on one line, with the fix."""
  if file := _disk_full_elsewhere(e):
    return f"{file}: No space left on device" + _HINTS[errno.ENOSPC]
  if isinstance(e, OSError) and e.strerror:
    where = " ".join(f"{f}" for f in (e.filename, e.filename2) if f is not None)
    text = f"{where}: {e.strerror}" if where else e.strerror
    text += _HINTS.get(e.errno, "")
    return " ".join(text.split())
  return str(e).strip() or type(e).__name__


def boundary(saved: Callable[[], str | None] | None = None, known: tuple = ()):
  """Decorator for a console script's entry point: known faults (`KNOWN` and `known`) -> one
  ``error:`` line.

  `saved()` says what progress is already on disk (e.g. "checkpoint 8 in RUN"); it is
  appended to the line of an OSError (a full disk, a read-only directory)."""

  def wrap(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
      try:
        return fn(*args, **kwargs)
      except KeyboardInterrupt:  # negclip-train saves on Ctrl-C instead (PreemptionWatcher)
        print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(INTERRUPT_EXIT)
      except (*KNOWN, *known) as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
          raise
        message = one_line(e)
        if saved is not None and is_write_fault(e):
          with contextlib.suppress(Exception):
            progress = saved()
            message += f"; saved so far: {progress}" if progress else "; nothing saved yet"
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(FAULT_EXIT)

    return run

  return wrap


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one line (no usage block) naming ``--help``; exit status 2."""

  def error(self, message: str):
    print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


def compilation_cache_dir() -> Path | None:
  """Where JAX keeps compiled programs across runs: $NEGCLIP_COMPILATION_CACHE, or
  $XDG_CACHE_HOME/negclip_jax/jax_cache (~/.cache/...); None when that variable is 0/off."""
  value = os.environ.get(CACHE_ENV, "")
  if value.lower() in ("0", "off", "false", "no"):
    return None
  if value:
    return Path(value).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "negclip_jax" / "jax_cache"


def enable_compilation_cache() -> Path | None:
  """Turns on JAX's persistent compilation cache (`compilation_cache_dir`), unless it is
  disabled or JAX_COMPILATION_CACHE_DIR already chose one -> the directory in use."""
  import jax

  chosen = jax.config.jax_compilation_cache_dir
  if chosen:
    return Path(chosen)
  directory = compilation_cache_dir()
  if directory is None:
    return None
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError:
    return None  # an unwritable home: run without the cache
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return directory


class progress(tqdm_auto):  # noqa: N801 - used as tqdm is
  """`tqdm` that, writing to a file or pipe (a log), does not repeat its last line on close
  (tqdm redraws the bar when it closes, which a terminal overwrites and a log keeps)."""

  def display(self, msg=None, pos=None):
    if msg is None and self.disable and self.n == self.last_print_n and not _isatty(self.fp):
      return True  # closing: the last update already wrote this line
    return super().display(msg, pos)


def _isatty(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False
