"""The run directory: every file a training run writes, its metrics log, and loading a model
from anything a user may name.

WORKDIR/ (local or ``gs://``)::

  checkpoints/<step>/        Orbax steps: state, data position, config (`train/checkpoint.py`)
  unreadable_checkpoints/    steps that failed to restore, moved aside for inspection
  model_config.json          the model's `CLIPConfig` (`clip.config_to_dict`)
  tokenizer/                 the tokenizer's files
  metrics.jsonl              one JSON row per logged step: {"step", metric: value, ...};
                             evaluators log ``eval/<name>/<metric>`` (`eval_key`)
  metrics.jsonl.<UTC>.bak    the log as it was before a resume rewrote it (`drop_rows_after`)
  tensorboard/               the same rows as TensorBoard events
  skipped.jsonl              the records `data.on_error=skip` left out, one JSON line each
  results.json               the final evaluation with its header (`eval/results.py`)
  image_cache/               frozen-tower image features (unless `data.cache_dir` is set)
  export/hf/                 the finished run's Hugging Face export with its model card
  lock.json                  held while a trainer runs here: {"host", "pid", "started",
                             "heartbeat", "token"} (`WorkdirLock`)

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
import socket
import threading
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from negclip_jax import hosts, storage
from negclip_jax.model import clip as model_lib
from negclip_jax.model import convert
from negclip_jax.model.tokenizer import ClipTokenizer
from negclip_jax.train import checkpoint
from negclip_jax.train.resume import ResumeError

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
LOCK_FILE = "lock.json"
EVAL_PREFIX = "eval/"


def is_run_dir(path: str | os.PathLike) -> bool:
  """True for a training workdir (model_config.json + checkpoints/)."""
  path = storage.path(path)
  return (path / MODEL_CONFIG_FILE).is_file() and (path / CHECKPOINTS_DIR).is_dir()


def write_model(workdir: epath.Path, model_config: model_lib.CLIPConfig, tokenizer) -> None:
  """model_config.json and tokenizer/: what `run_model` reads back."""
  storage.write_atomic(
    workdir / MODEL_CONFIG_FILE,
    json.dumps(model_lib.config_to_dict(model_config), indent=2).encode(),
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


# ------------------------------------------------------------------ workdir lock


class WorkdirInUse(ResumeError):
  """Another trainer holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


class WorkdirLock:
  """One trainer per run directory: WORKDIR/lock.json, created only if absent
  (`storage.create_new`: a hard link locally, a generation precondition on ``gs://``).

  Held by process 0 of a run (the others agree on the outcome). A second trainer is
  refused (`WorkdirInUse`, naming the holder's host, pid and start time). A lock is stale,
  and taken over with a warning, when its pid is gone on this host, or when its heartbeat
  (rewritten every `heartbeat_s` by a thread) is older than `stale_after_s` on another host.
  Two trainers taking over the same stale lock at the same moment may both win; a live
  holder is never taken over. Use as a context manager (`release` on exit).
  """

  def __init__(
    self, workdir: str | os.PathLike, stale_after_s: float = 600, heartbeat_s: float = 60
  ):
    self.file = storage.path(workdir) / LOCK_FILE
    self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
    self.held = False
    self._stop = threading.Event()
    self._thread = None
    self._record = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "heartbeat": time.time(),
      "token": uuid.uuid4().hex,
    }

  def _holder(self) -> dict | None:
    """The lock's record; {} if it cannot be read (being written, or damaged); None if
    there is no lock."""
    try:
      holder = json.loads(self.file.read_bytes())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}
    return holder if isinstance(holder, dict) else {}

  def _stale_reason(self, holder: dict) -> str | None:
    """Why `holder` is stale, or None while it may still be running."""
    age = time.time() - float(holder.get("heartbeat") or 0)
    if holder.get("host") == self._record["host"] and isinstance(holder.get("pid"), int):
      if holder["pid"] != os.getpid() and not _pid_alive(holder["pid"]):
        return f"its pid {holder['pid']} is gone on this host"
      return None
    if age > self.stale_after_s:
      return f"no heartbeat for {age:.0f} s (> {self.stale_after_s:.0f} s)"
    return None

  def _try_acquire(self) -> str | None:
    """None once held, else the refusal."""
    data = json.dumps(self._record).encode()
    for _ in range(3):
      if storage.create_new(self.file, data):
        return None
      holder = self._holder()
      if holder is None:  # released meanwhile
        continue
      reason = self._stale_reason(holder)
      if reason is None:
        return (
          f"{self.file.parent} is in use by another trainer: host {holder.get('host', '?')}, "
          f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')} "
          f"(lock {self.file}). Wait for it to finish or stop it; a dead holder's lock is "
          f"taken over automatically (its pid gone on its host, or no heartbeat for "
          f"{self.stale_after_s:.0f} s)"
        )
      if self._holder() != holder:  # changed while we looked: look again
        continue
      logger.warning(
        "Taking over the stale lock %s of host %s, pid %s, started %s (%s).",
        self.file,
        holder.get("host", "?"),
        holder.get("pid", "?"),
        holder.get("started", "?"),
        reason,
      )
      try:
        self.file.unlink()
      except FileNotFoundError:
        pass
    return f"could not lock {self.file}: it keeps changing; is another trainer starting?"

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (process 0) -> self; `WorkdirInUse` on every process if refused."""
    refusal = None
    if jax.process_index() == 0:
      self.file.parent.mkdir(parents=True, exist_ok=True)
      refusal = self._try_acquire()
      self.held = refusal is None
    if not hosts.all_processes(refusal is None):
      self.release()
      raise WorkdirInUse(refusal or f"process 0 could not lock {self.file}; see its log")
    if self.held:
      self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock")
      self._thread.start()
    return self

  def _heartbeat(self):
    while not self._stop.wait(self.heartbeat_s):
      holder = self._holder()
      if holder and holder.get("token") != self._record["token"]:
        logger.error(
          "%s was taken over by pid %s on %s", self.file, holder.get("pid"), holder.get("host")
        )
        return
      self._record["heartbeat"] = time.time()
      try:
        storage.write_atomic(self.file, json.dumps(self._record).encode())
      except OSError as e:
        logger.warning("cannot refresh %s (%s)", self.file, e)

  def release(self) -> None:
    """Removes the lock if this process holds it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self.held:
      self.held = False
      holder = self._holder()
      if holder is not None and holder.get("token") == self._record["token"]:
        self.file.unlink()

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# ------------------------------------------------------------------ metrics log


