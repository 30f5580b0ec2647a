"""Evaluate a CLIP on the negation benchmarks (and plain retrieval, zero-shot classification).

CLI (`negclip-eval` is the same)::

  python -m negclip_jax.evaluate --model PATH --task TASK [task options]
      [--protocol original|hf] [--dtype float32|bfloat16|float16]
      [--out results.json] [--batch-size N]

PATH is anything `load_pretrained` reads, or a training run directory holding
`checkpoints/`. Writes ``{task: {metric: value, ..., "n": count}}`` as JSON to --out and
a markdown table to the same path with suffix .md (also printed). `--task all` runs
every task whose data options are given (negshapes needs none). `--protocol original`
(default) follows the original scripts (OpenAI `clip` preprocessing, their decision
rules); `hf` preprocesses as transformers' `CLIPImageProcessor`. See docs/evaluate.md.

Python API: `run_task(task, model, params, tokenizer, **options)`; the per-task
functions on loaded data live in `negclip_jax.tasks.*`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Callable

import jax
from etils import epath

from negclip_jax.convert import load_pretrained
from negclip_jax.data.ccneg import CCNEG_EVAL_SIZE
from negclip_jax.embed import DTYPES, Embedder
from negclip_jax.preprocess import PREPROCESS
from negclip_jax.tasks import ccneg, layers, negationclip, negbench, negrefcocog, negshapes
from negclip_jax.tasks import retrieval, zeroshot
from negclip_jax.tasks.metrics import TIES
from negclip_jax.tasks.negbench import ANSWER_TYPES
from negclip_jax.tokenizer import ClipTokenizer


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
    "ccneg": Task(ccneg.run, {"data": "CC-Neg ccneg_preprocessed.pt or .jsonl",
                              "image_root": "CC-Neg image folder (replaces /workspace/datasets/cc3m/)"},
                  ("eval_size", "protocol", "negation_words", "num_ops")),
    "ccneg2": Task(ccneg.run2, {"data": "CC-Neg mode-2 .pt (positive/negative images)",
                                "image_root": _IMAGE_ROOT}, ("protocol",)),
    "negrefcocog": Task(negrefcocog.run, {"data": "NegRefCOCOg JSON",
                                          "image_root": "COCO train2014 folder"}, ("protocol",)),
    "negationclip": Task(negationclip.run, {"data": "COCO-captions JSON with updated_caption",
                                            "image_root": "folder of the COCO images"}, _RANKED),
    "retrieval": Task(retrieval.run, {"data": "Karpathy dataset_coco.json / dataset_flickr30k.json",
                                      "image_root": _IMAGE_ROOT}, ("split", *_RANKED)),
    "negbench-mcq": Task(negbench.run_mcq, {"data": "NegBench MCQ CSV",
                                            "image_root": _IMAGE_ROOT}, ("protocol", "mcq_layout")),
    "negbench-binary-mcq": Task(negbench.run_binary_mcq,
                                {"data": "NegBench binary MCQ CSV", "image_root": _IMAGE_ROOT},
                                ("protocol",)),
    "negbench-retrieval": Task(negbench.run_retrieval, {"data": "NegBench retrieval CSV",
                                                        "image_root": _IMAGE_ROOT}, _RANKED),
    "negshapes": Task(negshapes.run, {}, ("num", "seed", "image_size")),
    "layers": Task(layers.run, {"data": "CC-Neg .pt/.jsonl (train split), or 'negshapes'"},
                   ("num", "seed", "eval_size", "embeddings", "plot_path")),
    "zeroshot": Task(zeroshot.run, {"data": "TFDS dataset name prepared under --tfds-data-dir "
                                            "(e.g. imagenet2012), or an image folder "
                                            "<split>/<class>/<image>"},
                     ("tfds_data_dir", "split", "classnames", "templates", "protocol", "num")),
}


def _flag(option: str) -> str:
  return "--" + option.replace("_", "-")


def missing_options(task: str, options: dict) -> list[str]:
  """Messages naming each required option of `task` that `options` lacks (None = lacks)."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
  return [f"task {task!r} needs {_flag(o)} ({help_})"
          for o, help_ in TASKS[task].files.items() if options.get(o) is None]


