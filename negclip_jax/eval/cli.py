"""Evaluate a CLIP on the negation benchmarks (and plain retrieval, zero-shot classification).

CLI (`python -m negclip_jax.evaluate` is the same)::

  negclip-eval --model PATH --task TASK [task options]
      [--protocol original|hf] [--dtype float32|bfloat16|float16]
      [--out results.json] [--batch-size N]

PATH is anything `load_pretrained` reads, or a training run directory holding
`checkpoints/`. Writes ``{"header": {model, step, version, command, tasks: {task:
{protocol, dtype, data files}}}, "results": {task: {metric: value, ..., "n": count}}}`` as
strict JSON (NaN as null; `eval/results.py`) to --out and a markdown table to the same
path with suffix .md (also printed). `--task all` runs
every task whose data options are given (negshapes needs none). `--protocol original`
(default) follows the original scripts (OpenAI `clip` preprocessing, their decision
rules); `hf` preprocesses as transformers' `CLIPImageProcessor`. See docs/evaluate.md.

"""

from __future__ import annotations

import argparse
import sys

import jax

from negclip_jax import console, rundir, storage
from negclip_jax.data import parallel_read
from negclip_jax.data.ccneg import CCNEG_EVAL_SIZE
from negclip_jax.eval import results as results_json
from negclip_jax.eval.embed import DTYPES, Embedder
from negclip_jax.eval.metrics import NEGATION_WORDS, TIES
from negclip_jax.eval.registry import TASKS, markdown, missing_options, run_with_embedder
from negclip_jax.eval.tasks import zeroshot_task
from negclip_jax.eval.tasks.negbench_task import ANSWER_TYPES
from negclip_jax.model.preprocess import PREPROCESS