def eval_key(name: str, metric: str) -> str:
  """The metrics-log key of evaluator `name`'s `metric`: ``eval/<name>/<metric>``."""
  return f"{EVAL_PREFIX}{name}/{metric}"


def tensorboard_tag(key: str) -> str:
  """TensorBoard tag of a metrics key: training metrics grouped as train/...; the
  evaluators' keys are eval/<name>/<metric> already."""
  return key if "/" in key else f"train/{key}"


def _parse_rows(data: bytes) -> tuple[list[dict], list[int]]:
  """(the JSON object rows of metrics.jsonl bytes, 1-based numbers of the lines that are not
  one: torn by a crash or a full disk, or not UTF-8)."""
  rows, bad = [], []
  for number, line in enumerate(data.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line.decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
      row = None
    if isinstance(row, dict) and isinstance(row.get("step", 0), int):
      rows.append(row)
    else:
      bad.append(number)
  return rows, bad


def _unreadable_rows_warning(path, bad: list[int], action: str) -> None:
  logger.warning(
    "%s: %s %d unreadable row(s) (torn by a crash or a full disk, or not UTF-8 JSON; lines %s)",
    path,
    action,
    len(bad),
    ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else ""),
  )


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
  """The rows of a run's metrics.jsonl ([] when there is none); unreadable rows are left
  out with a warning (a resumed run drops them from the file, `drop_rows_after`)."""
  log = storage.path(run_dir) / METRICS_FILE
  if not log.is_file():
    return []
  rows, bad = _parse_rows(log.read_bytes())
  if bad:
    _unreadable_rows_warning(log, bad, "skipped")
  return rows


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
  """Rewrites metrics.jsonl without the rows of steps > `step` and without unreadable rows
  (each kind logged once); the original is kept beside it as ``metrics.jsonl.<UTC>.bak``."""
  if not path.exists():
    return
  data = path.read_bytes()
  rows, bad = _parse_rows(data)
  keep = [r for r in rows if r.get("step", 0) <= step]
  if not bad and len(keep) == len(rows):
    if data and not data.endswith(b"\n"):  # the next append starts a line of its own
      storage.write_atomic(path, data + b"\n")
    return
  backup = path.parent / f"{path.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.bak"
  storage.write_atomic(backup, data)
  if bad:
    _unreadable_rows_warning(path, bad, "dropped")
  if len(keep) < len(rows):
    logger.warning(
      "%s: dropped %d rows of steps after %d, logged by a run that went past its "
      "last readable checkpoint; those steps are trained again",
      path,
      len(rows) - len(keep),
      step,
    )
  storage.write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
  logger.warning("%s: the original is kept as %s", path, backup)


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
