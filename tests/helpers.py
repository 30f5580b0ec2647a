"""What many tests share: the repository root, tiny configs, run-directory probes,
subprocess environments, and small datasets in the original file formats."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from negclip_jax import rundir
from negclip_jax.configs import tiny
from negclip_jax.eval import registry

ROOT = Path(__file__).resolve().parents[1]


# The files `save_pretrained(..., format="hf", tokenizer=...)` writes.
HF_EXPORT_FILES = [
  "config.json",
  "merges.txt",
  "model.safetensors",
  "preprocessor_config.json",
  "special_tokens_map.json",
  "tokenizer_config.json",
  "vocab.json",
]
# NegBench's multiple-choice CSV header (its `images/COCO_val_mcq_llama3.1_rephrased.csv`).
NEGBENCH_MCQ_HEADER = [
  "image_path",
  "correct_answer",
  "caption_0",
  "caption_1",
  "caption_2",
  "caption_3",
  "correct_answer_template",
]


def tiny_config(**overrides):
  """`tiny.get_config()` with dotted overrides ({"data.negshapes_num": 32, "total_steps": 4})."""
  c = tiny.get_config()
  c.update_from_flattened_dict(overrides)
  return c


def tiny_train_cmd(workdir, *flags: str) -> list[str]:
  """`python -m negclip_jax.train` on the tiny preset in `workdir`, with `flags`."""
  return [
    sys.executable,
    "-m",
    "negclip_jax.train",
    "--config",
    str(ROOT / "configs/tiny.py"),
    "--workdir",
    str(workdir),
    *flags,
  ]


def steps_on_disk(workdir: Path) -> list[int]:
  """The checkpoint steps a run directory holds."""
  checkpoints = Path(workdir) / rundir.CHECKPOINTS_DIR
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def leaves(params) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def small_pipeline(presence, absence, **overrides):
  """A one-process `TrainPipeline` over the two tables: global batch 4, 6 steps, 32 px
  images, 77-token texts, seed 3; `overrides` replace any of these arguments."""
  from negclip_jax.model.tokenizer import ClipTokenizer
  from negclip_jax.train import pipeline

  args = dict(
    tokenizer=ClipTokenizer(),
    context_length=77,
    global_batch=4,
    seed=3,
    image_size=32,
    num_steps=6,
    process_index=0,
    process_count=1,
    local_devices=1,
  )
  return pipeline.TrainPipeline(presence, absence, **{**args, **overrides})


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
  """This environment for a child Python that imports this checkout (and tests/), on CPU,
  without the parent's fake-device XLA_FLAGS (the child sets its own)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(
    PYTHON=sys.executable,
    PYTHONUNBUFFERED="1",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
  )
  env.update(extra)
  return env


# ------------------------------------------------- the 2-process cluster harness

LOCAL_CLUSTER = ROOT / "launch" / "local_cluster.sh"
CLUSTER_STEPS = 4
HEARTBEAT_S = 10  # survivors of a dead process abort after this (trainer.py --heartbeat_timeout)
CLUSTER_OVERRIDES = dict(total_steps=CLUSTER_STEPS, save_every=1, log_every=1, max_to_keep=10)
TOL = dict(rtol=1e-5, atol=1e-5)
LOSSES = ("L1", "L2", "L3", "L_neg", "L_orig", "L_text", "absence", "presence", "total")


def cluster_config(**overrides):
  """The tiny config the cluster tests train (`CLUSTER_OVERRIDES`), with `overrides`."""
  return tiny_config(**{**CLUSTER_OVERRIDES, **overrides})


def assert_params_close(actual, expected):
  """Every leaf within TOL, except the attention key biases: their gradient is analytically
  zero (softmax ignores a per-query constant), so Adam (eps 1e-8) turns the float noise of
  a different device/process split into their update."""
  a, b = (traverse_util.flatten_dict(p, sep="/") for p in (actual, expected))
  assert a.keys() == b.keys()
  for path in a:
    if not path.endswith("k_proj/bias"):
      np.testing.assert_allclose(np.asarray(a[path]), np.asarray(b[path]), err_msg=path, **TOL)


def keep_checkpoints_up_to(workdir: Path, step: int):
  for s in steps_on_disk(workdir):
    if s > step:
      shutil.rmtree(workdir / rundir.CHECKPOINTS_DIR / str(s))


def summary(text: str) -> dict:
  """The JSON summary line trainer.py prints last."""
  lines = [row for row in text.splitlines() if row.startswith("{") and '"step"' in row]
  assert lines, text[-3000:]
  return json.loads(lines[-1])


def cluster_cmd(
  workdir: Path,
  *options: str,
  config_file: Path = ROOT / "configs/tiny.py",
  train_flags: tuple[str, ...] = (),
) -> list[str]:
  train_args = [
    "--config",
    str(config_file),
    "--workdir",
    str(workdir),
    *(f"--config.{k}={v}" for k, v in CLUSTER_OVERRIDES.items()),
    f"--heartbeat_timeout={HEARTBEAT_S}",
    *train_flags,
  ]
  return [
    "bash",
    str(LOCAL_CLUSTER),
    "--processes",
    "2",
    "--devices-per-process",
    "2",
    "--port",
    str(free_port()),
    *options,
    "--",
    *train_args,
  ]