def _parser() -> argparse.ArgumentParser:
  p = console.ArgumentParser(
    prog="negclip-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", required=True, help="HF CLIP dir, state-dict file, or run dir")
  p.add_argument("--task", required=True, choices=[*TASKS, "all"])
  p.add_argument("--out", help="results JSON path (also writes <stem>.md, <stem>_layers.png)")
  p.add_argument("--batch-size", type=int, default=256, help="per process")
  p.add_argument(
    "--read-threads",
    type=int,
    default=0,
    help="threads reading images ahead of the device (0: from the CPU count; 1: serial)",
  )
  p.add_argument(
    "--decode-processes",
    type=int,
    default=0,
    help="processes decoding the images the threads read (0: none, the threads decode; -1: one "
    "per CPU up to 16)",
  )
  p.add_argument(
    "--fsdp",
    type=int,
    default=0,
    help="shard the parameters over this many devices (-1: all), as "
    "config.parallelism=fsdp trains; 0 (default): replicate on each device",
  )
  p.add_argument(
    "--protocol",
    choices=sorted(PREPROCESS),
    default="original",
    help="original: as the original scripts (OpenAI clip preprocessing); "
    "hf: CLIPImageProcessor preprocessing (not negshapes, layers)",
  )
  p.add_argument(
    "--dtype",
    choices=list(DTYPES),
    default="float32",
    help="inference precision (the original scripts ran float16 on CUDA)",
  )
  p.add_argument("--data", help="the chosen task's data file (not with --task all)")
  p.add_argument("--image-root", help="the chosen task's image folder (not with --task all)")
  for task, spec in TASKS.items():
    for option, help_ in spec.files.items():
      p.add_argument(f"--{task}-{option.replace('_', '-')}", help=f"{task}: {help_}")
  p.add_argument(
    "--eval-size",
    type=int,
    default=CCNEG_EVAL_SIZE,
    help="ccneg, layers: the last N CC-Neg records are the eval split",
  )
  p.add_argument(
    "--split",
    default="test",
    help="retrieval: Karpathy split; zeroshot: TFDS split (imagenet2012: validation)",
  )
  p.add_argument(
    "--num",
    type=int,
    help="negshapes: examples (default 500); negshapes-probe: training scenes (default "
    "2000); negshapes-fit: training pairs (default 512); layers: first N "
    "pairs (default all CC-Neg train records, 500 NegShapes pairs); zeroshot: "
    "first N images (default all)",
  )
  p.add_argument(
    "--tfds-data-dir", help="zeroshot, ccneg-tfds: TFDS data_dir holding the prepared dataset"
  )
  p.add_argument(
    "--classnames",
    help=f"zeroshot: {sorted(zeroshot_task.CLASSNAMES)} or a JSON list "
    "in label order (default: the dataset's label names; OpenAI's for imagenet2012)",
  )
  p.add_argument(
    "--templates",
    help=f"zeroshot: {list(zeroshot_task.TEMPLATES)} (default "
    "openai_imagenet, OpenAI's 80) or a JSON list of '...{}...' prompts",
  )
  p.add_argument(
    "--seed", type=int, default=0, help="negshapes, negshapes-probe/-fit, layers: generator seed"
  )
  p.add_argument("--image-size", type=int, help="negshapes*: rendered size (default model's)")
  p.add_argument(
    "--hard-fraction",
    type=float,
    help="negshapes-fit: fraction of hard presence pairs drawn (default 1; a run's "
    "data.negshapes_hard_fraction gives the very pairs it trained on)",
  )
  p.add_argument(
    "--ties",
    choices=[*TIES, "both"],
    default="optimistic",
    help="retrieval tasks: rank rule for tied scores (both: add *_pessimistic)",
  )
  p.add_argument(
    "--negation-words",
    nargs="+",
    default=list(NEGATION_WORDS),
    help="ccneg: report the subset whose negated caption contains each word",
  )
  p.add_argument(
    "--num-ops",
    action="store_true",
    help="ccneg: subsets by object-predicate count (the .pt's num_ops field)",
  )
  p.add_argument(
    "--mcq-layout",
    choices=sorted(ANSWER_TYPES),
    default="coco",
    help="negbench-mcq: answer type of each caption index (wrong-answer breakdown)",
  )
  p.add_argument(
    "--embeddings",
    action="store_true",
    help="layers: also report the embedding output (input of block 0)",
  )
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
  out = storage.path(args.out) if args.out else None
  plot_path = str(out.with_name(out.stem + "_layers.png")) if out else None
  if args.read_threads < 0:
    parser.error(f"--read-threads {args.read_threads}: give >= 0 (0: from the CPU count)")
  if args.decode_processes < -1:
    parser.error(f"--decode-processes {args.decode_processes}: give >= -1 (-1: one per CPU)")
  if args.task == "all":
    if args.data or args.image_root:
      parser.error(
        "--data/--image-root are ambiguous with --task all; use --<task>-data and "
        "--<task>-image-root (e.g. --ccneg-data)"
      )
    tasks = [t for t in TASKS if not missing_options(t, _task_options(args, t, plot_path))]
  else:
    tasks = [args.task]
    missing = missing_options(args.task, _task_options(args, args.task, plot_path))
    if missing:
      parser.error("; ".join(missing))
  console.enable_compilation_cache()
  loaded = rundir.load(args.model)
  model, params, tokenizer = loaded.model, loaded.params, loaded.tokenizer
  mesh = None
  if args.fsdp:
    from negclip_jax.train import sharding

    mesh = sharding.make_mesh(args.fsdp)
  parallel_read.set_decode_processes(args.decode_processes)
  embedder = Embedder(
    model, params, args.batch_size, dtype=args.dtype, mesh=mesh, read_threads=args.read_threads
  )
  results = {
    t: run_with_embedder(t, embedder, tokenizer, _task_options(args, t, plot_path)) for t in tasks
  }
  table = markdown(results)
  if jax.process_index() != 0:
    return results
  print(table, end="")
  if out:
    tasks = {
      t: results_json.task_header(t, _task_options(args, t, plot_path), args.dtype) for t in tasks
    }
    command = ["negclip-eval", *(sys.argv[1:] if argv is None else argv)]
    head = results_json.header(args.model, tasks, loaded.step, command)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(results_json.document(head, results))
    out.with_suffix(".md").write_text(table)
  return results


@console.boundary()
def cli(argv: list[str] | None = None):
  """Console script `negclip-eval` (= python -m negclip_jax.evaluate); exit status 0 on
  success, 1 with one `error:` line for a bad file or value, 2 for a bad command line."""
  main(argv)


if __name__ == "__main__":
  cli()
