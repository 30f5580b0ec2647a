"""The offline quickstart: watch Omni-NegCLIP teach a small CLIP negation, on a CPU, in minutes.

python -m negclip_jax.demo --workdir runs/demo [--fast]

1. Pretrains a small CLIP from scratch on NegShapes *plain* captions with the standard
   CLIP loss: our stand-in for "pretrained CLIP", which never saw negation.
2. Exports it as a Hugging Face directory (`DIR/pretrained/hf`) and starts Omni-NegCLIP
   fine-tuning from it exactly as a user would from `openai/clip-vit-base-patch32`.
3. Fine-tunes the front text layers with both objectives (`configs/demo.py`).
4. Evaluates both models on NegShapes presence, absence and retrieval; prints a table,
   writes DIR/results.json, DIR/demo.png, and exports the result to DIR/export/hf.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm.auto import tqdm

from negclip_jax import convert, losses, model as model_lib, train, train_step
from negclip_jax.embed import bucket_length
from negclip_jax.data import negshapes, pipeline
from negclip_jax.preprocess import preprocess_images
from negclip_jax.tokenizer import ClipTokenizer

METRICS = ("presence_acc", "absence_acc", "retrieval_t2i_r1", "retrieval_i2t_r1")


def make_pretrain_step(model, tx):
  """Plain CLIP pretraining step (all parameters, global-batch negatives), per device."""

  def step(state, pixels, ids):
    def loss_fn(params):
      img = losses.l2_normalize(model.apply({"params": params}, pixels, method="get_image_features"))
      txt = losses.l2_normalize(model.apply({"params": params}, ids, method="get_text_features"))
      gather = lambda x: lax.all_gather(x, train_step.AXIS, axis=0, tiled=True)
      loss, _ = losses.clip_loss(gather(img), gather(txt), jnp.exp(params["logit_scale"]))
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = lax.pmean(grads, train_step.AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, train_step.MAX_LOGIT_SCALE)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), lax.pmean(loss, train_step.AXIS)

  return jax.pmap(step, axis_name=train_step.AXIS, donate_argnums=(0,))


def pretrain(model, tokenizer, data, steps, batch_size, learning_rate, seed) -> tuple[dict, list]:
  """Pretrains `model` on (images, plain captions) -> (params, per-step losses)."""
  params = model_lib.init_params(model, jax.random.key(seed))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10), steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1))
  step_fn = make_pretrain_step(model, tx)
  state = train_step.replicate(train_step.create_train_state(params, tx))
  pixels = preprocess_images(data["images"], model.config.vision.image_size)
  ids = tokenizer(data["captions"], model.config.text.max_position_embeddings)
  ids = ids[:, :bucket_length(ids)]  # exact: causal mask (see negclip_jax.embed)
  n_dev = jax.local_device_count()
  shard = lambda x: x.reshape((n_dev, -1) + x.shape[1:])
  losses_ = []
  for step in tqdm(range(steps), desc="pretrain (plain captions)"):
    idx = pipeline.step_indices(step, len(ids), batch_size, seed, stream=0)
    state, loss = step_fn(state, shard(pixels[idx]), shard(ids[idx]))
    losses_.append(loss)
  return jax.device_get(jax.tree.map(lambda x: x[0], state.params)), [float(l[0]) for l in losses_]


def evaluate_negshapes(model, params, tokenizer, num: int, seed: int = 0) -> dict:
  """NegShapes presence / absence / retrieval metrics of (model, params)."""
  from negclip_jax import evaluate
  return evaluate.run_task("negshapes", model, params, tokenizer, progress=False, num=num,
                           seed=seed)


def table(before: dict, after: dict) -> str:
  rows = ["| metric | pretrained CLIP | Omni-NegCLIP | change |", "|---|---:|---:|---:|"]
  for k in METRICS:
    rows.append(f"| {k} | {before[k]:.3f} | {after[k]:.3f} | {after[k] - before[k]:+.3f} |")
  return "\n".join(rows)


def plot(path: Path, pretrain_losses: list, finetune_log: Path, before: dict, after: dict):
  """Training curves (left) and before/after bars (right) -> PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [json.loads(l) for l in finetune_log.read_text().splitlines()] if finetune_log.exists() else []
  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
  ax1.plot(pretrain_losses)
  ax1.set(title="1. pretraining on plain captions", xlabel="step", ylabel="CLIP loss")
  for key in ("total", "presence", "absence", "L3", "L_text"):
    points = [(r["step"], r[key]) for r in rows if key in r]  # eval rows carry other keys
    if points:
      ax2.plot(*zip(*points), label=key)
  ax2.set(title="2. Omni-NegCLIP fine-tuning", xlabel="step", ylabel="loss")
  ax2.legend()
  x = np.arange(len(METRICS))
  ax3.bar(x - 0.2, [before[k] for k in METRICS], 0.4, label="pretrained")
  ax3.bar(x + 0.2, [after[k] for k in METRICS], 0.4, label="Omni-NegCLIP")
  ax3.set_xticks(x, [k.replace("retrieval_", "ret ") for k in METRICS], rotation=15)
  ax3.set(title="3. NegShapes evaluation", ylim=(0, 1))
  ax3.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(workdir: str | Path, fast: bool = False, pretrain_steps: int | None = None,
        finetune_steps: int | None = None, eval_num: int | None = None, seed: int = 0) -> dict:
  """The whole quickstart; returns results.json's content."""
  from configs import demo as demo_config
  t_start = time.perf_counter()
  workdir = Path(workdir).absolute()
  config = demo_config.get_config()
  if fast:
    config.model, config.data.negshapes_num, config.batch_size = "tiny", 256, 32
    config.total_steps, config.log_every, config.save_every = 4, 2, 4
  pretrain_steps = pretrain_steps or (10 if fast else PRETRAIN_STEPS)
  config.total_steps = finetune_steps or config.total_steps
  config.eval_num = eval_num = eval_num or (32 if fast else config.eval_num)
  tokenizer = ClipTokenizer()
  model = model_lib.CLIP(model_lib.get_config(config.model))
  size = model.config.vision.image_size

  pretrained_dir = workdir / "pretrained" / "hf"
  if (pretrained_dir / "model.safetensors").is_file():
    print(f"Reusing the pretrained model in {pretrained_dir}", flush=True)
    model, params = convert.load_pretrained(pretrained_dir)
    pretrain_losses = json.loads((workdir / "pretrained" / "losses.json").read_text())
  else:
    data = negshapes.generate_pairs(config.data.negshapes_num, seed, size, split="train")
    params, pretrain_losses = pretrain(model, tokenizer, data, pretrain_steps,
                                       PRETRAIN_BATCH if not fast else config.batch_size,
                                       PRETRAIN_LR, seed)
    convert.save_pretrained(model, params, pretrained_dir, tokenizer=tokenizer)
    (workdir / "pretrained" / "losses.json").write_text(json.dumps(pretrain_losses))
  before = evaluate_negshapes(model, params, tokenizer, eval_num)
  print("pretrained:", json.dumps(before), flush=True)

  config.init = str(pretrained_dir)  # loaded exactly as a user loads openai/clip-vit-base-patch32
  result = train.train(config, workdir / "finetune")
  after = {k.removeprefix("eval_"): v for k, v in result["eval"].items()}  # same task and seed
  convert.save_pretrained(result["model"], result["params"], workdir / "export" / "hf",
                          tokenizer=result["tokenizer"])
  results = {"pretrained": before, "omni_negclip": after}
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  plot(workdir / "demo.png", pretrain_losses, workdir / "finetune" / "metrics.jsonl", before, after)
  print("\n" + table(before, after))
  print(f"\nwrote {workdir / 'results.json'}, {workdir / 'demo.png'}, {workdir / 'export' / 'hf'}"
        f" in {time.perf_counter() - t_start:.0f} s", flush=True)
  return results


PRETRAIN_STEPS = 400
PRETRAIN_BATCH = 128
PRETRAIN_LR = 1e-3


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--fast", action="store_true", help="a few steps of a tiny model (tests)")
  parser.add_argument("--pretrain-steps", type=int)
  parser.add_argument("--finetune-steps", type=int)
  parser.add_argument("--eval-num", type=int, help="examples per NegShapes task")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  return run(args.workdir, args.fast, args.pretrain_steps, args.finetune_steps, args.eval_num,
             args.seed)


if __name__ == "__main__":
  main()
