"""The results JSON: which model, task, protocol, dtype, data files (size, modification
time), negclip_jax version and command line a set of numbers is of, and strict JSON.

Written by `negclip-eval --out` (`eval/cli.py`) and by training's final evaluation
(`rundir.RESULTS_FILE`), both through `document`::

  {"header": {"model", "step", "negclip_jax", "command", "written",
              "tasks": {name: {"task", "protocol", "dtype", "files": {option: {"path",
                        "bytes", "modified"}}}}},
   "results": {name: {metric: value}}}

NaN and infinities (e.g. a wrong-answer share with no wrong answers) are written as null.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import shlex
import sys
from typing import Any, Mapping

from negclip_jax import storage
from negclip_jax.eval import registry


def version() -> str:
  """The installed negclip-jax version ("unknown" when run from a bare checkout)."""
  try:
    return importlib.metadata.version("negclip-jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _utc(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
    timespec="seconds"
  )


def file_facts(path: str | os.PathLike) -> dict:
  """{"path", "bytes" (files; null for a directory), "modified" (UTC ISO time)}; the path
  alone for a name that is not a file or directory (a TFDS name, "negshapes")."""
  facts: dict[str, Any] = {"path": os.fspath(path)}
  try:
    p = storage.path(path)
    if not p.exists():
      return facts
    stat = p.stat()
    facts["bytes"] = None if p.is_dir() else int(stat.length)
    facts["modified"] = _utc(stat.mtime)
  except (OSError, ValueError, NotImplementedError, AttributeError):  # a store without stat
    pass
  return facts


def task_header(task: str, options: Mapping, dtype: str) -> dict:
  """{"task", "protocol" (null for tasks without one), "dtype", "files"} of one run of `task`
  with `options` (as `registry.run_task` takes them)."""
  spec = registry.TASKS[task]
  protocol = (options.get("protocol") or "original") if "protocol" in spec.shared else None
  files = {o: file_facts(options[o]) for o in spec.files if options.get(o) not in (None, "")}
  return {"task": task, "protocol": protocol, "dtype": dtype, "files": files}


def header(
  model: str, tasks: Mapping[str, dict], step: int | None = None, command: list[str] | None = None
) -> dict:
  """The header: `model` as the user named it, its checkpoint `step` (None: not a run),
  `tasks` ({name: `task_header`}), the version and the `command` line (default: this
  process's)."""
  command = command or [os.path.basename(sys.argv[0]), *sys.argv[1:]]
  return {
    "model": os.fspath(model),
    "step": step,
    "negclip_jax": version(),
    "command": shlex.join(command),
    "written": _utc(datetime.datetime.now().timestamp()),
    "tasks": dict(tasks),
  }


def strict(value):
  """`value` with every NaN / infinity (nested in dicts and lists) replaced by None."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Mapping):
    return {k: strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  return value


def document(head: dict, results: Mapping) -> str:
  """The results JSON text (strict: `allow_nan=False`), ending in a newline."""
  body = {"header": strict(head), "results": strict(results)}
  return json.dumps(body, indent=2, allow_nan=False) + "\n"
