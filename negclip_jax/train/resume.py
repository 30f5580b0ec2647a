"""Resuming is a contract: the config saved with a checkpoint must match the current one in
every key that shapes the training state or its math (`config_changes`); only the keys in
`STATE_NEUTRAL_KEYS` may change. A mismatch is a `ResumeError` that says, one line per
changed key, what changed and the ways forward.
"""

from __future__ import annotations

import os

from negclip_jax.configs import flat_config

# Config keys (dotted) that may change on resume: they do not alter the training state.
STATE_NEUTRAL_KEYS = (
  "log_every",
  "save_every",
  "max_to_keep",
  "restart",
  "data.cache_dir",
  "data.read_threads",
  "data.decode_processes",
  "data.pack_text",
  "parallelism",
  "fsdp",
)
STATE_NEUTRAL_PREFIXES = ("evals.",)
# Compared by the caller through the schedule length they imply (`trainer.resume_check`).
SCHEDULE_LENGTH_KEYS = ("num_epochs", "total_steps")


class ResumeError(ValueError):
  """The checkpoints in a workdir cannot be continued with this config."""


class _Absent:
  def __repr__(self):
    return "(not recorded)"


_ABSENT = _Absent()


def config_changes(saved: dict, current: dict) -> tuple[dict, dict]:
  """(breaking, neutral) changes from `saved` to `current` (JSON config dicts), each
  {dotted key: (saved value, current value)}.

  Neutral: `STATE_NEUTRAL_KEYS` / `_PREFIXES`, and keys only one side has (a key added or
  removed by a newer version of the code, whose default keeps the old behaviour).
  `SCHEDULE_LENGTH_KEYS` are left to the caller.
  """
  old, new = flat_config(saved), flat_config(current)
  breaking, neutral = {}, {}
  for key in sorted(old.keys() | new.keys()):
    if key in SCHEDULE_LENGTH_KEYS or old.get(key, _ABSENT) == new.get(key, _ABSENT):
      continue
    change = (old.get(key, _ABSENT), new.get(key, _ABSENT))
    is_neutral = (
      key in STATE_NEUTRAL_KEYS or key.startswith(STATE_NEUTRAL_PREFIXES) or _ABSENT in change
    )
    (neutral if is_neutral else breaking)[key] = change
  return breaking, neutral


def ways_forward(workdir: str | os.PathLike) -> str:
  return (
    f"To keep this config, train in a new --workdir, or start a new run from this run's "
    f"latest parameters (fresh optimizer and schedule): --workdir NEW_DIR "
    f"--config.init={workdir}. To resume, drop the changed flags."
  )


def mismatch_error(where: str, changes: dict, workdir) -> ResumeError:
  """One line per changed key (saved -> current), then the ways forward."""
  lines = [f"{where} was saved with a different config; these keys change the training state:"]
  lines += [f"  {key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()]
  return ResumeError("\n".join([*lines, ways_forward(workdir)]))
