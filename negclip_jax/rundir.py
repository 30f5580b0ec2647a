"""The run directory: every file a training run writes, its metrics log, and loading a model
from anything a user may name.

WORKDIR/ (local or ``gs://``)::

  checkpoints/<step>/        Orbax steps: state, data position, config (`train/checkpoint.py`)
  unreadable_checkpoints/    steps that failed to restore, moved aside for inspection
  model_config.json          the model's `CLIPConfig` (`clip.config_to_dict`)
  tokenizer/                 the tokenizer's files
  metrics.jsonl              one JSON row per logged step: {"step", metric: value, ...};
                             evaluators log ``eval/<name>/<metric>`` (`eval_key`)
  tensorboard/               the same rows as TensorBoard events
  skipped.jsonl              the records `data.on_error=skip` left out, one JSON line each
  results.json               the final evaluation with its header (`eval/results.py`)
  image_cache/               frozen-tower image features (unless `data.cache_dir` is set)
  export/hf/                 the finished run's Hugging Face export with its model card

`load(source)` reads a model from a run directory (its newest readable step), one of its
steps (``RUN/checkpoints/STEP``), or anything `convert.load_pretrained` reads (HF
directory, OpenAI/open_clip checkpoint, hub id); training's `config.init`, `negclip-eval
--model` and `negclip-export` all load through it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from negclip_jax import storage
from negclip_jax.model import clip as model_lib
from negclip_jax.model import convert
from negclip_jax.model.tokenizer import ClipTokenizer
from negclip_jax.train import checkpoint

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
SKIPPED_FILE = "skipped.jsonl"
RESULTS_FILE = "results.json"
IMAGE_CACHE_DIR = "image_cache"
EXPORT_DIR = "export/hf"
EVAL_PREFIX = "eval/"


def is_run_dir(path: str | os.PathLike) -> bool:
  """True for a training workdir (model_config.json + checkpoints/)."""
  path = storage.path(path)
  return (path / MODEL_CONFIG_FILE).is_file() and (path / CHECKPOINTS_DIR).is_dir()


def write_model(workdir: epath.Path, model_config: model_lib.CLIPConfig, tokenizer) -> None:
  """model_config.json and tokenizer/: what `run_model` reads back."""
  (workdir / MODEL_CONFIG_FILE).write_text(
    json.dumps(model_lib.config_to_dict(model_config), indent=2)
  )
  tokenizer.save_pretrained(workdir / TOKENIZER_DIR)


def run_model(run_dir: str | os.PathLike, dtype=jnp.float32):
  """(model, tokenizer) a training run directory describes (no weights read)."""
  run_dir = storage.path(run_dir)
  config_file = run_dir / MODEL_CONFIG_FILE
  if not config_file.is_file():
    raise FileNotFoundError(
      f"{run_dir} has no {MODEL_CONFIG_FILE}: not a negclip_jax run directory"
    )
  config = model_lib.config_from_dict(convert.read_json_object(config_file), str(config_file))
  tok_dir = run_dir / TOKENIZER_DIR
  tokenizer = ClipTokenizer.from_pretrained(tok_dir) if tok_dir.is_dir() else ClipTokenizer()
  return model_lib.CLIP(config, dtype=dtype), tokenizer


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A model with its params and tokenizer; for a training run also where it came from."""

  model: model_lib.CLIP
  params: Any
  tokenizer: ClipTokenizer
  run_dir: epath.Path | None = None  # set when loaded from a training run
  step: int | None = None
  run_config: dict | None = None  # the training config JSON saved with that step


def load(source: str | os.PathLike, dtype=jnp.float32, step: int | None = None) -> Loaded:
  """The model `source` names: a run directory (checkpoint `step`, default its newest
  readable one), a run's ``checkpoints/STEP`` directory, or anything
  `convert.load_pretrained` reads (local or ``gs://``). `dtype`: the compute dtype."""
  path = storage.path(source)
  if path.parent.name == CHECKPOINTS_DIR and path.name.isdigit():
    run_dir, step = path.parent.parent, int(path.name)
  elif is_run_dir(path):
    run_dir = path
  else:  # as given: a Hub id is not a path
    model, params = convert.load_pretrained(source, dtype=dtype)
    return Loaded(model, params, ClipTokenizer.for_model_dir(source))
  model, tokenizer = run_model(run_dir, dtype)
  step, params, run_config = checkpoint.read_step(run_dir / CHECKPOINTS_DIR, step)
  return Loaded(model, params, tokenizer, run_dir, step, run_config)


def load_model(source: str | os.PathLike, dtype=jnp.float32, step: int | None = None):
  """(model, params, tokenizer) of `load(source, dtype, step)`."""
  loaded = load(source, dtype, step)
  return loaded.model, loaded.params, loaded.tokenizer


