"""Export a trained model for PyTorch users, with a model card.

negclip-export RUN_OR_CHECKPOINT --format hf|openai|both --out DIR

RUN_OR_CHECKPOINT is a training run directory (its newest readable checkpoint), one of
its checkpoints (``RUN/checkpoints/STEP``), or anything `convert.load_pretrained` reads.
One format is written into DIR, ``both`` into DIR/hf and DIR/openai. Every export holds
a model card (README.md: base model, trained parameters, objective and loss weights,
steps done of the run's total, marked unfinished when short of it, data, the final
evaluation when the run logged one, a table per task, how to load it); the HF one
also config.json (with ``architectures``), model.safetensors, the preprocessor and the
tokenizer files. Training runs export to WORKDIR/export/hf when they finish.
"""

from __future__ import annotations

import argparse
import json
import os

from etils import epath

from negclip_jax import console, rundir, storage
from negclip_jax.model import clip as model_lib
from negclip_jax.model import convert
from negclip_jax.train import param_groups

FORMATS = ("hf", "openai")
CARD = "README.md"


def openai_loadable(config) -> bool:
  """Whether OpenAI `clip.model.build_model` rebuilds `config` from its state dict alone:
  heads = width / 64, QuickGELU, argmax-EOT pooling, LayerNorm eps 1e-5."""
  towers = (config.text, config.vision)
  return (
    all(
      t.hidden_size == 64 * t.num_attention_heads
      and t.hidden_act == "quick_gelu"
      and t.layer_norm_eps == 1e-5
      for t in towers
    )
    and config.text.eos_token_id == model_lib.OPENAI_EOS_TOKEN_ID
  )


def base_model_name(init: str) -> str:
  """`config.init` as a card shows it: a Hub id, a relative path or a URI as given; an
  absolute local path by its last two parts (a card does not carry this machine's paths)."""
  if "://" in init or not os.path.isabs(init):
    return init
  return "/".join(epath.Path(init).parts[-2:])


def steps_done(step: int | None, total: int | None, run_config: dict) -> str:
  """ "40 of 40", "2 of 40 (unfinished: ...)" or, for a length in epochs, "N (num_epochs=E)"."""
  if total is None:
    return f"{step} (num_epochs={run_config.get('num_epochs')})"
  if step is not None and step < total:
    return f"{step} of {total} (unfinished: the run stopped before its last step)"
  return f"{step} of {total}"


def evaluation_tables(evaluation: dict) -> str:
  """{metric: value} -> one markdown table; {task: {metric: value}} -> a table per task;
  metrics sorted by name."""
  shown = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  nested = all(isinstance(v, dict) for v in evaluation.values())
  groups = sorted(evaluation.items()) if nested else [(None, evaluation)]
  out = []
  for task, metrics in groups:
    rows = [f"| {k} | {shown(v)} |" for k, v in sorted(metrics.items())]
    out += [f"### {task}\n"] if task is not None else []
    out += ["\n".join(["| metric | value |", "|---|---:|", *rows]), ""]
  return "\n".join(out).rstrip()


def model_card(
  model_config,
  params,
  run_config: dict | None = None,
  step: int | None = None,
  evaluation: dict | None = None,
  name: str = "negclip-jax CLIP",
  total_steps: int | None = None,
) -> str:
  """README.md (markdown with Hugging Face metadata) describing the model and its training.

  `run_config`: the training config JSON (None for a converted model); `step` of
  `total_steps` (default: the config's `total_steps` when set; a step short of it is marked
  unfinished); `evaluation`: the final evaluation, {metric: value} or {task: {metric:
  value}} (one table per task, metrics sorted by name).
  """
  text, vision = model_config.text, model_config.vision
  rows = [
    (
      "architecture",
      f"CLIP: ViT {vision.num_hidden_layers}x{vision.hidden_size}, patch "
      f"{vision.patch_size}, {vision.image_size} px; text transformer "
      f"{text.num_hidden_layers}x{text.hidden_size}, context "
      f"{text.max_position_embeddings}; embeddings {model_config.projection_dim}-d",
    )
  ]
  if run_config is not None:
    c, d = run_config, run_config["data"]
    labels = param_groups.label_params(
      params, c["layers"], extra_trainable=tuple(c.get("extra_trainable", ()))
    )
    trained = param_groups.summary(params, labels).replace("\n", "; ")
    sources = {
      "ccneg": f"CC-Neg (`{d.get('ccneg_path')}`)",
      "coco_negation": f"NegationCLIP COCO (`{d.get('coco_json')}`)",
      "negshapes": f"NegShapes ({d.get('negshapes_num')} generated examples)",
    }
    rows += [
      (
        "base model",
        f"`{base_model_name(c['init'])}`" if c["init"] else f"random init of preset `{c['model']}`",
      ),
      ("trained parameters", f"`layers={c['layers']}`: {trained}; the vision tower is frozen"),
      (
        "objective",
        f"`{c['objective']}` with lambda_stage2={c['lambda_stage2']}, "
        f"lambda_orig={c['lambda_orig']}, lambda_text={c['lambda_text']}, "
        f"margin={c['margin']}",
      ),
      (
        "steps",
        f"{steps_done(step, total_steps or c.get('total_steps') or None, c)} "
        f"(batch {c['batch_size']} per stream, AdamW lr {c['learning_rate']}, "
        f"weight decay {c['weight_decay']}, {c['schedule']} schedule, "
        f"{c['warmup_steps']} warm-up steps, seed {c['seed']})",
      ),
      (
        "data",
        f"presence: {sources.get(d['presence'], d['presence'])}; absence: "
        f"{sources.get(d['absence'], d['absence'])}",
      ),
    ]
  table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
  results = (
    evaluation_tables(evaluation)
    if evaluation
    else ("No evaluation was logged for this checkpoint.")
  )
  if openai_loadable(model_config):
    openai = (
      "```python\nimport torch\nfrom clip.model import build_model  # pip install "
      'openai-clip\nmodel = build_model(torch.load("model.pt")).float().eval()\n```'
    )
  else:
    openai = (
      "This architecture departs from OpenAI's conventions (heads = width / 64, "
      "QuickGELU), so `clip.model.build_model` cannot rebuild it from `model.pt` alone; "
      '`negclip_jax.load_pretrained("DIR")` reads model.pt with its model_config.json.'
    )
  intro = (
    "A CLIP fine-tuned for negation with Omni-NegCLIP (arXiv 2603.29258) by negclip-jax "
    "(JAX/Flax), exported to PyTorch formats."
    if run_config is not None
    else "A CLIP converted by negclip-jax; it was not trained by negclip-jax, so no training "
    "facts are known."
  )
  return f"""---
library_name: transformers
pipeline_tag: zero-shot-image-classification
tags: [clip, negation, omni-negclip, negclip-jax]
---
# {name}

{intro}

{table}

## Evaluation

{results}

## Use

Hugging Face format (`config.json`, `model.safetensors`, tokenizer and preprocessor files):

```python
from transformers import CLIPModel, CLIPProcessor
model = CLIPModel.from_pretrained("DIR")
processor = CLIPProcessor.from_pretrained("DIR")
```

OpenAI format (`negclip-export ... --format openai`: `model.pt`, an OpenAI-named state dict):

{openai}
"""


