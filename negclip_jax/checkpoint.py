"""Orbax checkpoints of a training run: save, resume (with fallback), preemption, load for eval.

Layout under `workdir/checkpoints/<step>/`: `state` (params, optimizer state, step; saved
once from the replicated copy), `data` (the input pipeline position and seed, JSON) and
`config` (the run's config, JSON). Every process calls `save`; Orbax writes atomically
(temporary directory, then rename), so a half-written step is never "latest".

Resuming is a contract: the config saved with a checkpoint must match the current one in
every key that shapes the training state or its math (`config_changes`); only the keys in
`STATE_NEUTRAL_KEYS` may change. A step that cannot be read is moved aside to
`workdir/unreadable_checkpoints/<step>.<UTC time>` (kept for inspection) and the previous
one is tried, so rerunning the same command always recovers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policy

from negclip_jax import storage

MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
UNREADABLE_DIR = "unreadable_checkpoints"
# Config keys (dotted) that may change on resume: they do not alter the training state.
STATE_NEUTRAL_KEYS = ("log_every", "save_every", "max_to_keep", "data.cache_dir", "data.pack_text",
                      "parallelism", "fsdp")
STATE_NEUTRAL_PREFIXES = ("evals.",)
# Compared by the caller through the schedule length they imply (see `train.resume_check`).
SCHEDULE_LENGTH_KEYS = ("num_epochs", "total_steps")


class ResumeError(ValueError):
  """The checkpoints in a workdir cannot be continued with this config."""


class _Absent:
  def __repr__(self):
    return "(not recorded)"


_ABSENT = _Absent()


def flat_config(config: dict, prefix: str = "") -> dict:
  """Nested config dict -> {"a.b": value}."""
  out = {}
  for k, v in config.items():
    if isinstance(v, dict):
      out.update(flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


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
    is_neutral = (key in STATE_NEUTRAL_KEYS or key.startswith(STATE_NEUTRAL_PREFIXES)
                  or _ABSENT in change)
    (neutral if is_neutral else breaking)[key] = change
  return breaking, neutral


def ways_forward(workdir: str | os.PathLike) -> str:
  return (f"To keep this config, train in a new --workdir, or start a new run from this run's "
          f"latest parameters (fresh optimizer and schedule): --workdir NEW_DIR "
          f"--config.init={workdir}. To resume, drop the changed flags.")


def mismatch_error(where: str, changes: dict, workdir) -> ResumeError:
  """One line per changed key (saved -> current), then the ways forward."""
  lines = [f"{where} was saved with a different config; these keys change the training state:"]
  lines += [f"  {key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()]
  return ResumeError("\n".join([*lines, ways_forward(workdir)]))


def is_run_dir(path: str | os.PathLike) -> bool:
  """True for a training workdir (model_config.json + checkpoints/)."""
  path = storage.path(path)
  return (path / MODEL_CONFIG_FILE).is_file() and (path / "checkpoints").is_dir()


def _leaf_shapes(tree) -> dict[str, tuple]:
  """{"a/b/c": shape} of a state tree or of its Orbax metadata tree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          tuple(x.shape if hasattr(x, "shape") else np.shape(x)) for path, x in flat}


