"""The offline quickstart: Omni-NegCLIP on a small CLIP, on a CPU, in minutes, measured
on tasks a shortcut cannot solve.

negclip-demo --workdir runs/demo [--seed S] [--hard-fraction F] [--fast]   (= python -m negclip_jax.demo)
negclip-demo --workdir runs/compare --compare-seeds 0 1 2   # paper vs hard data
negclip-demo --workdir runs/why --compare-seeds 0 1 2 --recipe paper conclip_image_hard
negclip-demo --workdir runs/why --diagnose [--recipe NAME]   # perception vs negation

1. Pretrains a small CLIP from scratch on NegShapes *plain* captions with the standard
   CLIP loss: our stand-in for "pretrained CLIP", which never saw negation.
2. Exports it as a Hugging Face directory (`DIR/pretrained/hf`) and starts Omni-NegCLIP
   fine-tuning from it exactly as a user would from `openai/clip-vit-base-patch32`.
3. Fine-tunes the front text layers with both objectives (`negclip_jax/configs/demo.py`).
4. Evaluates both models on every NegShapes task (`negclip_jax.eval.tasks.negshapes_task`):
   paper-style presence/absence, the shortcut-free presence_hard, absence_hard and
   multiple choice, each in-distribution and on held-out compositions, with standard
   errors and the shortcut audit; prints tables, writes DIR/results.json, DIR/demo.png,
   and exports the result to DIR/export/hf (its model card holds these results).
`--seed` seeds every phase (pretraining, fine-tuning, evaluation). `--recipe` names a
variant of the fine-tuning (`RECIPES`); `--compare-seeds` runs each over seeds and prints
mean +- s.d., the shortcut audit and whether it passes the bar (`bar_table`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import ml_collections
import numpy as np
import optax

from negclip_jax import console, export, rundir
from negclip_jax.data import negshapes
from negclip_jax.eval import results as results_json
from negclip_jax.eval.tasks import negshapes_task
from negclip_jax.model import clip as model_lib
from negclip_jax.model import convert
from negclip_jax.model.preprocess import preprocess_images
from negclip_jax.model.tokenizer import ClipTokenizer
from negclip_jax.train import optim, pipeline, trainer
from negclip_jax.train import step as train_step
from negclip_jax.train.packing import bucket_length

METRICS = (
  *(f"{t}_acc" for t in negshapes_task.TASKS),
  *(f"mcq{s}_{t}_acc" for s in ("", "_heldout") for t in negshapes.MCQ_TEMPLATES),
  "retrieval_t2i_r1",
  "retrieval_i2t_r1",
)


def pretrain(model, tokenizer, data, steps, batch_size, learning_rate, seed) -> tuple[dict, list]:
  """Pretrains `model` on (images, plain captions) -> (params, per-step losses)."""
  params = model_lib.init_params(model, jax.random.key(seed))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10), steps)
  tx = optim.pretrain_adamw(schedule)
  step_fn = train_step.make_pretrain_step(model, tx)
  state = train_step.replicate(train_step.create_train_state(params, tx))
  pixels = preprocess_images(data["images"], model.config.vision.image_size)
  ids = tokenizer(data["captions"], model.config.text.max_position_embeddings)
  ids = ids[:, : bucket_length(ids)]  # exact: causal mask (see negclip_jax.embed)
  n_dev = jax.local_device_count()
  shard = lambda x: x.reshape((n_dev, -1) + x.shape[1:])
  losses_ = []
  for step in console.progress(range(steps), desc="pretrain (plain captions)"):
    idx = pipeline.step_indices(step, len(ids), batch_size, seed, stream=0)
    state, loss = step_fn(state, shard(pixels[idx]), shard(ids[idx]))
    losses_.append(loss)
  return train_step.unreplicate(state.params), [float(loss[0]) for loss in losses_]


def evaluate_negshapes(model, params, tokenizer, num: int, seed: int) -> dict:
  """Every NegShapes task (paper-style and shortcut-free) with its shortcut audit."""
  from negclip_jax.eval import registry

  return registry.run_task(
    "negshapes", model, params, tokenizer, progress=False, num=num, seed=seed
  )


def _cell(results: dict, key: str) -> str:
  """ "0.688 +- 0.021" for an accuracy with a standard error, else "0.150"."""
  se = results.get(key.removesuffix("_acc") + "_se")
  return f"{results[key]:.3f}" + (f" +- {se:.3f}" if se is not None else "")


def _label(key: str) -> str:
  """ "mcq_heldout_negation_acc" -> "mcq_negation (held-out)"."""
  name = key.removesuffix("_acc")
  return name.replace("_heldout", "") + (" (held-out)" if "_heldout" in name else "")


def _chance(results: dict, name: str) -> str:
  """Chance accuracy of task `name` ("-" for retrieval)."""
  if f"{name}_chance" in results:
    return f"{results[f'{name}_chance']:.2f}"
  return "0.25" if name.startswith("mcq") else "-"  # mcq per template


def table(before: dict, after: dict) -> str:
  """Markdown: every metric before and after, with n, chance and standard errors."""
  rows = [
    "| task | style | n | chance | pretrained CLIP | Omni-NegCLIP | change |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for key in METRICS:
    name = key.removesuffix("_acc")
    style = (
      "paper-style"
      if negshapes_task.base_task(name) in ("presence", "absence")
      else "retrieval"
      if key.startswith("retrieval")
      else "shortcut-free"
    )
    n = after.get(f"{name}_n", after["n"])
    rows.append(
      f"| {_label(key)} | {style} | {n} | {_chance(after, name)} | "
      f"{_cell(before, key)} | {_cell(after, key)} | {after[key] - before[key]:+.3f} |"
    )
  return "\n".join(rows)


def plot(path: Path, pretrain_losses: list, finetune_rows: list[dict], before: dict, after: dict):
  """Training curves (top) and before/after accuracies with error bars, value labels and
  chance lines (bottom) -> PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = finetune_rows
  fig = plt.figure(figsize=(17, 9))
  grid = fig.add_gridspec(2, 2, height_ratios=(1, 1.3))
  ax1, ax2 = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
  ax3 = fig.add_subplot(grid[1, :])
  ax1.plot(pretrain_losses)
  ax1.set(title="1. pretraining on plain captions", xlabel="step", ylabel="CLIP loss")
  for key in ("total", "presence", "absence", "L3", "L_text"):
    points = [(r["step"], r[key]) for r in rows if key in r]  # eval rows carry other keys
    if points:
      ax2.plot(*zip(*points), label=key)
  ax2.set(title="2. Omni-NegCLIP fine-tuning", xlabel="step", ylabel="loss")
  ax2.legend()
  keys = [f"{t}_acc" for t in negshapes_task.TASKS]
  x = np.arange(len(keys))
  for offset, results, label in ((-0.2, before, "pretrained"), (0.2, after, "Omni-NegCLIP")):
    bars = ax3.bar(
      x + offset,
      [results[k] for k in keys],
      0.4,
      label=label,
      yerr=[results[k.removesuffix("_acc") + "_se"] for k in keys],
      capsize=3,
    )
    ax3.bar_label(bars, fmt="%.2f", fontsize=7, label_type="center", color="white")
  for i, key in enumerate(keys):
    chance = after[key.removesuffix("_acc") + "_chance"]
    ax3.hlines(
      chance, i - 0.45, i + 0.45, colors="k", linestyles="--", label="chance" if i == 0 else None
    )
  ax3.set_xticks(x, [_label(k).replace(" (", "\n(") for k in keys], fontsize=8)
  ax3.set(
    title=f"3. NegShapes accuracy (n = {after['n']} per task, error bars: 1 s.e.; "
    "paper-style tasks are solved by trivial rules, see the audit)",
    ylim=(0, 1.1),
  )
  ax3.legend(loc="upper right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _pretrained(root: Path, config, model, tokenizer, steps: int, batch_size: int, seed: int):
  """(model, params, losses) pretrained on seed's plain captions in `root`; reused when
  it was made with the same settings."""
  pretrained_dir = root / "hf"
  meta = {
    "seed": seed,
    "steps": steps,
    "batch_size": batch_size,
    "model": config.model,
    "negshapes_num": config.data.negshapes_num,
  }
  meta_path = root / "meta.json"
  if (
    (pretrained_dir / "model.safetensors").is_file()
    and meta_path.is_file()
    and (json.loads(meta_path.read_text()) == meta)
  ):
    print(f"Reusing the pretrained model in {pretrained_dir}", flush=True)
    model, params = convert.load_pretrained(pretrained_dir)
    return model, params, json.loads((root / "losses.json").read_text())
  for stale in root.glob("negshapes_eval_*.json"):
    stale.unlink()
  data = negshapes.generate_pairs(
    config.data.negshapes_num, seed, model.config.vision.image_size, split="train"
  )
  params, losses_ = pretrain(model, tokenizer, data, steps, batch_size, PRETRAIN_LR, seed)
  convert.save_pretrained(model, params, pretrained_dir, tokenizer=tokenizer)
  (root / "losses.json").write_text(json.dumps(losses_))
  meta_path.write_text(json.dumps(meta))
  return model, params, losses_


VARIANT_TAGS = {  # variant option -> its output-name suffix
  "hard_fraction": lambda v: f"_hard{v:g}" if v else "",
  "image_hard_fraction": lambda v: f"_imghard{v:g}" if v else "",
  "image_hard_affirmed_fraction": lambda v: f"_affirmed{v:g}" if v else "",
  "lambda_text": lambda v: f"_ltext{v:g}" if v is not None else "",
  "lambda_stage2": lambda v: f"_lstage2{v:g}" if v is not None else "",
  "objective": lambda v: f"_{v}" if v else "",
  "layers": lambda v: f"_{v}" if v else "",
  "learning_rate": lambda v: f"_lr{v:g}" if v else "",
  "grad_clip_norm": lambda v: f"_clip{v:g}" if v else "",
}


def finetune_config(
  fast: bool = False, finetune_steps: int | None = None, seed: int = 0, **variant
) -> ml_collections.ConfigDict:
  """The demo config with `run`'s fine-tuning options (`variant`: the `VARIANT_TAGS`
  options; `finetune_steps`: total_steps) and `seed` applied."""
  from negclip_jax.configs import demo as demo_config

  unknown = set(variant) - set(VARIANT_TAGS)
  if unknown:
    raise ValueError(f"unknown demo variant options {sorted(unknown)}; known: {list(VARIANT_TAGS)}")
  config = demo_config.get_config()
  if fast:
    config.model, config.data.negshapes_num, config.batch_size = "tiny", 256, 32
    config.total_steps, config.log_every, config.save_every = 4, 2, 4
  config.total_steps = finetune_steps or config.total_steps
  config.seed = seed
  config.data.negshapes_hard_fraction = variant.get("hard_fraction") or 0.0
  config.data.negshapes_image_hard_fraction = variant.get("image_hard_fraction") or 0.0
  config.data.negshapes_image_hard_affirmed_fraction = (
    variant.get("image_hard_affirmed_fraction") or 0.0
  )
  for key in ("lambda_text", "lambda_stage2"):
    if variant.get(key) is not None:
      config[key] = variant[key]
  config.objective = variant.get("objective") or config.objective
  config.layers = variant.get("layers") or config.layers
  config.learning_rate = variant.get("learning_rate") or config.learning_rate
  config.grad_clip_norm = variant.get("grad_clip_norm") or config.grad_clip_norm
  return config


def _setup(workdir, fast, pretrain_steps, finetune_steps, eval_num, seed, **variant):
  """(config, tag, tokenizer, model, params, pretrain_losses, eval_num, pretrained_root) of
  `run`'s options: the fine-tuning config (`finetune_config`) and the pretrained stand-in
  (`tag`: the suffix naming the variant's outputs). An explicit `pretrain_steps` pretrains
  in workdir/pretrained_pre<steps> (and tags the outputs "_pre<steps>"), an explicit
  `finetune_steps` tags them "_steps<steps>"."""
  config = finetune_config(fast, finetune_steps, seed, **variant)
  tag = _setup_tag(variant, {"pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps})
  root = workdir / ("pretrained" + (f"_pre{pretrain_steps}" if pretrain_steps else ""))
  pretrain_steps = pretrain_steps or (10 if fast else PRETRAIN_STEPS)
  eval_num = eval_num or (32 if fast else config.evals.negshapes.num)
  config.evals = ml_collections.ConfigDict()  # evaluated separately, on the items of `seed`
  tokenizer = ClipTokenizer()
  model = model_lib.CLIP(model_lib.get_config(config.model))
  model, params, pretrain_losses = _pretrained(
    root,
    config,
    model,
    tokenizer,
    pretrain_steps,
    config.batch_size if fast else PRETRAIN_BATCH,
    seed,
  )
  config.init = str(root / "hf")  # as one loads openai/clip-vit-base-patch32
  return config, tag, tokenizer, model, params, pretrain_losses, eval_num, root


def run(
  workdir: str | Path,
  fast: bool = False,
  pretrain_steps: int | None = None,
  finetune_steps: int | None = None,
  eval_num: int | None = None,
  seed: int = 0,
  **variant,
) -> dict:
  """The whole quickstart; returns the content of results.json.

  `seed` seeds every phase: the pretraining data, initialisation and batch order, the
  fine-tuning data and batch order (config.seed) and the evaluation items. `variant`
  (`VARIANT_TAGS`) changes the fine-tuning, and the outputs get its suffix:
  `hard_fraction` > 0 makes that fraction of the presence pairs shortcut-free hard
  negatives ("_hard<f>"), `image_hard_fraction` that fraction image-hard
  (`negshapes.generate_pairs`; a distractor objective; "_imghard<f>"), `lambda_text` and
  `lambda_stage2` the weights of L_text and of the absence loss ("_ltext<v>",
  "_lstage2<v>"), `objective`, `layers`, `learning_rate` and `grad_clip_norm` the
  config's keys.
  """
  t_start = time.perf_counter()
  workdir = Path(workdir).absolute()
  options = dict(
    fast=fast,
    pretrain_steps=pretrain_steps,
    finetune_steps=finetune_steps,
    eval_num=eval_num,
    seed=seed,
    **variant,
  )
  config, tag, tokenizer, model, params, pretrain_losses, eval_num, root = _setup(
    workdir, fast, pretrain_steps, finetune_steps, eval_num, seed, **variant
  )
  before_path = root / f"negshapes_eval_n{eval_num}.json"  # seed: meta.json
  if before_path.is_file():
    before = json.loads(before_path.read_text())
  else:
    before = evaluate_negshapes(model, params, tokenizer, eval_num, seed)
    before_path.write_text(json.dumps(before))
  print("pretrained:\n" + negshapes_task.report(before), flush=True)

  result = train_to_the_end(config, workdir / f"finetune{tag}")
  after = evaluate_negshapes(result["model"], result["params"], tokenizer, eval_num, seed)
  export.export_run(
    {**result, "eval": {"negshapes": after}}, config, workdir / f"export{tag}" / "hf", f"demo{tag}"
  )
  results = {
    "seed": seed,
    "options": options,
    "hard_fraction": config.data.negshapes_hard_fraction,
    "image_hard_fraction": config.data.negshapes_image_hard_fraction,
    "image_hard_affirmed_fraction": config.data.negshapes_image_hard_affirmed_fraction,
    "lambda_text": config.lambda_text,
    "lambda_stage2": config.lambda_stage2,
    "objective": config.objective,
    "layers": config.layers,
    "learning_rate": config.learning_rate,
    "grad_clip_norm": config.grad_clip_norm,
    "finetune_steps": config.total_steps,
    "seconds": None,
    "pretrained": before,
    "omni_negclip": after,
  }
  results["seconds"] = round(time.perf_counter() - t_start)
  (workdir / f"results{tag}.json").write_text(
    json.dumps(results_json.strict(results), indent=2, allow_nan=False)
  )
  plot(
    workdir / f"demo{tag}.png",
    pretrain_losses,
    rundir.read_metrics(workdir / f"finetune{tag}"),
    before,
    after,
  )
  print(
    "\nOmni-NegCLIP, shortcut audit (trivial rules on the same items):\n"
    + negshapes_task.report(after)
  )
  print("\n" + table(before, after))
  print(
    f"\nwrote {workdir / f'results{tag}.json'}, {workdir / f'demo{tag}.png'}, "
    f"{workdir / f'export{tag}' / 'hf'} in {time.perf_counter() - t_start:.0f} s",
    flush=True,
  )
  return results


FIT_METRICS = ("presence_train_acc", "presence_hard_train_acc")


def diagnose(
  workdir: str | Path,
  fast: bool = False,
  pretrain_steps: int | None = None,
  finetune_steps: int | None = None,
  eval_num: int | None = None,
  seed: int = 0,
  probe_num: int | None = None,
  **variant,
) -> dict:
  """Perception vs negation (`negshapes_probe_task`); returns the content of diagnose.json.

  1. Linear probes on the pretrained stand-in's frozen image features and its plain-caption
     text features: can each object's presence be read off at all?
  2. Fine-tunes as `run` does (`variant` as `run`'s, e.g. `layers`, `learning_rate`) with the "negshapes-fit" evaluator every log_every steps: the accuracy on
     the training split's own presence and hard presence pairs over steps (step 0: the
     pretrained model), i.e. whether the hard pairs are fit at all.
  """
  from negclip_jax.eval import registry

  t_start = time.perf_counter()
  workdir = Path(workdir).absolute()
  config, tag, tokenizer, model, params, *_ = _setup(
    workdir, fast, pretrain_steps, finetune_steps, eval_num, seed, **variant
  )
  probe_num = probe_num or (200 if fast else 2000)
  run_task = lambda task, p, **o: registry.run_task(
    task, model, p, tokenizer, progress=False, seed=seed, **o
  )
  perception = run_task("negshapes-probe", params, num=probe_num)
  fit_options = dict(
    num=min(512, config.data.negshapes_num),
    hard_fraction=config.data.negshapes_hard_fraction or 1.0,
  )
  fit = {0: run_task("negshapes-fit", params, **fit_options)}
  config.evals.fit = dict(task="negshapes-fit", every=config.log_every, seed=seed, **fit_options)
  train_to_the_end(config, workdir / f"diagnose{tag}")
  logged = {}  # step -> every key logged at it (training and evaluator rows)
  for row in rundir.read_metrics(workdir / f"diagnose{tag}"):
    logged.setdefault(row["step"], {}).update(row)
  for step, row in logged.items():
    if rundir.eval_key("fit", FIT_METRICS[0]) in row:
      fit[step] = {m: row[rundir.eval_key("fit", m)] for m in FIT_METRICS} | {"L3": row.get("L3")}
  results = {
    "seed": seed,
    "layers": config.layers,
    "learning_rate": config.learning_rate,
    "variant": variant,
    "perception": perception,
    "fit": {str(k): v for k, v in sorted(fit.items())},
  }
  (workdir / f"diagnose{tag}.json").write_text(json.dumps(results, indent=2))
  print(
    "\n" + "\n\n".join([probe_table(perception), oracle_table(perception), fit_table(fit)]),
    flush=True,
  )
  print(
    f"\nwrote {workdir / f'diagnose{tag}.json'} in {time.perf_counter() - t_start:.0f} s",
    flush=True,
  )
  return results


def probe_table(perception: dict) -> str:
  """Markdown: per object, the image and text probes' balanced accuracy (chance 0.5)."""
  from negclip_jax.eval.tasks.negshapes_probe_task import OBJECTS

  rows = [
    f"linear probes, balanced accuracy (chance 0.50), fit on {perception['n']} training "
    f"scenes, scored on {perception['n_test']} eval scenes",
    "| object | image features (frozen) | plain-caption text features |",
    "|---|---:|---:|",
  ]
  for c, s in OBJECTS:
    rows.append(
      f"| {c} {s} | {perception[f'image_probe_{c}_{s}']:.3f} | "
      f"{perception[f'text_probe_{c}_{s}']:.3f} |"
    )
  for stat in ("min", "mean"):
    rows.append(
      f"| **{stat}** | {perception[f'image_probe_{stat}']:.3f} | "
      f"{perception[f'text_probe_{stat}']:.3f} |"
    )
  return "\n".join(rows)


def oracle_table(perception: dict) -> str:
  """Markdown: per NegShapes task, the text oracle's accuracy on the frozen image features."""
  rows = [
    "text oracle on the frozen image features (additive text side, no tower; ties wrong)",
    "| task | n | chance | accuracy +- s.e. | (accuracy - chance) / s.e. |",
    "|---|---:|---:|---:|---:|",
  ]
  names = [*negshapes_task.TASKS]
  names += [f"mcq{s}_{t}" for s in ("", "_heldout") for t in negshapes.MCQ_TEMPLATES]
  for name in names:
    acc, se = perception[f"oracle_{name}_acc"], perception[f"oracle_{name}_se"]
    task = name if name in negshapes_task.TASKS else name.rsplit("_", 1)[0]  # mcq per template
    chance = perception[f"oracle_{task}_chance"]
    rows.append(
      f"| {_label(name + '_acc')} | {perception[f'oracle_{name}_n']} | {chance:.2f} | "
      f"{acc:.3f} +- {se:.3f} | {(acc - chance) / max(se, 1e-12):+.1f} |"
    )
  return "\n".join(rows)


def fit_table(fit: dict) -> str:
  """Markdown: accuracy on the training split's own pairs over fine-tuning steps."""
  rows = [
    "fit of the training pairs (ties wrong; chance 0.50)",
    "| step | L3 (presence pair loss) | presence (paper-style) | presence_hard |",
    "|---:|---:|---:|---:|",
  ]
  for step, row in sorted(fit.items(), key=lambda kv: int(kv[0])):
    loss = f"{row['L3']:.4f}" if row.get("L3") is not None else "-"
    cells = " | ".join(f"{row[m]:.3f}" if m in row else "-" for m in FIT_METRICS)
    rows.append(f"| {step} | {loss} | {cells} |")
  return "\n".join(rows)


# Capacity: every text layer, a 5x smaller peak rate than front's, 2x steps.
WHOLE = {"layers": "whole", "learning_rate": 1e-4, "finetune_steps": 400}
AFFIRMED = {  # paired choices on image-hard examples, half of them affirmed
  **WHOLE,
  "image_hard_fraction": 1.0,
  "image_hard_affirmed_fraction": 0.5,
  "lambda_stage2": 0.0,
  "objective": "paired_choices",
}
RECIPES = {  # name -> `run` options (a variant); `compare` runs each over seeds
  "paper": {},
  "hard": {"hard_fraction": 0.5},
  "hard_no_ltext": {"hard_fraction": 0.5, "lambda_text": 0.0},
  # capacity (WHOLE) with hard pairs
  "whole_hard": {**WHOLE, "hard_fraction": 0.5},
  # capacity on the hard pairs alone: every presence pair hard, no absence stream
  "whole_hard_only": {**WHOLE, "hard_fraction": 1.0, "lambda_stage2": 0.0},
  # the 2-way choice alone (L3), on hard pairs only: can the text tower fit them at all?
  "whole_hard_l3_only": {
    **WHOLE,
    "hard_fraction": 1.0,
    "lambda_stage2": 0.0,
    "objective": "presence_l3_only",
  },
  # L3 on the presence pairs, the batch-contrastive terms only on the absence stream's
  # plain captions (no negated text among them); all / half the presence pairs hard
  "whole_hard_l3_plain": {**WHOLE, "hard_fraction": 1.0, "objective": "l3_plain_clip"},
  "whole_half_hard_l3_plain": {**WHOLE, "hard_fraction": 0.5, "objective": "l3_plain_clip"},
  # every 2-way choice of (image, distractor) x (caption, negated), nothing across
  # examples; all / half the presence examples image-hard, absence stream off
  "whole_image_hard_paired": {
    **WHOLE,
    "image_hard_fraction": 1.0,
    "lambda_stage2": 0.0,
    "objective": "paired_choices",
  },
  "whole_half_image_hard_paired": {
    **WHOLE,
    "image_hard_fraction": 0.5,
    "lambda_stage2": 0.0,
    "objective": "paired_choices",
  },
  # the same, half the image-hard examples affirmed ("A and Y" vs "A and X"): "prefer the
  # text naming fewer shown objects" fails those, so only reading "no" fits both halves
  "whole_image_hard_paired_affirmed": AFFIRMED,
  "whole_image_hard_paired_affirmed_long": {**AFFIRMED, "finetune_steps": 1200},  # 3x the steps
  "whole_image_hard_paired_affirmed_xlong": {**AFFIRMED, "finetune_steps": 3600},  # 9x
  # 3x the steps at 3x the peak learning rate
  "whole_image_hard_paired_affirmed_long_fast": {
    **AFFIRMED,
    "learning_rate": 3e-4,
    "finetune_steps": 1200,
  },
  # ... with gradients clipped to norm 1: passes the bar (the shipped config of that name)
  "negshapes_learns_negation": {
    **AFFIRMED,
    "learning_rate": 3e-4,
    "grad_clip_norm": 1.0,
    "finetune_steps": 1200,
  },
  # the same choices, with the absence stream's batch-contrastive loss on plain captions
  # (keeps image <-> caption retrieval and affirmation; nothing negated in it)
  "whole_image_hard_paired_plain": {
    **WHOLE,
    "image_hard_fraction": 1.0,
    "objective": "paired_plain_clip",
  },
  # ... with that loss at a tenth of the weight
  "whole_image_hard_paired_plain_light": {
    **WHOLE,
    "image_hard_fraction": 1.0,
    "lambda_stage2": 0.1,
    "objective": "paired_plain_clip",
  },
  # the choices alone for 3x the steps: do the seeds settle on one solution?
  "whole_image_hard_paired_long": {
    **WHOLE,
    "finetune_steps": 1200,
    "image_hard_fraction": 1.0,
    "lambda_stage2": 0.0,
    "objective": "paired_choices",
  },
  "longer_pretraining": {"pretrain_steps": 1600},  # a stronger stand-in (4x pretraining)
  "conclip": {"objective": "conclip"},
  # image-side hard negatives: half the presence examples are absence_hard-style pairs
  "conclip_image_hard": {"objective": "conclip", "image_hard_fraction": 0.5},
}
VARIANTS = ("paper", "hard", "hard_no_ltext")  # `compare`'s default recipes
# The bar of "learns negation": the shortcut-free tasks on held-out compositions.
BAR_TASKS = ("presence_hard_heldout", "absence_hard_heldout", "mcq_heldout_negation")
PAPER_STYLE = ("presence", "absence", "presence_heldout", "absence_heldout")
# What a variant must not lose against `paper` (the bar: > -3 SEs each): the paper-style
# gains, and affirmation, which the `negation_inverted` rule fails while it solves BAR_TASKS.
KEPT_TASKS = (*PAPER_STYLE, "mcq_affirmation", "mcq_heldout_affirmation")


def _reusable(path: Path, options: dict) -> dict | None:
  """The results at `path` if a run with exactly `options` wrote them."""
  if path.is_file():
    results = json.loads(path.read_text())
    if results.get("options") == json.loads(json.dumps(options)):
      return results
  return None


def compare(
  workdir: str | Path, seeds: Sequence[int], variants: Sequence[str] | dict = VARIANTS, **kwargs
) -> dict:
  """`run` per seed and variant (names of `RECIPES`, or {name: `run` options}; default
  `VARIANTS`), sharing each seed's pretrained models in workdir/seed<S>; a run whose
  results file was written with the same options is reused, not rerun. Writes
  compare.json and prints the mean and sample standard deviation over seeds of every
  metric, the shortcut audit and the bar (`bar_table`)."""
  workdir = Path(workdir)
  if not isinstance(variants, dict):
    variants = {name: RECIPES[name] for name in variants}
  runs = {name: [] for name in variants}
  for seed in seeds:
    for name, options in variants.items():
      run_options = {**kwargs, **options}
      tag = _setup_tag(options, run_options)
      done = _reusable(
        workdir / f"seed{seed}" / f"results{tag}.json", {**run_options, "seed": seed}
      )
      if done:
        print(f"Reusing {name}, seed {seed}: {workdir / f'seed{seed}' / f'results{tag}.json'}")
      runs[name].append(done or run(workdir / f"seed{seed}", seed=seed, **run_options))
  summary = {
    "seeds": list(seeds),
    "variants": variants,
    "runs": runs,
    "table": compare_table(runs),
    "bar": bar_table(runs),
  }
  (workdir / "compare.json").write_text(json.dumps(summary, indent=2))
  print("\n" + summary["table"] + "\n\n" + summary["bar"], flush=True)
  return summary


def _setup_tag(variant: dict, run_options: dict) -> str:
  """The output suffix `_setup` gives a run with these options."""
  tag = "".join(VARIANT_TAGS[k](variant.get(k)) for k in VARIANT_TAGS)
  pre, steps = run_options.get("pretrain_steps"), run_options.get("finetune_steps")
  return tag + (f"_pre{pre}" if pre else "") + (f"_steps{steps}" if steps else "")


def _mean_sd(values: Sequence[float]) -> str:
  values = np.asarray(values)
  sd = values.std(ddof=1) if len(values) > 1 else 0.0
  return f"{values.mean():.3f} +- {sd:.3f}"


def mean_se(results: Sequence[dict], name: str) -> tuple[float, float]:
  """(mean over seeds of task `name`'s accuracy, its standard error): the larger of the
  seed-to-seed one (s.d. / sqrt(seeds)) and the items' (binomial s.e.s combined)."""
  acc = np.array([r[f"{name}_acc"] for r in results])
  items = np.sqrt(np.sum([r[f"{name}_se"] ** 2 for r in results])) / len(results)
  seeds = acc.std(ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else 0.0
  return float(acc.mean()), float(max(items, seeds))


def _audit(runs: dict, name: str) -> tuple[str, str, str]:
  """(best trivial rule, negation-blind perceiver, its mirror `negation_inverted`) on task
  `name`, mean over seeds; the audit does not depend on the model."""
  first = [r["omni_negclip"] for r in next(iter(runs.values()))]
  trivial = ("fewer_negations", "text_only", "fewer_pixels")
  best = [
    max(r[f"{name}_rule_{rule}"] for rule in trivial if f"{name}_rule_{rule}" in r)
    for r in first
    if any(f"{name}_rule_{rule}" in r for rule in trivial)
  ]
  rule = lambda rule: [r[f"{name}_rule_{rule}"] for r in first if f"{name}_rule_{rule}" in r]
  fmt = lambda v: f"{np.mean(v):.3f}" if v else "-"
  return fmt(best), fmt(rule("negation_blind")), fmt(rule("negation_inverted"))


def compare_table(runs: dict) -> str:
  """Markdown: per metric, mean +- s.d. over seeds before and after each variant (a
  variant with its own pretraining also before it), and the shortcut audit."""
  names = list(runs)
  pretraining = lambda v: runs[v][0].get("options", {}).get("pretrain_steps")
  own = [v for v in names[1:] if pretraining(v) != pretraining(names[0])]
  header = ["pretrained", *names, *(f"{v} (its pretrained)" for v in own)]
  rows = [
    "| task | chance | best trivial rule | negation-blind | negation-inverted | "
    + " | ".join(header)
    + " |",
    "|---|---:|---:|---:|---:|" + "---:|" * len(header),
  ]
  first = runs[names[0]][0]["omni_negclip"]
  for key in METRICS:
    name = key.removesuffix("_acc")
    cells = [_mean_sd([r["pretrained"][key] for r in runs[names[0]]])]
    cells += [_mean_sd([r["omni_negclip"][key] for r in runs[v]]) for v in names]
    cells += [_mean_sd([r["pretrained"][key] for r in runs[v]]) for v in own]
    audit = _audit(runs, name) if not key.startswith("retrieval") else ("-", "-", "-")
    rows.append(
      f"| {_label(key)} | {_chance(first, name)} | {' | '.join(audit)} | "
      + " | ".join(cells)
      + " |"
    )
  seconds = [sum(r.get("seconds") or 0 for r in runs[v]) for v in names]
  rows.append(
    "| wall seconds, all seeds (with any pretraining the run did) | | | | | - | "
    + " | ".join(f"{t:.0f}" for t in seconds)
    + " |"
  )
  return "\n".join(rows)


def bar_table(runs: dict, reference: str = "paper") -> str:
  """Markdown: per variant, the `BAR_TASKS` above chance in standard errors of the
  seed mean (`mean_se`; the bar: >= 3 each) and the `KEPT_TASKS`' change against
  `reference` in standard errors of the difference (the bar: > -3 each)."""
  rows = [
    "| variant | seeds | "
    + " | ".join(f"{_label(t + '_acc')} - chance (SEs)" for t in BAR_TASKS)
    + " | worst change of a kept task vs "
    + reference
    + " (SEs) | passes |",
    "|---|---:|" + "---:|" * (len(BAR_TASKS) + 2),
  ]
  for name, results in runs.items():
    after = [r["omni_negclip"] for r in results]
    cells, ok = [], True
    for task in BAR_TASKS:
      mean, se = mean_se(after, task)
      chance = 0.25 if task.startswith("mcq") else after[0][f"{task}_chance"]
      z = (mean - chance) / se if se > 0 else 0.0
      ok &= z >= 3
      cells.append(f"{mean - chance:+.3f} ({z:+.1f})")
    if reference in runs and name != reference:
      ref = [r["omni_negclip"] for r in runs[reference]]
      worst = min(
        (
          (mean_se(after, t)[0] - mean_se(ref, t)[0])
          / np.hypot(mean_se(after, t)[1], mean_se(ref, t)[1]),
          t,
        )
        for t in KEPT_TASKS
      )
      ok &= worst[0] > -3
      cells.append(f"{worst[0]:+.1f} ({_label(worst[1] + '_acc')})")
    else:
      cells.append("-")
    rows.append(
      f"| {name} | {len(results)} | " + " | ".join(cells) + f" | {'yes' if ok else 'no'} |"
    )
  return "\n".join(rows)


PRETRAIN_STEPS = 400
PRETRAIN_BATCH = 128
PRETRAIN_LR = 1e-3


def train_to_the_end(config, workdir: Path) -> dict:
  """`trainer.train`; a run stopped early (SIGTERM or Ctrl-C: the trainer saved a
  checkpoint) ends the demo, exit status 130, before a partly trained model is evaluated."""
  result = trainer.train(config, workdir)
  if result["stopped_early"]:
    print(
      f"negclip-demo: stopped at step {result['step']} of {result['total_steps']} (checkpoint "
      f"saved in {workdir}); nothing evaluated; rerun the same command to resume",
      file=sys.stderr,
      flush=True,
    )
    sys.exit(console.INTERRUPT_EXIT)
  return result


def main(argv=None):
  parser = console.ArgumentParser(
    prog="negclip-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--workdir",
    default="runs/demo",
    help="output folder (pretrained model, runs, results, plot, export)",
  )
  parser.add_argument("--fast", action="store_true", help="a few steps of a tiny model (tests)")
  parser.add_argument(
    "--pretrain-steps", type=int, help=f"plain-caption pretraining steps (default {PRETRAIN_STEPS})"
  )
  parser.add_argument(
    "--finetune-steps", type=int, help="Omni-NegCLIP steps (default: the demo config's total_steps)"
  )
  parser.add_argument(
    "--eval-num", type=int, help="examples per NegShapes task (default: the demo config's eval_num)"
  )
  parser.add_argument(
    "--seed", type=int, default=0, help="seeds every phase: pretraining, fine-tuning, evaluation"
  )
  parser.add_argument(
    "--hard-fraction",
    type=float,
    default=0.0,
    help="fraction of fine-tuning presence pairs that are hard negatives",
  )
  parser.add_argument(
    "--image-hard-fraction",
    type=float,
    default=0.0,
    help="fraction of fine-tuning presence examples that are image-hard (distractor objectives)",
  )
  parser.add_argument(
    "--image-hard-affirmed-fraction",
    type=float,
    default=0.0,
    help='fraction of the image-hard examples whose texts are affirmed ("A and Y" vs "A and X")',
  )
  parser.add_argument("--lambda-text", type=float, help="weight of L_text (config default)")
  parser.add_argument(
    "--lambda-stage2", type=float, help="weight of the absence loss (config default)"
  )
  parser.add_argument("--objective", help="config.objective (default: the demo config's)")
  parser.add_argument("--layers", help="config.layers (front|middle|back|whole)")
  parser.add_argument("--learning-rate", type=float, help="config.learning_rate")
  parser.add_argument("--grad-clip-norm", type=float, help="config.grad_clip_norm (0: off)")
  parser.add_argument(
    "--recipe",
    nargs="+",
    choices=list(RECIPES),
    help="named variants (`RECIPES`): one for a run or --diagnose, any for --compare-seeds",
  )
  parser.add_argument(
    "--diagnose",
    action="store_true",
    help="linear probes of the frozen features and the fit of the training pairs over steps",
  )
  parser.add_argument("--probe-num", type=int, help="--diagnose: probe training scenes (2000)")
  parser.add_argument(
    "--compare-seeds",
    type=int,
    nargs="+",
    help=f"per seed, each --recipe (default {' '.join(VARIANTS)}); mean +- s.d. and the bar",
  )
  args = parser.parse_args(argv)
  options = dict(
    fast=args.fast,
    pretrain_steps=args.pretrain_steps,
    finetune_steps=args.finetune_steps,
    eval_num=args.eval_num,
  )
  flags = dict(
    hard_fraction=args.hard_fraction or None,
    image_hard_fraction=args.image_hard_fraction or None,
    image_hard_affirmed_fraction=args.image_hard_affirmed_fraction or None,
    lambda_text=args.lambda_text,
    lambda_stage2=args.lambda_stage2,
    objective=args.objective,
    layers=args.layers,
    learning_rate=args.learning_rate,
    grad_clip_norm=args.grad_clip_norm,
  )
  flags = {k: v for k, v in flags.items() if v is not None}
  if args.compare_seeds:
    if flags or args.diagnose:
      parser.error(
        "--compare-seeds runs the variants named by --recipe; drop "
        + ("--diagnose" if args.diagnose else "--" + next(iter(flags)).replace("_", "-"))
      )
    return compare(args.workdir, args.compare_seeds, args.recipe or VARIANTS, **options)
  if args.recipe and len(args.recipe) > 1:
    parser.error("several --recipe names need --compare-seeds")
  variant = {**options, **(RECIPES[args.recipe[0]] if args.recipe else {}), **flags}
  if args.diagnose:
    return diagnose(args.workdir, seed=args.seed, probe_num=args.probe_num, **variant)
  return run(args.workdir, seed=args.seed, **variant)


@console.boundary()
def cli(argv: list[str] | None = None):
  """Console script `negclip-demo` (= python -m negclip_jax.demo); exit status 0 on success,
  1 with one `error:` line for a bad file or value, 2 for a bad command line."""
  console.enable_compilation_cache()
  main(argv)


if __name__ == "__main__":
  cli()