def run_cluster(workdir: Path, env: dict, timeout: int = 400, **cmd) -> tuple[dict, str]:
  """Runs the 2-process cluster (`cluster_cmd` keywords) to completion -> (the summary both
  printed, process 0's output)."""
  proc = subprocess.run(
    cluster_cmd(workdir, **cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )
  log1 = (workdir / "cluster_logs" / "process_1.log").read_text()
  assert proc.returncode == 0, proc.stderr[-5000:] + log1[-3000:]
  first, second = summary(proc.stdout), summary(log1)
  assert "2 process(es), 4 device(s)" in proc.stdout
  for key in LOSSES:  # the processes computed the same (pmean'd) metrics
    assert first[key] == second[key], (key, first, second)
  assert first.get("eval") == second.get("eval"), (first, second)  # and the same evaluation
  return first, proc.stdout + proc.stderr


EVAL_NUM = 24


def config_with_eval(tmp_path: Path) -> Path:
  """A config file: tiny with a NegShapes evaluator run at the end of training."""
  path = tmp_path / "tiny_with_eval.py"
  path.write_text(
    "from negclip_jax.configs import tiny\n\n\ndef get_config():\n"
    f"  c = tiny.get_config()\n  c.evals.negshapes = dict(num={EVAL_NUM})\n"
    "  return c\n"
  )
  return path


def assert_eval_equals_one_process(workdir: Path, evaluated: dict):
  """`evaluated` (a run's final `eval`) = the NegShapes task run here on its final params."""
  model, params, tokenizer = rundir.load_model(workdir)
  expected = registry.run_task("negshapes", model, params, tokenizer, num=EVAL_NUM, progress=False)
  assert set(evaluated) == {"negshapes"} and set(evaluated["negshapes"]) == set(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(evaluated["negshapes"][key], value, rtol=1e-6, err_msg=key)


# ------------------------------------------------------- data files


def write_file_datasets(root: Path, n: int, size: int) -> dict:
  """NegShapes written as CC-Neg (.pt), NegationCLIP COCO (json) and CoN-CLIP's distractor
  mapping over a COCO-train2017-like folder, all PNG; returns the config.data overrides."""
  import torch
  from PIL import Image

  from negclip_jax.data import negshapes

  data = negshapes.generate_pairs(n, seed=1, image_size=size, distractors=True)
  for sub in ("cc3m/images", "coco"):
    (root / sub).mkdir(parents=True)
  for i in range(n):
    Image.fromarray(data["images"][i]).save(root / "cc3m/images" / f"{i}.png")
    Image.fromarray(data["distractor_images"][i]).save(root / "coco" / f"{1000 + i}.png")
  torch.save(
    {
      "image_paths": [f"/workspace/datasets/cc3m/images/{i}.png" for i in range(n)],
      "annotations": [
        {"json": {"caption": c}, "sop_data": {"negative-prompt": m}}
        for c, m in zip(data["captions"], data["negated"])
      ],
    },
    root / "ccneg_preprocessed.pt",
  )
  ids = [1000 + i for i in range(n)][::-1]  # listed out of order; the mapping uses sorted ids
  (root / "captions_train2017.json").write_text(
    json.dumps({"images": [{"id": k, "file_name": f"{k}.png"} for k in ids], "annotations": []})
  )
  torch.save([[i, (i + 1) % n] for i in range(n)], root / "distractor_image_mapping.pt")
  (root / "negation_coco.json").write_text(
    json.dumps(
      {
        "images": [{"id": i, "file_name": f"{i}.png"} for i in range(n)],
        "annotations": [
          {"image_id": i, "caption": c, "updated_caption": u}
          for i, (c, u) in enumerate(zip(data["captions"], data["updated"]))
        ],
      }
    )
  )
  return dict(
    presence="ccneg",
    absence="coco_negation",
    ccneg_path=str(root / "ccneg_preprocessed.pt"),
    ccneg_image_root=str(root / "cc3m"),
    ccneg_eval_size=0,
    coco_json=str(root / "negation_coco.json"),
    coco_image_dir=str(root / "cc3m/images"),
    distractor_mapping=str(root / "distractor_image_mapping.pt"),
    distractor_coco_json=str(root / "captions_train2017.json"),
    distractor_image_dir=str(root / "coco"),
  )


# ------------------------------------------------------- webdataset shards


def _png(seed: int) -> bytes:
  from PIL import Image

  buffer = io.BytesIO()
  pixels = np.random.default_rng(seed).integers(0, 256, (13, 17, 3), np.uint8)
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def write_wds_shards(folder, samples_per_shard=3, shards=2, bad=()):
  """webdataset shards folder/shard-SSS.tar of samples {key}.png, .txt, .json {"negated", "updated"}; `bad`: {(shard,
  position): "noimage" | "nonegated" | "undecodable"}. Returns {key: png bytes}."""
  images = {}
  bad = dict(bad)
  for s in range(shards):
    with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
      for i in range(samples_per_shard):
        key = f"{s:03d}{i:04d}"
        fields = {"txt": f"a photo {key}".encode(), "json": {"negated": f"no photo {key}"}}
        fields["json"]["updated"] = f"nothing but {key}"
        if bad.get((s, i)) == "nonegated":
          del fields["json"]["negated"]
        if bad.get((s, i)) != "noimage":
          images[key] = (
            b"\x89PNG not really" if bad.get((s, i)) == "undecodable" else _png(100 * s + i)
          )
          fields["png"] = images[key]
        fields["json"] = json.dumps(fields["json"]).encode()
        for field, data in fields.items():
          info = tarfile.TarInfo(f"{key}.{field}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return images
