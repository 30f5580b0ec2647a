r"""Omni-NegCLIP training: config -> data -> pmap/fsdp steps -> logs -> Orbax checkpoints.

negclip-train --config omni_negclip_vitb32 --workdir DIR [--config.key=value ...]
(= python -m negclip_jax.train; --config takes a file path or a shipped config name)

Re-running the same command resumes from the latest checkpoint in DIR. Multi-process
runs (TPU pods, SLURM, `launch/local_cluster.sh`) call `jax.distributed.initialize`
first; only process 0 writes logs and exports, every process takes part in saves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from absl import logging as absl_logging
from etils import epath

from negclip_jax import configs, console, rundir, storage
from negclip_jax.data import negshapes, parallel_read
from negclip_jax.data.records import BadRecords
from negclip_jax.eval import evaluators, registry
from negclip_jax.eval import results as results_json
from negclip_jax.model import clip as model_lib
from negclip_jax.model import preprocess
from negclip_jax.model.tokenizer import ClipTokenizer
from negclip_jax.train import batch as batch_lib
from negclip_jax.train import (
  checkpoint,
  image_cache,
  losses,
  optim,
  packing,
  param_groups,
  pipeline,
  resume,
  sharding,
)
from negclip_jax.train import step as train_step

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/Inf; the checkpoints on disk predate it."""


class ConfigError(ValueError):
  """A config value that cannot work, found before anything loads."""


WEBDATASET = "wds:"  # config.data.presence / absence = "wds:" + a shard pattern
TFDS = "tfds:"  # config.data.presence / absence = "tfds:" + a TFDS dataset name
# The data sources besides webdataset shards and TFDS datasets, per stream.
NAMED_SOURCES = {"presence": ("ccneg", "negshapes"), "absence": ("coco_negation", "negshapes")}


def validate_config(config):
  """ConfigError (one line) for a bad `objective`, `layers`, `attention`, `parallelism`,
  `data.presence` / `data.absence`, `data.max_image_pixels`, `data.decode_processes` or
  `data.negshapes_image_hard_fraction` value."""
  if config.objective not in losses.OBJECTIVES:
    raise ConfigError(
      f"config.objective={config.objective!r}; choose from {tuple(losses.OBJECTIVES)}"
    )
  try:
    param_groups.parse_layers(config.layers)
  except ValueError as e:
    raise ConfigError(f"config.layers: {e}") from e
  for stream, named in NAMED_SOURCES.items():
    source = config.data[stream]
    if source not in named and not source.startswith((WEBDATASET, TFDS)):
      raise ConfigError(
        f"config.data.{stream}={source!r}; choose from {', '.join(named)}, "
        f"'{WEBDATASET}SHARDS' or '{TFDS}NAME'"
      )
  distractors = config.objective in losses.DISTRACTOR_OBJECTIVES
  if distractors and config.data.presence not in NAMED_SOURCES["presence"]:
    raise ConfigError(
      f"config.objective={config.objective!r} needs distractor images, which config.data.presence="
      f"{config.data.presence!r} does not have; use 'ccneg' or 'negshapes'"
    )
  max_pixels = config.data.get("max_image_pixels", 1)
  if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
    raise ConfigError(
      f"config.data.max_image_pixels={max_pixels!r}; give a positive number of pixels"
    )
  processes = config.data.get("decode_processes", 0)
  if not isinstance(processes, int) or isinstance(processes, bool) or processes < -1:
    raise ConfigError(
      f"config.data.decode_processes={processes!r}; give -1 (one per CPU), 0 (none) or a count"
    )
  attention = config.get("attention", "einsum")
  if attention not in model_lib.ATTENTIONS:
    raise ConfigError(f"config.attention={attention!r}; choose from {model_lib.ATTENTIONS}")
  if config.data.get("negshapes_image_hard_fraction", 0.0) > 0:
    if not distractors:
      raise ConfigError(
        "config.data.negshapes_image_hard_fraction > 0 needs config.objective in "
        f"{losses.DISTRACTOR_OBJECTIVES} (their distractor terms compare the A+X images), got {config.objective!r}"
      )
    if config.data.get("negshapes_hard_fraction", 0.0) > 0:
      raise ConfigError(
        "set config.data.negshapes_hard_fraction or negshapes_image_hard_fraction, not both"
      )
  elif config.data.get("negshapes_image_hard_affirmed_fraction", 0.0) > 0:
    raise ConfigError(
      "config.data.negshapes_image_hard_affirmed_fraction > 0 needs "
      "config.data.negshapes_image_hard_fraction > 0 (it is a fraction of those examples)"
    )
  parallelism = config.get("parallelism", "pmap")
  if parallelism not in sharding.PARALLELISMS:
    raise ConfigError(f"config.parallelism={parallelism!r}; choose from {sharding.PARALLELISMS}")
  if parallelism == "fsdp" and not config.global_negatives:
    raise ConfigError(
      "config.global_negatives=False needs config.parallelism='pmap' (the "
      "fsdp step sees the global batch, so every example is a negative)"
    )


