"""Orbax checkpoints of a training run: save, resume (with fallback), preemption, load for eval.

Layout under `workdir/checkpoints/<step>/`: `state` (params, optimizer state, step; saved
once from the replicated copy), `data` (the input pipeline position and seed, JSON) and
`config` (the run's config, JSON). Every process calls `save`; Orbax writes atomically
(temporary directory, then rename), so a half-written step is never "latest".
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policy

MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"


class Checkpointer:
  """`ocp.CheckpointManager` for TrainState + pipeline position + config."""

  def __init__(self, workdir: str | os.PathLike, save_interval_steps: int = 1000,
               max_to_keep: int = 3, async_save: bool = True):
    self.directory = Path(workdir).absolute() / "checkpoints"
    policies = [save_policy.FixedIntervalPolicy(save_interval_steps),
                save_policy.PreemptionCheckpointingPolicy()]
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data", "config"),
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=save_policy.AnySavePolicy(policies),
            preservation_policy=preservation.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, data_state: dict, config: dict, force: bool = False) -> bool:
    """Saves host copies of `state` (unreplicated) at `step`; async unless disabled."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(jax.device_get(state)),
                              data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config))
    return self.manager.save(step, args=args, force=force)

  def restore_latest(self, abstract_state) -> tuple[Any, dict, int] | None:
    """Restores the newest readable checkpoint -> (state, data_state, step), or None.

    A checkpoint that fails to restore (corrupt files) is skipped with a warning and
    the previous one is tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any failure means "unreadable": fall back
        logging.warning("Checkpoint %s/%d is unreadable (%s: %s); falling back to an earlier "
                        "one.", self.directory, step, type(e).__name__, str(e).splitlines()[0])
        continue
      return restored.state, restored.data, step
    return None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionWatcher:
  """Turns SIGTERM into "save and stop" at the next step, agreed by every process.

  On multi-process runs the decision is all-gathered, so all processes stop at the
  same step; on TPU, Orbax's own preemption sync point is honoured too.
  """

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True

  def should_stop(self, step: int, checkpointer: Checkpointer) -> bool:
    stop = self.requested or checkpointer.manager.reached_preemption(step)
    if jax.process_count() > 1:
      stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
    return stop

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


def load_run(run_dir: str | os.PathLike):
  """Latest params of a training run directory -> (model, params, tokenizer), for evaluation."""
  from negclip_jax import model as model_lib, tokenizer as tokenizer_lib
  run_dir = Path(run_dir).absolute()
  config_file = run_dir / MODEL_CONFIG_FILE
  if not config_file.is_file():
    raise FileNotFoundError(f"{run_dir} has no {MODEL_CONFIG_FILE}: not a negclip_jax run directory")
  config = model_config_from_json(json.loads(config_file.read_text()))
  manager = ocp.CheckpointManager(run_dir / "checkpoints", item_names=("state",),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoints under {run_dir / 'checkpoints'}")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  params = restored.state["params"]
  tok_dir = run_dir / TOKENIZER_DIR
  tokenizer = (tokenizer_lib.ClipTokenizer.from_pretrained(tok_dir) if tok_dir.is_dir()
               else tokenizer_lib.ClipTokenizer())
  return model_lib.CLIP(config), params, tokenizer


def model_config_to_json(config) -> dict:
  import dataclasses
  return dataclasses.asdict(config)


def model_config_from_json(d: dict):
  from negclip_jax import model as model_lib
  return model_lib.CLIPConfig(text=model_lib.TextConfig(**d["text"]),
                              vision=model_lib.VisionConfig(**d["vision"]),
                              projection_dim=d["projection_dim"],
                              logit_scale_init_value=d["logit_scale_init_value"])