def _run(task: str, embedder: Embedder, tokenizer, options: dict) -> dict:
  missing = missing_options(task, options)
  if missing:
    raise ValueError("; ".join(missing))
  spec = TASKS[task]
  unknown = sorted(set(options) - set(spec.files) - set(spec.shared))
  if unknown:
    raise TypeError(f"task {task!r} takes no options {unknown}; it takes "
                    f"{sorted([*spec.files, *spec.shared])}")
  context_length = embedder.model.config.text.max_position_embeddings
  return spec.run(embedder, tokenizer, context_length,
                  **{k: v for k, v in options.items() if v is not None})


def run_task(task: str, model, params, tokenizer, batch_size: int = 256, progress: bool = True,
             dtype: str = "float32", mesh=None, **options) -> dict:
  """Runs one task -> {metric: value, ..., "n": count}, computing in `dtype`; `mesh`
  (`sharding.make_mesh`): params sharded over its fsdp axis (`Embedder`).

  options (None = default): data, image_root (files; required where the task has them),
  eval_size, split, num, seed, image_size, protocol, ties, negation_words, num_ops,
  mcq_layout, embeddings, plot_path, tfds_data_dir, classnames, templates (see `TASKS`).
  Raises ValueError naming a missing option, TypeError for options the task does not take.
  """
  embedder = Embedder(model, params, batch_size, progress=progress, dtype=dtype, mesh=mesh)
  return _run(task, embedder, tokenizer, options)


def load_model(path: str):
  """(model, params, tokenizer) from a run directory (with checkpoints/) or `load_pretrained`
  (local or ``gs://``)."""
  path = epath.Path(path)
  if (path / "checkpoints").exists():
    from negclip_jax.checkpoint import load_run  # only run directories need it
    return load_run(path)
  model, params = load_pretrained(path)
  return model, params, ClipTokenizer.for_model_dir(path)