# ------------------------------------------------------------------------- set-up


def model_options(config) -> dict:
  """The `model_lib.CLIP` options of `config`: compute dtype (params stay float32), attention
  implementation and rematerialisation of the transformer blocks."""
  return dict(
    dtype=jnp.dtype(config.dtype),
    attention=config.get("attention", "einsum"),
    remat=bool(config.get("remat", False)),
  )


def load_model(config) -> tuple[model_lib.CLIP, dict, ClipTokenizer]:
  """The initial model: `config.init` (anything `rundir.load` reads: a run directory's latest
  params, one of its steps, an HF dir, an OpenAI checkpoint) or a random preset."""
  options = model_options(config)
  if config.init:
    try:
      model, params, tokenizer = rundir.load_model(config.init, dtype=options["dtype"])
    except FileNotFoundError as e:
      raise ConfigError(f"config.init={config.init!r}: {e}") from e
    return model.clone(**options), params, tokenizer
  model = model_lib.CLIP(model_lib.get_config(config.model), **options)
  return model, model_lib.init_params(model, jax.random.key(config.seed)), ClipTokenizer()


def load_tables(config, image_size: int, bad: BadRecords | None = None):
  """`_load_tables`; a missing data file is a ConfigError naming its `config.data` key."""
  try:
    return _load_tables(config, image_size, bad)
  except FileNotFoundError as e:
    found = str(e.filename or "")
    paths = {k: str(v) for k, v in config.data.items() if isinstance(v, str) and v}
    keys = [k for k, v in paths.items() if v == found] or [
      k for k, v in paths.items() if found.startswith(v)
    ]
    keys = [f"config.data.{k}" for k in keys]
    raise ConfigError(
      f"{' / '.join(keys) or 'config.data'}: {found or e}: no such file or directory; fix the path"
    ) from e


