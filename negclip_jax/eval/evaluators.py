"""Training-time evaluators from `config.evals`, as big_vision's `config.evals`.

`config.evals` maps a name to one evaluator's settings::

  c.evals.negshapes = dict(task="negshapes", every=0, num=500)
  c.evals.ccneg = dict(task="ccneg", every=1000, data="ccneg.pt", image_root="cc3m/")

Keys: `task` (an `registry.TASKS` name; default: the evaluator's name), `every` (steps
between runs; 0 = only at the end), `batch_size` (256), `dtype` ("float32"), and the
task's own options, spelled as `registry.run_task` takes them (`data`, `image_root`, `num`,
`protocol`, ...). `from_config` validates every evaluator (task, options, that its files
exist) before training starts; each runs at its cadence and once at the end, logging
``eval/<name>/<metric>``. The `evaluate` CLI runs the same task code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from negclip_jax import rundir, storage
from negclip_jax.eval import registry, results

_EVALUATOR_KEYS = ("task", "every", "batch_size", "dtype")


class EvalConfigError(ValueError):
  """An evaluator in `config.evals` that cannot run (one line, naming the key)."""


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """One named evaluation: `registry.run_task(task, ..., **options)` every `every` steps."""

  name: str
  task: str
  every: int = 0
  batch_size: int = 256
  dtype: str = "float32"
  options: Mapping = dataclasses.field(default_factory=dict)

  def run(self, model, params, tokenizer, mesh=None) -> dict:
    """{metric: value} of the task on (model, params); `mesh`: params sharded on it (fsdp)."""
    return registry.run_task(
      self.task,
      model,
      params,
      tokenizer,
      batch_size=self.batch_size,
      progress=False,
      dtype=self.dtype,
      mesh=mesh,
      **self.options,
    )

  def header(self) -> dict:
    """What this evaluator's numbers are of (`results.task_header`: task, protocol, dtype,
    data files), for the run's results JSON."""
    return results.task_header(self.task, self.options, self.dtype)

  def log_keys(self, metrics: Mapping) -> dict:
    """{"eval/<name>/<metric>": value} for the metrics log."""
    return {rundir.eval_key(self.name, k): v for k, v in metrics.items()}


def from_config(evals: Mapping) -> list[Evaluator]:
  """The evaluators of `config.evals` ({name: settings}), validated; EvalConfigError names
  the evaluator and key at fault (unknown task or option, missing option, missing file)."""
  out = []
  for name, settings in (evals or {}).items():
    settings = dict(settings)
    where = f"config.evals.{name}"
    task = settings.pop("task", name)
    if task not in registry.TASKS:
      raise EvalConfigError(
        f"{where}.task={task!r} is not a task; choose from {sorted(registry.TASKS)}"
      )
    fixed = {k: settings.pop(k) for k in _EVALUATOR_KEYS[1:] if k in settings}
    spec = registry.TASKS[task]
    allowed = [*spec.files, *spec.shared]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
      raise EvalConfigError(
        f"{where}: task {task!r} takes no option(s) {unknown}; it takes "
        f"{sorted([*_EVALUATOR_KEYS, *allowed])}"
      )
    missing = [o for o in spec.files if settings.get(o) in (None, "")]
    if missing:
      raise EvalConfigError(
        f"{where}: task {task!r} needs {', '.join(missing)} "
        f"({'; '.join(spec.files[o] for o in missing)})"
      )
    for option in spec.files:
      path = os.fspath(settings[option])
      if not (task == "layers" and path == "negshapes") and not storage.path(path).exists():
        raise EvalConfigError(f"{where}.{option}: no such file or directory: {path}")
    if fixed.get("every", 0) < 0:
      raise EvalConfigError(f"{where}.every={fixed['every']} must be >= 0 (0: only at the end)")
    out.append(Evaluator(name, task, options=settings, **fixed))
  return out