def _all_processes(flag: bool) -> bool:
  """True iff `flag` is true on every process (one all-gather when multi-process)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


class Checkpointer:
  """`ocp.CheckpointManager` for TrainState + pipeline position + config."""

  def __init__(self, workdir: str | os.PathLike, save_interval_steps: int = 1000,
               max_to_keep: int = 3, async_save: bool = True):
    self.directory = storage.path(workdir) / "checkpoints"
    policies = [save_policy.FixedIntervalPolicy(save_interval_steps),
                save_policy.PreemptionCheckpointingPolicy()]
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                       "data": ocp.JsonCheckpointHandler(),
                                       "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=save_policy.AnySavePolicy(policies),
            preservation_policy=preservation.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, data_state: dict, config: dict, force: bool = False) -> bool:
    """Saves `state` (one global jax.Array per leaf, e.g. `sharding.Fsdp.to_save`) at `step`;
    async unless disabled. Nothing is gathered: each process writes the shards it holds."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config))
    return self.manager.save(step, args=args, force=force)

  def restore_latest(self, abstract_state, check_config: Callable[[dict, int], None] | None = None
                     ) -> tuple[Any, dict, int] | None:
    """Restores the newest readable checkpoint -> (state, data_state, step), or None.

    `abstract_state`: ShapeDtypeStructs with the target shardings (`restore_target` of
    `sharding.Pmap` / `Fsdp`); any mesh, whatever mesh the step was saved from.

    `check_config(saved_config, step)` runs on each readable step first and raises to stop
    (e.g. `ResumeError`); so does a saved state tree that differs from `abstract_state`.
    Unreadable steps (corrupt files) are moved aside once a step restores or none is left.
    """
    unreadable, result = [], None
    for step in sorted(self.manager.all_steps(), reverse=True):
      saved = self._read(step, "config", lambda: self.manager.restore(
          step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
      shapes = None if saved is None else self._read(step, "state metadata", lambda: _leaf_shapes(
          self.manager.item_metadata(step)["state"].tree))
      if shapes is None:
        unreadable.append(step)
        continue
      if check_config is not None:
        check_config(saved, step)
      self._check_tree(step, shapes, _leaf_shapes(abstract_state))
      restored = self._read(step, "state", lambda: self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data=ocp.args.JsonRestore())))
      if restored is None:
        unreadable.append(step)
        continue
      result = restored.state, restored.data, step
      break
    self._move_aside(unreadable)
    return result

  def _read(self, step: int, what: str, read: Callable[[], Any]):
    """read() -> its value, or None (with a warning) if it fails on any process."""
    try:
      value, error = read(), None
    except Exception as e:  # noqa: BLE001 - any failure means "unreadable"
      value, error = None, e
    if _all_processes(error is None):
      return value
    reason = (f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}" if error
              else "failed on another process")
    logging.warning("Checkpoint %s/%d is unreadable (%s: %s); falling back to an earlier one.",
                    self.directory, step, what, reason)
    return None

  def _check_tree(self, step: int, saved: dict, expected: dict):
    if saved == expected:
      return
    differ = sorted(k for k in saved.keys() | expected.keys() if saved.get(k) != expected.get(k))
    raise ResumeError(
        f"{self.directory}/{step}: the saved training state does not match this config's "
        f"({len(differ)} entries differ, first {differ[0]}: saved shape {saved.get(differ[0])}, "
        f"expected {expected.get(differ[0])}); written by another version of negclip_jax? "
        + ways_forward(self.directory.parent))

  def _move_aside(self, steps: list[int]):
    """Renames unreadable step directories into workdir/unreadable_checkpoints/."""
    if not steps:
      return
    aside = self.directory.parent / UNREADABLE_DIR
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if jax.process_index() == 0:
      for step in steps:
        source, target = self.directory / str(step), aside / f"{step}.{stamp}"
        try:
          storage.move_tree(source, target)
        except OSError as e:
          raise ResumeError(f"cannot move unreadable checkpoint {source} aside to {target} "
                            f"({e.strerror}); move it by hand and rerun") from e
        logging.warning("Moved unreadable checkpoint %s to %s (kept for inspection).", source,
                        target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("negclip_jax: unreadable checkpoints moved aside")
    self.manager.reload()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionWatcher:
  """Turns SIGTERM into "save and stop", agreed by every process.

  One process acts at the next step. Multi-process runs agree with one all-gather at
  boundary steps only (log/save steps, where the loop syncs anyway), so the other steps
  keep dispatching asynchronously; Orbax's own preemption sync point (TPU) counts at
  every step, as it is agreed without a collective.
  """

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True

  def should_stop(self, step: int, checkpointer: Checkpointer, boundary: bool) -> bool:
    if checkpointer.manager.reached_preemption(step):
      return True
    if jax.process_count() == 1:
      return self.requested
    return boundary and not _all_processes(not self.requested)

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


def load_run(run_dir: str | os.PathLike, dtype=jnp.float32, step: int | None = None):
  """Params of a training run directory -> (model, params, tokenizer).

  For evaluation, export and `config.init=RUN_DIR`; read-only, so an unreadable step is
  skipped with a warning, not moved aside. `dtype`: the model's compute dtype; `step`:
  that checkpoint (default: the newest readable one, see `read_step`).
  """
  model, tokenizer = run_model(run_dir, dtype)
  _, params, _ = read_step(run_dir, step)
  return model, params, tokenizer


def run_model(run_dir: str | os.PathLike, dtype=jnp.float32):
  """(model, tokenizer) a training run directory describes (no weights read)."""
  from negclip_jax import model as model_lib, tokenizer as tokenizer_lib
  run_dir = storage.path(run_dir)
  config_file = run_dir / MODEL_CONFIG_FILE
  if not config_file.is_file():
    raise FileNotFoundError(f"{run_dir} has no {MODEL_CONFIG_FILE}: not a negclip_jax run directory")
  config = model_config_from_json(json.loads(config_file.read_text()))
  tok_dir = run_dir / TOKENIZER_DIR
  tokenizer = (tokenizer_lib.ClipTokenizer.from_pretrained(tok_dir) if tok_dir.is_dir()
               else tokenizer_lib.ClipTokenizer())
  return model_lib.CLIP(config, dtype=dtype), tokenizer


def read_step(run_dir: str | os.PathLike, step: int | None = None) -> tuple[int, Any, dict]:
  """(step, params, training config JSON) of checkpoint `step` of a run directory, or of
  the newest step that restores; FileNotFoundError if none does."""
  directory = storage.path(run_dir) / "checkpoints"
  manager = ocp.CheckpointManager(
      directory, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                "config": ocp.JsonCheckpointHandler(),
                                "data": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint {directory}/{step} (steps: {sorted(steps)})")
    steps = [step]
  for s in steps:
    try:
      # Onto this process's first device, whatever mesh the step was saved from.
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            manager.item_metadata(s)["state"].tree)
      restored = manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()))
      return s, restored.state["params"], restored.config
    except Exception as e:  # noqa: BLE001 - any failure means "unreadable": fall back
      logging.warning("Checkpoint %s/%d is unreadable (%s); trying an earlier one.", directory,
                      s, type(e).__name__)
  raise FileNotFoundError(f"No readable checkpoints under {directory}"
                          + (f" (steps {steps} failed to restore)" if steps else ""))


def model_config_to_json(config) -> dict:
  import dataclasses
  return dataclasses.asdict(config)


def model_config_from_json(d: dict):
  from negclip_jax import model as model_lib
  return model_lib.CLIPConfig(text=model_lib.TextConfig(**d["text"]),
                              vision=model_lib.VisionConfig(**d["vision"]),
                              projection_dim=d["projection_dim"],
                              logit_scale_init_value=d["logit_scale_init_value"])
