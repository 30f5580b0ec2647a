"""The evaluation tasks by name: `TASKS` (each task's function and options) and `run_task`.

Python API: `run_task(task, model, params, tokenizer, **options)` -> {metric: value, ...,
"n": count}; the per-task functions on loaded data live in `negclip_jax.eval.tasks.*`.
`negclip-eval` (`eval/cli.py`) and the training-time evaluators (`eval/evaluators.py`)
run tasks through here. See docs/evaluate.md.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from negclip_jax.eval.embed import Embedder
from negclip_jax.eval.tasks import (
  ccneg_task,
  layers_task,
  negationclip_task,
  negbench_task,
  negrefcocog_task,
  negshapes_probe_task,
  negshapes_task,
  retrieval_task,
  zeroshot_task,
)


@dataclasses.dataclass(frozen=True)
class Task:
  """A task's `run(embedder, tokenizer, context_length, **options)` and its options.

  `files` are per-task file options (CLI --data/--image-root or --<task>-data/...),
  all required; `shared` are optional options common to several tasks.
  """

  run: Callable[..., dict]
  files: dict[str, str]  # option -> help
  shared: tuple[str, ...] = ()


_IMAGE_ROOT = "directory the image paths are relative to"
_RANKED = ("protocol", "ties")
TASKS = {
  "ccneg": Task(
    ccneg_task.run,
    {
      "data": "CC-Neg ccneg_preprocessed.pt or .jsonl",
      "image_root": "CC-Neg image folder (replaces /workspace/datasets/cc3m/)",
    },
    ("eval_size", "protocol", "negation_words", "num_ops"),
  ),
  "ccneg-wds": Task(
    ccneg_task.run_shards,
    {"data": "CC-Neg-style webdataset shards, e.g. 'shards/{00000..00007}.tar'"},
    ("protocol", "negation_words"),
  ),
  "ccneg-tfds": Task(
    ccneg_task.run_tfds,
    {
      "tfds_data_dir": "TFDS data_dir holding negclip_ccneg (python -m negclip_jax.data.tfds_builders)"
    },
    ("protocol", "negation_words"),
  ),
  "ccneg2": Task(
    ccneg_task.run2,
    {"data": "CC-Neg mode-2 .pt (positive/negative images)", "image_root": _IMAGE_ROOT},
    ("protocol",),
  ),
  "negrefcocog": Task(
    negrefcocog_task.run,
    {"data": "NegRefCOCOg JSON", "image_root": "COCO train2014 folder"},
    ("protocol",),
  ),
  "negationclip": Task(
    negationclip_task.run,
    {"data": "COCO-captions JSON with updated_caption", "image_root": "folder of the COCO images"},
    _RANKED,
  ),
  "retrieval": Task(
    retrieval_task.run,
    {"data": "Karpathy dataset_coco.json / dataset_flickr30k.json", "image_root": _IMAGE_ROOT},
    ("split", *_RANKED),
  ),
  "negbench-mcq": Task(
    negbench_task.run_mcq,
    {"data": "NegBench MCQ CSV", "image_root": _IMAGE_ROOT},
    ("protocol", "mcq_layout"),
  ),
  "negbench-binary-mcq": Task(
    negbench_task.run_binary_mcq,
    {"data": "NegBench binary MCQ CSV", "image_root": _IMAGE_ROOT},
    ("protocol",),
  ),
  "negbench-retrieval": Task(
    negbench_task.run_retrieval,
    {"data": "NegBench retrieval CSV", "image_root": _IMAGE_ROOT},
    _RANKED,
  ),
  "negshapes": Task(negshapes_task.run, {}, ("num", "seed", "image_size")),
  "negshapes-probe": Task(negshapes_probe_task.perception, {}, ("num", "seed", "image_size")),
  "negshapes-fit": Task(
    negshapes_probe_task.fit, {}, ("num", "seed", "hard_fraction", "image_size")
  ),
  "layers": Task(
    layers_task.run,
    {"data": "CC-Neg .pt/.jsonl (train split), or 'negshapes'"},
    ("num", "seed", "eval_size", "embeddings", "plot_path"),
  ),
  "zeroshot": Task(
    zeroshot_task.run,
    {
      "data": "TFDS dataset name prepared under --tfds-data-dir "
      "(e.g. imagenet2012), or an image folder "
      "<split>/<class>/<image>"
    },
    ("tfds_data_dir", "split", "classnames", "templates", "protocol", "num"),
  ),
}


def _flag(option: str) -> str:
  return "--" + option.replace("_", "-")


def missing_options(task: str, options: dict) -> list[str]:
  """Messages naming each required option of `task` that `options` lacks (None = lacks)."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
  return [
    f"task {task!r} needs {_flag(o)} ({help_})"
    for o, help_ in TASKS[task].files.items()
    if options.get(o) is None
  ]


def run_with_embedder(task: str, embedder: Embedder, tokenizer, options: dict) -> dict:
  missing = missing_options(task, options)
  if missing:
    raise ValueError("; ".join(missing))
  spec = TASKS[task]
  unknown = sorted(set(options) - set(spec.files) - set(spec.shared))
  if unknown:
    raise TypeError(
      f"task {task!r} takes no options {unknown}; it takes {sorted([*spec.files, *spec.shared])}"
    )
  context_length = embedder.model.config.text.max_position_embeddings
  return spec.run(
    embedder, tokenizer, context_length, **{k: v for k, v in options.items() if v is not None}
  )


def run_task(
  task: str,
  model,
  params,
  tokenizer,
  batch_size: int = 256,
  progress: bool = True,
  dtype: str = "float32",
  mesh=None,
  **options,
) -> dict:
  """Runs one task -> {metric: value, ..., "n": count}, computing in `dtype`; `mesh`
  (`sharding.make_mesh`): params sharded over its fsdp axis (`Embedder`).

  options (None = default): data, image_root (files; required where the task has them),
  eval_size, split, num, seed, image_size, protocol, ties, negation_words, num_ops,
  mcq_layout, embeddings, plot_path, tfds_data_dir, classnames, templates, hard_fraction
  (see `TASKS`).
  Raises ValueError naming a missing option, TypeError for options the task does not take.
  """
  embedder = Embedder(model, params, batch_size, progress=progress, dtype=dtype, mesh=mesh)
  return run_with_embedder(task, embedder, tokenizer, options)


def markdown(results: dict) -> str:
  """{task: {metric: value}} -> a "| task | metric | value |" markdown table."""
  rows = ["| task | metric | value |", "| --- | --- | --- |"]
  for task, metrics in results.items():
    for name, value in metrics.items():
      shown = f"{value:.4f}" if isinstance(value, float) else str(value)
      rows.append(f"| {task} | {name} | {shown} |")
  return "\n".join(rows) + "\n"