def export(
  model, params, tokenizer, out: str | os.PathLike, formats=("hf",), card: str = ""
) -> dict[str, epath.Path]:
  """Writes each of `formats` (local or ``gs://``) with `card` as README.md ->
  {format: directory}. One format goes into `out`, several into `out/<format>`; atomically
  (`storage.publish_dir`): an interrupted export leaves the previous one, or nothing
  loadable."""
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or not formats:
    raise ValueError(f"export formats must be among {FORMATS}, got {list(formats)}")
  out = storage.path(out)
  with storage.publish_dir(out) as filling:  # readers see the whole export or none
    for fmt in formats:
      directory = filling if len(formats) == 1 else filling / fmt
      convert.save_pretrained(
        model, params, directory, format=fmt, tokenizer=tokenizer if fmt == "hf" else None
      )
      (directory / CARD).write_text(card, encoding="utf-8")
  return {f: out if len(formats) == 1 else out / f for f in formats}


def load(source: str | os.PathLike):
  """(model, params, tokenizer, card) of anything `rundir.load` reads (restored once)."""
  loaded = rundir.load(source)
  if loaded.run_dir is None:
    name = f"{storage.path(source).name} (converted by negclip-jax)"
    card = model_card(loaded.model.config, loaded.params, name=name)
  else:
    card = model_card(
      loaded.model.config,
      loaded.params,
      loaded.run_config,
      loaded.step,
      rundir.evaluation_at(loaded.run_dir, loaded.step),
      name=f"{loaded.run_dir.name} (Omni-NegCLIP, negclip-jax)",
    )
  return loaded.model, loaded.params, loaded.tokenizer, card


def export_run(result: dict, config, out: str | os.PathLike, name: str) -> epath.Path:
  """HF export of `train.train`'s result (its "eval" on the card) into `out`."""
  card = model_card(
    result["model"].config,
    result["params"],
    json.loads(config.to_json()),
    result["step"],
    result["eval"],
    name=f"{name} (Omni-NegCLIP, negclip-jax)",
    total_steps=result.get("total_steps"),
  )
  return export(result["model"], result["params"], result["tokenizer"], out, ("hf",), card)["hf"]


def main(argv: list[str] | None = None) -> dict[str, epath.Path]:
  """Console script `negclip-export` (= python -m negclip_jax.export)."""
  p = console.ArgumentParser(
    prog="negclip-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "source",
    metavar="RUN_OR_CHECKPOINT",
    help="run dir, RUN/checkpoints/STEP, or any model load_pretrained reads",
  )
  p.add_argument(
    "--format",
    choices=[*FORMATS, "both"],
    default="hf",
    help="hf: transformers CLIPModel directory; openai: model.pt for OpenAI clip; "
    "both: DIR/hf and DIR/openai (default: %(default)s)",
  )
  p.add_argument("--out", required=True, help="output directory")
  args = p.parse_args(argv)
  model, params, tokenizer, card = load(args.source)
  formats = FORMATS if args.format == "both" else (args.format,)
  dirs = export(model, params, tokenizer, args.out, formats, card)
  for fmt, directory in dirs.items():
    print(f"{fmt}: {directory}")
  return dirs


@console.boundary()
def cli(argv: list[str] | None = None):
  """Console script `negclip-export` (= python -m negclip_jax.export); exit status 0 on
  success, 1 with one `error:` line for a bad file or value, 2 for a bad command line."""
  main(argv)


if __name__ == "__main__":
  cli()