# ------------------------------------------------------------------ metrics log


def eval_key(name: str, metric: str) -> str:
  """The metrics-log key of evaluator `name`'s `metric`: ``eval/<name>/<metric>``."""
  return f"{EVAL_PREFIX}{name}/{metric}"


def tensorboard_tag(key: str) -> str:
  """TensorBoard tag of a metrics key: training metrics grouped as train/...; the
  evaluators' keys are eval/<name>/<metric> already."""
  return key if "/" in key else f"train/{key}"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
  """The rows of a run's metrics.jsonl ([] when there is none)."""
  log = storage.path(run_dir) / METRICS_FILE
  if not log.is_file():
    return []
  return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def evaluation_at(run_dir: str | os.PathLike, step: int) -> dict | None:
  """{evaluator: {metric: value}} logged at `step` (the ``eval/<name>/<metric>`` keys), or None."""
  found = {}
  for row in read_metrics(run_dir):
    if row.get("step") != step:
      continue
    for key, value in row.items():
      if key.startswith(EVAL_PREFIX):
        name, metric = key.removeprefix(EVAL_PREFIX).split("/", 1)
        found.setdefault(name, {})[metric] = value
  return found or None


def last_train_metrics(run_dir: str | os.PathLike, step: int) -> dict | None:
  """The training metrics (no ``eval/`` keys) of the last row logged at or before `step`."""
  for row in reversed(read_metrics(run_dir)):
    train = {k: v for k, v in row.items() if k != "step" and not k.startswith(EVAL_PREFIX)}
    if row.get("step", 0) <= step and train:
      return train
  return None


def best_evaluation(run_dir: str | os.PathLike, name: str) -> str:
  """ "best <metric> <value> at step <s>" of evaluator `name`'s first accuracy-like metric
  (higher is better) when it was logged at more than one step, else ""."""
  prefix = eval_key(name, "")
  series = {}
  for row in read_metrics(run_dir):
    for key, value in row.items():
      if key.startswith(prefix) and isinstance(value, float) and value == value:
        series.setdefault(key.removeprefix(prefix), []).append((value, row["step"]))
  for metric, points in series.items():
    if any(w in metric for w in ("acc", "top1", "r1")) and len(points) > 1:
      value, step = max(points, key=lambda p: (p[0], -p[1]))
      return f"best {metric} {value:.4f} at step {step}"
  return ""


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
  """The checkpoint steps on disk under `run_dir`."""
  directory = storage.path(run_dir) / CHECKPOINTS_DIR
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def skipped_count(run_dir: str | os.PathLike) -> int:
  """How many records `skipped.jsonl` lists (0 when there is none)."""
  path = storage.path(run_dir) / SKIPPED_FILE
  return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def is_export(path: str | os.PathLike) -> bool:
  """Whether `path` holds a finished HF export (its weights and config)."""
  path = storage.path(path)
  return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def drop_rows_after(path: epath.Path, step: int) -> None:
  """Rewrites metrics.jsonl without the rows of steps > `step` (logged)."""
  if not path.exists():
    return
  rows = path.read_text().splitlines(keepends=True)
  keep = [r for r in rows if not r.strip() or json.loads(r).get("step", 0) <= step]
  if len(keep) < len(rows):
    logger.warning(
      "%s: dropped %d rows of steps after %d, logged by a run that went past its "
      "last readable checkpoint; those steps are trained again",
      path,
      len(rows) - len(keep),
      step,
    )
    storage.write_atomic(path, "".join(keep).encode())


class MetricsLog:
  """metrics.jsonl + TensorBoard events under workdir (process 0 only).

  A run that resumes at `start_step` first drops the rows of later steps (written by a run
  that went past its last readable checkpoint), so every step is logged once.
  """

  def __init__(self, workdir: epath.Path, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    drop_rows_after(workdir / METRICS_FILE, start_step)
    self.jsonl = storage.AppendLog(workdir / METRICS_FILE)
    self.workdir, self.tb = workdir, None  # an events file only once there is a row

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    if self.tb is None:
      from tensorboardX import SummaryWriter

      self.tb_dir = storage.LocalMirror(self.workdir / TENSORBOARD_DIR)
      self.tb = SummaryWriter(self.tb_dir.local)
    self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    for k, v in metrics.items():
      self.tb.add_scalar(tensorboard_tag(k), v, step)
    self.tb.flush()
    self.tb_dir.sync()

  def close(self):
    if self.enabled:
      self.jsonl.close()
    if self.enabled and self.tb is not None:
      self.tb.close()
      self.tb_dir.close()
