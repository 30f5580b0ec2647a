#!/usr/bin/env python
"""The demo's fine-tuning with `data.pack_text` off and on, from one pretrained small CLIP.

    python benchmarks/pack_text_demo.py WORKDIR PRETRAIN_STEPS EVAL_NUM ORDER
    python benchmarks/pack_text_demo.py runs/pack 100 500 unpacked,packed

Pretrains the demo's small CLIP (`demo._pretrained`, PRETRAIN_STEPS steps at the demo's
batch), then runs `trainer.train(configs/demo.py)` once per name in ORDER ("packed" sets
`data.pack_text=True`, anything else False; a shared image cache), evaluates each on every
NegShapes task (EVAL_NUM items, seed 0), prints each run's wall time and last logged
metrics, the largest metric differences between the first two runs, and writes
WORKDIR/cmp.json.
"""

import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo as demo_config  # noqa: E402
from negclip_jax import demo, rundir
from negclip_jax.model import clip as model_lib
from negclip_jax.model.tokenizer import ClipTokenizer
from negclip_jax.train import trainer


def main(workdir: str, pretrain_steps: str, eval_num: str, order: str):
  wd, eval_num = Path(workdir), int(eval_num)
  config = demo_config.get_config()
  config.evals = {}
  tok = ClipTokenizer()
  model = model_lib.CLIP(model_lib.get_config(config.model))
  demo._pretrained(wd, config, model, tok, int(pretrain_steps), demo.PRETRAIN_BATCH, 0)
  config.init = str(wd / "pretrained" / "hf")
  out = {}
  for name in order.split(","):
    c = copy.deepcopy(config)
    c.data.pack_text = name == "packed"
    c.data.cache_dir = str(wd / rundir.IMAGE_CACHE_DIR)
    run_dir = wd / f"ft_{name}_{len(out)}"
    t0 = time.perf_counter()
    result = trainer.train(c, run_dir)
    secs = time.perf_counter() - t0
    rows = rundir.read_metrics(run_dir)
    ev = demo.evaluate_negshapes(result["model"], result["params"], tok, eval_num, 0)
    out[f"{name}_{len(out)}"] = dict(train_s=secs, rows=rows, eval=ev)
    print(name, "train_s", secs, "last", rows[-1], flush=True)
  json.dump(out, open(wd / "cmp.json", "w"), indent=1, default=float)
  a, b = list(out.values())[:2]
  numbers = lambda d: {k: v for k, v in d.items() if isinstance(v, (int, float))}
  print(
    "max |eval diff|", max(abs(v - numbers(b["eval"])[k]) for k, v in numbers(a["eval"]).items())
  )
  logged = [
    abs(x[k] - y[k])
    for x, y in zip(a["rows"], b["rows"])
    for k in x
    if k not in ("step", "samples_per_s") and isinstance(x[k], float) and k in y
  ]
  print("max |logged training metric diff|", max(logged))


if __name__ == "__main__":
  main(*sys.argv[1:])