def markdown(results: dict) -> str:
  """{task: {metric: value}} -> a "| task | metric | value |" markdown table."""
  rows = ["| task | metric | value |", "| --- | --- | --- |"]
  for task, metrics in results.items():
    for name, value in metrics.items():
      shown = f"{value:.4f}" if isinstance(value, float) else str(value)
      rows.append(f"| {task} | {name} | {shown} |")
  return "\n".join(rows) + "\n"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m negclip_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="HF CLIP dir, state-dict file, or run dir")
  p.add_argument("--task", required=True, choices=[*TASKS, "all"])
  p.add_argument("--out", help="results JSON path (also writes <stem>.md, <stem>_layers.png)")
  p.add_argument("--batch-size", type=int, default=256, help="per process")
  p.add_argument("--fsdp", type=int, default=0,
                 help="shard the parameters over this many devices (-1: all), as "
                      "config.parallelism=fsdp trains; 0 (default): replicate on each device")
  p.add_argument("--protocol", choices=sorted(PREPROCESS), default="original",
                 help="original: as the original scripts (OpenAI clip preprocessing); "
                      "hf: CLIPImageProcessor preprocessing (not negshapes, layers)")
  p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                 help="inference precision (the original scripts ran float16 on CUDA)")
  p.add_argument("--data", help="the chosen task's data file (not with --task all)")
  p.add_argument("--image-root", help="the chosen task's image folder (not with --task all)")
  for task, spec in TASKS.items():
    for option, help_ in spec.files.items():
      p.add_argument(f"--{task}-{option.replace('_', '-')}", help=f"{task}: {help_}")
  p.add_argument("--eval-size", type=int, default=CCNEG_EVAL_SIZE,
                 help="ccneg, layers: the last N CC-Neg records are the eval split")
  p.add_argument("--split", default="test", help="retrieval: Karpathy split; zeroshot: TFDS "
                 "split (imagenet2012: validation)")
  p.add_argument("--num", type=int, help="negshapes: examples (default 500); layers: first N "
                 "pairs (default all CC-Neg train records, 500 NegShapes pairs); zeroshot: "
                 "first N images (default all)")
  p.add_argument("--tfds-data-dir", help="zeroshot: TFDS data_dir holding the prepared dataset")
  p.add_argument("--classnames", help=f"zeroshot: {sorted(zeroshot.CLASSNAMES)} or a JSON list "
                 "in label order (default: the dataset's label names; OpenAI's for imagenet2012)")
  p.add_argument("--templates", help=f"zeroshot: {list(zeroshot.TEMPLATES)} (default "
                 "openai_imagenet, OpenAI's 80) or a JSON list of '...{}...' prompts")
  p.add_argument("--seed", type=int, default=0, help="negshapes, layers: generator seed")
  p.add_argument("--image-size", type=int, help="negshapes: rendered size (default model's)")
  p.add_argument("--ties", choices=[*TIES, "both"], default="optimistic",
                 help="retrieval tasks: rank rule for tied scores (both: add *_pessimistic)")
  p.add_argument("--negation-words", nargs="+", default=list(ccneg.NEGATION_WORDS),
                 help="ccneg: report the subset whose negated caption contains each word")
  p.add_argument("--num-ops", action="store_true",
                 help="ccneg: subsets by object-predicate count (the .pt's num_ops field)")
  p.add_argument("--mcq-layout", choices=sorted(ANSWER_TYPES), default="coco",
                 help="negbench-mcq: answer type of each caption index (wrong-answer breakdown)")
  p.add_argument("--embeddings", action="store_true",
                 help="layers: also report the embedding output (input of block 0)")
  return p


def _task_options(args, task: str, plot_path: str | None) -> dict:
  """The options of `task` from parsed CLI args (per-task flags override --data/--image-root)."""
  spec = TASKS[task]
  options = {}
  for option in spec.files:
    own = getattr(args, f"{task}_{option}".replace("-", "_"))
    options[option] = own if own is not None else getattr(args, option)
  options.update({o: getattr(args, o) for o in spec.shared if o != "plot_path"})
  if "plot_path" in spec.shared:
    options["plot_path"] = plot_path
  return options


def main(argv: list[str] | None = None) -> dict:
  """CLI entry point; returns {task: metrics}."""
  parser = _parser()
  args = parser.parse_args(argv)
  out = epath.Path(args.out) if args.out else None
  plot_path = str(out.with_name(out.stem + "_layers.png")) if out else None
  if args.task == "all":
    if args.data or args.image_root:
      parser.error("--data/--image-root are ambiguous with --task all; use --<task>-data and "
                   "--<task>-image-root (e.g. --ccneg-data)")
    tasks = [t for t in TASKS if not missing_options(t, _task_options(args, t, plot_path))]
  else:
    tasks = [args.task]
    missing = missing_options(args.task, _task_options(args, args.task, plot_path))
    if missing:
      parser.error("; ".join(missing))
  try:
    model, params, tokenizer = load_model(args.model)
    mesh = None
    if args.fsdp:
      from negclip_jax import sharding
      mesh = sharding.make_mesh(args.fsdp)
    embedder = Embedder(model, params, args.batch_size, dtype=args.dtype, mesh=mesh)
    results = {t: _run(t, embedder, tokenizer, _task_options(args, t, plot_path)) for t in tasks}
  except (OSError, ValueError) as e:  # a missing/unreadable file or record, named in `e`
    sys.exit(f"error: {e}")
  table = markdown(results)
  if jax.process_index() != 0:
    return results
  print(table, end="")
  if out:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
  return results


def cli():
  """Console script `negclip-eval` (= python -m negclip_jax.evaluate); exit status 0 on success."""
  main()


if __name__ == "__main__":
  cli()