def _load_tables(config, image_size: int, bad: BadRecords | None = None):
  """(PresenceTable, AbsenceTable) from `config.data`, every bad record reported to `bad`
  (default: `config.data.on_error`; see `pipeline.validate`); the presence table holds distractor images when
  `config.objective` is one of `losses.DISTRACTOR_OBJECTIVES`. Without the image cache, a "skip" run decodes every
  image once here, so a corrupt file cannot stop training later."""
  d = config.data
  bad = bad or BadRecords(d.on_error)
  need = lambda key: getattr(d, key) or _missing(key)
  distractors = config.objective in losses.DISTRACTOR_OBJECTIVES
  # Without the image cache, a "skip" run decodes every image once here.
  file_table = dict(on_error=bad, decode=bad.skip and not d.image_cache, image_size=image_size)
  if "negshapes" in (d.presence, d.absence):
    shapes = pipeline.negshapes_tables(
      negshapes.generate_pairs(
        d.negshapes_num,
        config.seed,
        image_size,
        split="train",
        distractors=distractors,
        hard_fraction=d.negshapes_hard_fraction,
        image_hard_fraction=d.get("negshapes_image_hard_fraction", 0.0),
        image_hard_affirmed_fraction=d.get("negshapes_image_hard_affirmed_fraction", 0.0),
      ),
      on_error=bad,
      distractors=distractors,
    )
  if d.presence == "negshapes":
    presence = shapes[0]
  elif d.presence.startswith(WEBDATASET):
    from negclip_jax.data import webdataset

    pattern = d.presence[len(WEBDATASET) :]
    presence = pipeline.presence_table(
      webdataset.load_presence(pattern, d.wds_caption_key, d.wds_negated_key, bad=bad),
      source=pattern,
      **file_table,
    )
  elif d.presence.startswith(TFDS):
    from negclip_jax.data import tfds_shards

    name = d.presence[len(TFDS) :]
    presence = pipeline.presence_table(
      tfds_shards.load_presence(name, d.tfds_split, data_dir=need("tfds_data_dir"), bad=bad),
      source=d.presence,
      **file_table,
    )
  else:  # "ccneg" (`validate_config` allows no other)
    from negclip_jax.data import ccneg

    distractor_paths = None
    if distractors:
      distractor_paths = ccneg.load_distractor_paths(
        need("distractor_mapping"), need("distractor_coco_json"), need("distractor_image_dir")
      )
    presence = pipeline.presence_table(
      ccneg.load_ccneg(
        need("ccneg_path"),
        need("ccneg_image_root"),
        split="train",
        eval_size=d.ccneg_eval_size,
        distractor_paths=distractor_paths,
        check_images=False,
        bad=bad,
      ),
      source=d.ccneg_path,
      **file_table,
    )
  if d.absence == "negshapes":
    absence = shapes[1]
  elif d.absence.startswith(WEBDATASET):
    from negclip_jax.data import webdataset

    pattern = d.absence[len(WEBDATASET) :]
    absence = pipeline.absence_table(
      webdataset.load_absence(pattern, d.wds_caption_key, d.wds_updated_key, bad=bad),
      source=pattern,
      **file_table,
    )
  elif d.absence.startswith(TFDS):
    from negclip_jax.data import tfds_shards

    absence = pipeline.absence_table(
      tfds_shards.load_absence(
        d.absence[len(TFDS) :], d.tfds_split, data_dir=need("tfds_data_dir"), bad=bad
      ),
      source=d.absence,
      **file_table,
    )
  else:  # "coco_negation"
    from negclip_jax.data import coco_negation

    absence = pipeline.absence_table(
      coco_negation.load_coco_negation(
        need("coco_json"), need("coco_image_dir"), check_images=False, bad=bad
      ),
      source=d.coco_json,
      **file_table,
    )
  return presence, absence


def _missing(key):
  raise ConfigError(
    f"config.data.{key} must be set for this data source and objective (--config.data.{key}=PATH)"
  )


def num_train_steps(config, presence_size: int, absence_size: int) -> int:
  """total_steps, or num_epochs epochs of `pipeline.epoch_steps` (the original's
  ``epochs * max(N1 // B, N2 // B)``)."""
  if config.total_steps > 0:
    return config.total_steps
  return config.num_epochs * pipeline.epoch_steps([presence_size, absence_size], config.batch_size)


def _canonical(config_json: dict, num_layers: int) -> dict:
  """`config_json` with `layers` resolved to block indices: "front", "0,1" and (0, 1) are
  the same blocks on a 4-layer text tower."""
  try:
    layers = list(param_groups.text_layers(config_json.get("layers"), num_layers))
  except (TypeError, ValueError):
    return config_json
  return {**config_json, "layers": layers}


def resume_check(
  config, workdir: epath.Path, total_steps: int, table_sizes: tuple[int, int], num_layers: int
):
  """`Checkpointer.restore_latest`'s check_config: ResumeError (one line per changed key)
  if a saved config differs in a key that shapes the training state; logs the rest.

  The schedule length may grow (the cosine then follows the new length from the resumed
  step on; logged) but not shrink.
  """
  current = _canonical(json.loads(config.to_json()), num_layers)

  def check(saved: dict, step: int):
    breaking, neutral = resume.config_changes(_canonical(saved, num_layers), current)
    saved_total = num_train_steps(ml_collections.ConfigDict(saved), *table_sizes)
    if total_steps < saved_total:
      breaking["total steps (num_epochs, total_steps)"] = (saved_total, total_steps)
    if "layers" in breaking:  # as spelled, not as resolved
      breaking["layers"] = (saved.get("layers"), config.layers)
    if breaking:
      raise resume.mismatch_error(f"{workdir / rundir.CHECKPOINTS_DIR}/{step}", breaking, workdir)
    for key, (old, new) in neutral.items():
      logger.info(
        "Resuming with %s changed: %r -> %r (does not alter the training state)", key, old, new
      )
    if total_steps > saved_total:
      rate = lambda total: float(schedule_from_config(config, total)(step))
      logger.warning(
        "Resuming with total steps %d -> %d: the learning-rate schedule is "
        "stretched from step %d on (rate there %.4g, was %.4g).",
        saved_total,
        total_steps,
        step,
        rate(total_steps),
        rate(saved_total),
      )

  return check


def schedule_from_config(config, total_steps: int) -> optax.Schedule:
  """`optim.learning_rate_schedule` with the config's keys, over `total_steps`."""
  return optim.learning_rate_schedule(
    config.schedule, config.learning_rate, config.warmup_steps, total_steps
  )


def optimizer_from_config(config, labels, schedule: optax.Schedule):
  """`optim.masked_adamw` with the config's optimizer keys, following `schedule`."""
  return optim.masked_adamw(
    labels,
    schedule,
    config.weight_decay,
    config.grad_clip_norm or None,
    b1=config.b1,
    b2=config.b2,
    eps=config.eps,
  )


def make_step(config, model, labels, tx, placement) -> Callable:
  """`train_step.make_train_step` with the config's objective keys, for `placement`
  (uncompiled: `placement.compile` it, or lower it ahead of time as `negclip-compile` does)."""
  return train_step.make_train_step(
    model,
    labels,
    tx,
    objective=config.objective,
    lambda_stage2=config.lambda_stage2,
    lambda_orig=config.lambda_orig,
    lambda_text=config.lambda_text,
    margin=config.margin,
    global_negatives=config.global_negatives,
    **placement.step_options,
  )


# --------------------------------------------------------------------------- loop


def _flush(
  pending: list,
  log: rundir.MetricsLog,
  bar,
  t0: float,
  samples_per_step: int,
  host,
  schedule: optax.Schedule,
):
  """Fetches queued step metrics (`host`: device -> numpy), checks them, logs their mean and
  the learning rate `schedule` gave the last of those steps."""
  if not pending:
    return None
  steps, values = zip(*pending)
  values = [host(v) for v in values]
  for step, m in zip(steps, values):
    if not all(np.isfinite(x) for x in m.values()):
      raise NonFiniteLossError(
        f"non-finite metrics at step {step}: { ({k: float(v) for k, v in m.items()}) }; "
        "stopping. Checkpoints on disk are from earlier steps; lower the learning rate or "
        "enable grad_clip_norm."
      )
  mean = {k: float(np.mean([m[k] for m in values])) for k in values[0]}
  mean["samples_per_s"] = samples_per_step * len(steps) / max(time.perf_counter() - t0, 1e-9)
  mean["learning_rate"] = float(schedule(steps[-1]))
  log.write(steps[-1] + 1, mean)
  bar.set_postfix(
    {k: f"{mean[k]:.3g}" for k in ("total", "L3", "L_neg", "L_text", "samples_per_s") if k in mean}
  )
  pending.clear()
  return mean


@dataclasses.dataclass
class Run:
  """A training run set up to loop: what `setup` built and `loop` / `finish` use."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  model: model_lib.CLIP
  tokenizer: ClipTokenizer
  placement: sharding.Pmap | sharding.Fsdp
  evals: list[evaluators.Evaluator]
  schedule: optax.Schedule
  checkpointer: checkpoint.Checkpointer
  data: pipeline.TrainPipeline
  step_fn: Callable
  state: train_step.TrainState  # placed on the devices (replicated or sharded)
  start_step: int
  total_steps: int
  compiled_shapes: list[str] = dataclasses.field(default_factory=list)  # the step's text shapes


def setup(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Run:
  """Validates `config`, loads the model and data, restores the newest readable checkpoint
  of `workdir` (or initialises), fills the image cache and compiles the step."""
  validate_config(config)
  evals = evaluators.from_config(config.evals)
  workdir = storage.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  main = jax.process_index() == 0
  model, params, tokenizer = load_model(config)
  image_size = model.config.vision.image_size
  bad = BadRecords(config.data.on_error)
  if "max_image_pixels" in config.data:
    preprocess.set_max_image_pixels(config.data.max_image_pixels)
  parallel_read.set_decode_processes(config.data.get("decode_processes", 0))
  presence, absence = load_tables(config, image_size, bad)

  labels = param_groups.label_params(params, config.layers, extra_trainable=config.extra_trainable)
  if main:
    print(param_groups.summary(params, labels), flush=True)
  total_steps = num_train_steps(config, len(presence), len(absence))
  schedule = schedule_from_config(config, total_steps)  # the optimizer's, and logged
  tx = optimizer_from_config(config, labels, schedule)
  placement = sharding.for_config(config)  # pmap replicas or an fsdp mesh
  abstract_state = jax.eval_shape(lambda p: train_step.create_train_state(p, tx), params)

  ckpt = checkpoint.Checkpointer(
    workdir / rundir.CHECKPOINTS_DIR,
    workdir / rundir.UNREADABLE_DIR,
    config.save_every,
    config.max_to_keep,
  )
  try:
    restored = ckpt.restore_latest(
      placement.restore_target(abstract_state),
      resume_check(
        config,
        workdir,
        total_steps,
        (len(presence), len(absence)),
        model.config.text.num_hidden_layers,
      ),
      restart=config.get("restart", False),
    )
  except resume.ResumeError:
    ckpt.close()
    raise
  start = 0
  if restored is not None:
    state, data_state, start = restored
    placed = placement.place(state)
    del state
    if main and start >= total_steps:
      print(
        f"{workdir} already finished: step {start} of {total_steps} "
        f"({ckpt.directory}/{start}); nothing to train",
        flush=True,
      )
    elif main:
      print(f"Resuming from {ckpt.directory}/{start}", flush=True)
  else:
    placed = placement.init_state(params, tx)
  if main:
    rundir.write_model(workdir, model.config, tokenizer)

  if config.data.image_cache:  # frozen tower: embed every image once
    cache_dir = config.data.cache_dir or str(workdir / rundir.IMAGE_CACHE_DIR)
    presence, absence = (
      image_cache.embed_table(
        t,
        model,
        params,
        image_size,
        cache_dir=cache_dir,
        on_error=bad,
        read_threads=config.data.read_threads,
      )
      for t in (presence, absence)
    )
  if main:
    bad.write(workdir / rundir.SKIPPED_FILE)
    if bad.skipped:
      print(f"{bad.summary()}; all listed in {workdir / rundir.SKIPPED_FILE}", flush=True)
  data = pipeline.TrainPipeline(
    presence,
    absence,
    tokenizer=tokenizer,
    context_length=model.config.text.max_position_embeddings,
    global_batch=config.batch_size,
    seed=config.seed,
    image_size=image_size,
    num_steps=total_steps,
    start_step=start,
    pack_text=bool(config.data.pack_text),  # one group of rows per device
    eos_token_id=model.config.text.eos_token_id,
    read_threads=config.data.read_threads,
  )
  if restored is not None:
    data.load_state_dict(data_state)

  step_fn = placement.compile(make_step(config, model, labels, tx, placement), placed)
  return Run(
    config,
    workdir,
    model,
    tokenizer,
    placement,
    evals,
    schedule,
    ckpt,
    data,
    step_fn,
    placed,
    start,
    total_steps,
  )


def _every(step: int, n: int) -> bool:
  """Whether `step` falls on a cadence of `n` steps (n <= 0: never)."""
  return n > 0 and step % n == 0


@dataclasses.dataclass(frozen=True)
class Due:
  """What happens after a step: the one cadence rule for logs, saves, evaluations, stops."""

  log: bool
  save: bool
  stop: bool  # preempted (SIGTERM, or Orbax's preemption sync point)
  evals: tuple[evaluators.Evaluator, ...]

  @classmethod
  def after(cls, run: Run, step: int, preempt: checkpoint.PreemptionWatcher) -> "Due":
    save = run.checkpointer.should_save(step) or step == run.total_steps
    log = _every(step, run.config.log_every)
    stop = preempt.should_stop(step, run.checkpointer, boundary=save or log)
    evals = tuple(ev for ev in run.evals if _every(step, ev.every))
    return cls(log=log or save or stop, save=save or stop, stop=stop, evals=evals)


def loop(
  run: Run, log: rundir.MetricsLog, preempt: checkpoint.PreemptionWatcher | None = None
) -> tuple[int, dict | None, bool, dict]:
  """Trains from `run.start_step` to the end or a preemption (SIGTERM, Ctrl-C; `preempt`, or
  a watcher of its own), updating `run.state` -> (step reached, last logged metrics, stopped
  early, {evaluator: (step, metrics)})."""
  main = jax.process_index() == 0
  config_json = json.loads(run.config.to_json())
  own_watcher = preempt is None
  preempt = preempt or checkpoint.PreemptionWatcher()
  preempt.saving = True
  preempt.abort_note = "rerun the same command to resume from the newest checkpoint"
  pending, last, stopped_early = [], None, False
  evaluated = {}
  bar = console.progress(
    total=run.total_steps,
    initial=run.start_step,
    desc="train",
    disable=not main,
    dynamic_ncols=True,
  )
  t0 = time.perf_counter()
  step = run.start_step
  try:
    for batch in run.data:
      batch.pop(batch_lib.STEP_KEY)
      _note_new_shape(run.compiled_shapes, batch, step + 1)
      run.state, metrics = run.step_fn(run.state, run.placement.batch(batch))
      pending.append((step, metrics))
      step += 1
      bar.update(1)
      due = Due.after(run, step, preempt)
      if due.log:
        host, batch_size = run.placement.host, run.config.batch_size
        last = _flush(pending, log, bar, t0, batch_size, host, run.schedule) or last
        t0 = time.perf_counter()
      if due.save:
        run.checkpointer.save(
          step, run.placement.to_save(run.state), run.data.state_dict(), config_json, force=True
        )
      for ev in due.evals:
        evaluated[ev.name] = step, _evaluate(run, ev, log, step)
      if due.stop:
        stopped_early = step < run.total_steps
        break
  finally:
    bar.close()
    run.checkpointer.close()
    preempt.saving = False
    preempt.abort_note = f"step {step} is saved; rerun the same command to finish"
    if own_watcher:
      preempt.close()
  return step, last, stopped_early, evaluated


def _note_new_shape(seen: list[str], batch: dict, step: int):
  """Logs (and appends to `seen`) a text shape the step has not run yet: it compiles now."""
  if packing.PACKED_IDS in batch:
    rows, length = batch[packing.PACKED_IDS].shape[-2:]
    shape = f"packed text of {rows} rows x {length} tokens"
  else:
    shape = f"text length {batch[batch_lib.TEXT_KEYS[0]].shape[-1]}"
  if shape in seen:
    return
  why = f"a new shape; compiled before: {', '.join(seen)}" if seen else "the first shape"
  logger.info("Step %d: compiling the train step for %s (%s).", step, shape, why)
  seen.append(shape)


def _evaluate(run: Run, ev: evaluators.Evaluator, log: rundir.MetricsLog, step: int) -> dict:
  """Runs evaluator `ev` on the current params and logs its metrics at `step`."""
  params = run.placement.eval_params(run.state.params)
  metrics = ev.run(run.model, params, run.tokenizer, run.placement.mesh)
  log.write(step, ev.log_keys(metrics))
  return metrics


def finish(
  run: Run,
  log: rundir.MetricsLog,
  step: int,
  last: dict | None,
  stopped_early: bool,
  evaluated: dict,
) -> dict:
  """Final evaluations (each evaluator once at the last step, unless stopped early), the
  host copy of the params, the results JSON and the export of a finished run -> `train`'s
  result. A run that had finished before this call (the same command again) reuses the
  logged metrics and final evaluation and keeps its export."""
  finished_before = run.start_step >= run.total_steps
  if finished_before:  # nothing was trained: what the run logged at its last step
    last = last or rundir.last_train_metrics(run.workdir, step)
    evaluated = {n: (step, m) for n, m in (rundir.evaluation_at(run.workdir, step) or {}).items()}
  final_eval = {}
  for ev in [] if stopped_early else run.evals:
    if evaluated.get(ev.name, (None,))[0] == step:  # the loop has just run it (or a past run)
      final_eval[ev.name] = evaluated[ev.name][1]
    else:
      final_eval[ev.name] = _evaluate(run, ev, log, step)
  log.close()
  result = {
    "step": step,
    "total_steps": run.total_steps,
    "last_metrics": last,
    "eval": final_eval,
    "stopped_early": stopped_early,
    "model": run.model,
    "params": run.placement.host(run.state.params),
    "tokenizer": run.tokenizer,
  }
  main = jax.process_index() == 0
  if main and final_eval:
    heads = {ev.name: ev.header() for ev in run.evals}
    head = results_json.header(str(run.workdir), heads, step)
    (run.workdir / rundir.RESULTS_FILE).write_text(results_json.document(head, final_eval))
  export_dir = run.workdir / rundir.EXPORT_DIR
  if main and not stopped_early and not (finished_before and rundir.is_export(export_dir)):
    from negclip_jax import export

    out = export.export_run(result, run.config, export_dir, run.workdir.name)
    print(f"Exported to {out}", flush=True)
  return result


def summary(result: dict, workdir: epath.Path, seconds: float, start_step: int) -> str:
  """The human end-of-run block: how far, how long, final and best metrics, and where the
  checkpoints, export, results, metrics, TensorBoard events and skipped records are."""
  step, total = result["step"], result["total_steps"]
  if result["stopped_early"]:
    state = f"stopped at step {step} of {total} (unfinished; the same command resumes)"
  elif start_step >= total:
    state = f"already finished at step {step} of {total}"
  else:
    state = f"finished: step {step} of {total}"
  lines = [f"Training {state}; {step - start_step} steps in {seconds:.0f} s"]
  last = {k: v for k, v in (result["last_metrics"] or {}).items() if k != "samples_per_s"}
  if last:
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(last.items()) if isinstance(v, float))
    lines.append(f"  final training metrics: {shown}")
  for name, metrics in result["eval"].items():
    headline = {k: v for k, v in metrics.items() if k != "n" and not k.startswith("n_")}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in list(headline.items())[:4])
    best = rundir.best_evaluation(workdir, name)
    lines.append(f"  eval {name} (step {step}): {shown}" + (f"; {best}" if best else ""))
  steps = rundir.checkpoint_steps(workdir)
  places = [
    ("Checkpoints", f"{workdir / rundir.CHECKPOINTS_DIR} (steps {steps})"),
    (
      "Export",
      str(workdir / rundir.EXPORT_DIR)
      if rundir.is_export(workdir / rundir.EXPORT_DIR) and not result["stopped_early"]
      else f"none yet (written when the run finishes; or negclip-export {workdir})",
    ),
  ]
  if result["eval"]:
    places.append(("Results", str(workdir / rundir.RESULTS_FILE)))
  places += [
    ("Metrics", str(workdir / rundir.METRICS_FILE)),
    (
      "TensorBoard",
      f"{workdir / rundir.TENSORBOARD_DIR} (pip install tensorboard; "
      f"tensorboard --logdir {workdir / rundir.TENSORBOARD_DIR})",
    ),
  ]
  skipped = rundir.skipped_count(workdir)
  if skipped:
    places.append(("Skipped records", f"{workdir / rundir.SKIPPED_FILE} ({skipped})"))
  width = max(len(k) for k, _ in places) + 1
  lines += [f"  {(k + ':').ljust(width)} {v}" for k, v in places]
  return "\n".join(lines) + "\n"


def train(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  preempt: checkpoint.PreemptionWatcher | None = None,
) -> dict:
  """Runs (or resumes) training: `setup`, `loop`, `finish`.

  Returns {"step", "total_steps", "last_metrics", "eval" ({evaluator name: final metrics};
  empty if stopped early), "stopped_early", "model", "params" (host copy), "tokenizer",
  "start_step", "seconds"}. The evaluators of `config.evals` (validated before anything
  loads) run at their cadence and once at the end; results go to the metrics log as
  ``eval/<name>/<metric>`` and, at the end, to WORKDIR/results.json. A run that finishes
  exports to WORKDIR/export/hf (`negclip_jax.export`); running a finished run again
  trains nothing and reports what it logged. `preempt` (the CLI's, installed before
  set-up) turns SIGTERM / Ctrl-C into a save and stop. A trainer already running in
  `workdir` is refused (`rundir.WorkdirLock`).
  """
  t0 = time.perf_counter()
  with rundir.WorkdirLock(workdir):
    run = setup(config, workdir)
    log = rundir.MetricsLog(run.workdir, run.start_step)
    result = finish(run, log, *loop(run, log, preempt))
  return {**result, "start_step": run.start_step, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- CLI

_CONFIG = configs.define_flag(
  "config", "Config file path, or a shipped config name: " + ", ".join(configs.NAMES)
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0 for multi-process runs; on TPU pods "
  "and SLURM leave unset and pass --distributed.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the cluster.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM)."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
  "heartbeat_timeout",
  100,
  "Multi-process runs: seconds without heartbeats after which a process counts as dead; "
  "the survivors then abort (non-zero exit) instead of waiting in a collective forever.",
)


def initialize_distributed():
  """jax.distributed.initialize from flags (explicit) or auto-detection (--distributed)."""
  if _COORDINATOR.value:
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      _COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      initialization_timeout=120,
      heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
    )
  elif _DISTRIBUTED.value:
    jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)


def configure_logging():
  """negclip_jax logs INFO; libraries (Orbax, TensorFlow) only warnings unless -v/--verbosity."""
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("negclip_jax").setLevel(logging.INFO)


def _saved_progress() -> str | None:
  """The newest checkpoint of --workdir, for the error line of a failed write."""
  checkpoints = storage.path(_WORKDIR.value) / rundir.CHECKPOINTS_DIR
  steps = (
    [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.exists() else []
  )
  return f"checkpoint {checkpoints}/{max(steps)}" if steps else None


@console.boundary(saved=_saved_progress, known=(NonFiniteLossError,))
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  preempt = checkpoint.PreemptionWatcher(saving=False)  # Ctrl-C in set-up: stop at once
  preempt.abort_note = "nothing was trained in this session; rerun the same command to go on"
  configure_logging()
  console.enable_compilation_cache()
  initialize_distributed()
  if jax.process_index() == 0:
    print(
      f"JAX {jax.__version__}: {jax.process_count()} process(es), "
      f"{jax.device_count()} device(s) ({jax.devices()[0].platform})",
      flush=True,
    )
  try:
    result = train(_CONFIG.value, _WORKDIR.value, preempt)
  finally:
    preempt.close()
  if jax.process_index() == 0:
    if result["eval"]:
      print(f"Final evaluation (step {result['step']}):\n{registry.markdown(result['eval'])}")
    workdir = storage.path(_WORKDIR.value)
    print(summary(result, workdir, result["seconds"], result["start_step"]), end="", flush=True)
  # Every process prints the summary (multi-process runs can compare their final metrics).
  print(
    json.dumps(
      {
        "step": result["step"],
        "total_steps": result["total_steps"],
        "stopped_early": result["stopped_early"],
        **(result["last_metrics"] or {}),
        **({"eval": result["eval"]} if result["eval"] else {}),
      }
    ),
    flush=True,
  )


def _parse_flags(argv: list[str]) -> list[str]:
  return parse_flags(
    argv,
    __doc__,
    [
      h.name
      for h in (
        _CONFIG,
        _WORKDIR,
        _COORDINATOR,
        _NUM_PROCESSES,
        _PROCESS_ID,
        _DISTRIBUTED,
        _HEARTBEAT_TIMEOUT,
      )
    ],
  )


def parse_flags(argv: list[str], doc: str, names) -> list[str]:
  """absl flag parsing, except that -h/--help prints `doc`, the flags `names` and every
  config key with its default and meaning (of --config's config if given, else the base)
  and exits 0; a bad flag or `--config.KEY=VALUE` override exits with one line.
  ``--config.evals.NAME.KEY`` may name a new evaluator or option
  (`configs.apply_eval_overrides`)."""
  if "-h" in argv or "--help" in argv:
    given = [a.partition("=")[2] for a in argv if a.startswith("--config=")]
    given += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    name = given[0] if given else configs.BASE
    try:
      table = configs.help_table(configs.load(name))
    except ValueError as e:
      sys.exit(f"error: {e}")
    print(doc + "\nflags:")
    for flag in names:
      print(f"  --{flag}: {flags.FLAGS[flag].help}")
    print(
      "  -v, --verbosity: absl log level of the libraries (Orbax, TensorFlow); default: warnings"
    )
    print(f"\nconfig keys (--config.KEY=VALUE; defaults of {name}):\n{table}")
    sys.exit(0)
  try:
    argv, eval_overrides = configs.split_eval_overrides(argv)
    sys.argv = argv  # ml_collections reads its --config.KEY overrides from sys.argv
    rest = flags.FLAGS(argv)
    configs.apply_eval_overrides(_CONFIG.value, eval_overrides)
    return rest
  except flags.Error as e:
    sys.exit(f"error: {str(e).rstrip('.')}. Pass --help for usage.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # from ml_collections
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
      e = e.args[0]
    message = str(e.args[0]) if e.args else str(e)
    sys.exit(f"error: bad --config override: {' '.join(message.split())}")


def cli():
  """Console script `negclip-train` (= python -m negclip_jax.train)."""
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
