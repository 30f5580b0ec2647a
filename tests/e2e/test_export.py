"""Export: a `negclip-train --config NAME` run from another directory ends with an HF export
(model card, architectures, permissions, tokenizer) equal to transformers' `CLIPModel`;
`negclip-export` of a checkpoint in both formats; OpenAI `clip.model.build_model` loading an
OpenAI-conventional export; safetensors directories without torch; the learning rate and
grouped TensorBoard tags in the run's logs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import HF_EXPORT_FILES, ROOT
from references import openai_clip_model

import negclip_jax
from negclip_jax import export, rundir, storage
from negclip_jax.model import clip as model_lib
from negclip_jax.model import convert

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _run(args, cwd, **kwargs):
  return subprocess.run(
    [sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, **kwargs
  )


# The run the module's tests share, trained in a directory outside the repository.
TRAIN_ARGS = [
  "-m",
  "negclip_jax.train",
  "--config",
  "tiny_eval.py",
  "--workdir",
  "run",
  "--config.total_steps=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A 2-step tiny run started by name from outside the repository, evaluated at the end."""
  cwd = tmp_path_factory.mktemp("elsewhere")
  (cwd / "tiny_eval.py").write_text(
    "from negclip_jax.configs import tiny\n\n\ndef get_config():\n  c = tiny.get_config()\n"
    "  c.evals.negshapes = dict(num=8)\n  return c\n"
  )
  out = _run(TRAIN_ARGS, cwd=cwd)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Exported to" in out.stdout
  (cwd / "first_stdout.txt").write_text(out.stdout)
  return cwd / "run"


def test_training_ends_with_a_summary_and_a_results_json(run_dir):
  stdout = (run_dir.parent / "first_stdout.txt").read_text()
  block = stdout[stdout.index("Training finished: step 2 of 2") :].splitlines()
  assert block[0].startswith("Training finished: step 2 of 2; 2 steps in ")
  assert block[1].startswith("  final training metrics: L1 ")
  assert block[2].startswith("  eval negshapes (step 2): ")
  where = {k.strip(): v.strip() for k, v in (row.split(": ", 1) for row in block[3:-1])}
  assert where["Checkpoints"].startswith(f"{run_dir / 'checkpoints'} (steps [")
  assert where["Export"] == str(run_dir / "export" / "hf")
  assert where["Results"] == str(run_dir / "results.json")
  assert where["Metrics"] == str(run_dir / "metrics.jsonl")
  assert where["TensorBoard"].startswith(f"{run_dir / 'tensorboard'} (pip install tensorboard")
  last = json.loads(block[-1])  # the JSON line for scripts stays last
  assert last["step"] == last["total_steps"] == 2 and "L1" in last and last["eval"]["negshapes"]
  reject = lambda name: pytest.fail(f"non-strict JSON constant {name}")
  written = json.loads((run_dir / "results.json").read_text(), parse_constant=reject)
  head = written["header"]
  assert (
    head["model"] == str(run_dir)
    and head["step"] == 2
    and "--config.total_steps=2" in head["command"]
  )
  assert head["tasks"] == {
    "negshapes": {"task": "negshapes", "protocol": None, "dtype": "float32", "files": {}}
  }
  assert (
    written["results"]["negshapes"]["presence_acc"] == last["eval"]["negshapes"]["presence_acc"]
  )


def test_running_a_finished_run_again_says_so_and_keeps_its_export(run_dir):
  export_file = run_dir / "export" / "hf" / "model.safetensors"
  before = (export_file.stat().st_mtime_ns, rundir.read_metrics(run_dir))
  first = json.loads((run_dir.parent / "first_stdout.txt").read_text().splitlines()[-1])
  out = _run(TRAIN_ARGS, cwd=run_dir.parent)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"{run_dir.name} already finished: step 2 of 2" in out.stdout
  assert "Resuming from" not in out.stdout and "Exported to" not in out.stdout
  assert "Training already finished at step 2 of 2; 0 steps in " in out.stdout
  assert (export_file.stat().st_mtime_ns, rundir.read_metrics(run_dir)) == before
  assert len(list((run_dir / "tensorboard").iterdir())) == 1  # no new, empty events file
  assert json.loads(out.stdout.splitlines()[-1]) == first  # final metrics and evaluation kept


def test_model_card_of_an_unfinished_run_with_a_local_base_model(run_dir):
  loaded = rundir.load(run_dir)
  config = {**loaded.run_config, "total_steps": 40, "init": "/home/me/models/clip-b32/hf"}
  card = export.model_card(loaded.model.config, loaded.params, config, 2)
  assert "| steps | 2 of 40 (unfinished: the run stopped before its last step) (batch 8" in card
  assert "| base model | `clip-b32/hf` |" in card and "/home/me" not in card


def _pixels(size, n=2, seed=0):
  return np.random.default_rng(seed).uniform(-1.5, 1.5, (n, size, size, 3)).astype(np.float32)


def test_training_ends_with_an_hf_export_equal_to_transformers(run_dir):
  hf_dir = run_dir / "export" / "hf"
  model, params, tokenizer = rundir.load_model(run_dir)
  hf = transformers.CLIPModel.from_pretrained(hf_dir).eval()
  assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["CLIPModel"]
  umask = os.umask(0)
  os.umask(umask)
  assert {f.name: f.stat().st_mode & 0o777 for f in hf_dir.iterdir()} == {
    f.name: 0o666 & ~umask for f in hf_dir.iterdir()
  }
  texts = ["a red circle but not a blue square", "a green cross"]
  ids = tokenizer(texts, model.config.text.max_position_embeddings)
  hf_ids = transformers.CLIPTokenizer.from_pretrained(hf_dir)(
    texts, padding="max_length", max_length=ids.shape[1], return_tensors="np"
  )["input_ids"]
  np.testing.assert_array_equal(ids[hf_ids != 49407], hf_ids[hf_ids != 49407])  # pad = EOT
  pixels = _pixels(model.config.vision.image_size)
  with torch.no_grad():
    want_t = hf.get_text_features(input_ids=torch.from_numpy(ids).long())
    want_i = hf.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
  want_t, want_i = (getattr(w, "pooler_output", w).numpy() for w in (want_t, want_i))
  got_t = model.apply({"params": params}, jnp.asarray(ids), method="get_text_features")
  got_i = model.apply({"params": params}, jnp.asarray(pixels), method="get_image_features")
  np.testing.assert_allclose(np.asarray(got_t), want_t, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_i), want_i, atol=1e-5)


def test_model_card_states_training_and_final_evaluation(run_dir):
  card = (run_dir / "export" / "hf" / "README.md").read_text()
  final = rundir.read_metrics(run_dir)[-1]
  assert final["step"] == 2 and "eval/negshapes/presence_acc" in final
  assert "| base model | random init of preset `tiny` |" in card
  assert "`layers=front`" in card and "trainable text blocks: [0, 1]" in card
  assert "`omni_negclip` with lambda_stage2=1.0, lambda_orig=1.0, lambda_text=1.0" in card
  assert "| steps | 2 of 2 (batch 8 per stream" in card
  assert "presence: NegShapes (64 generated examples)" in card
  table = card.split("### negshapes\n", 1)[1].lstrip("\n").split("\n\n")[0].splitlines()[2:]
  assert f"| presence_acc | {final['eval/negshapes/presence_acc']:.4f} |" in table
  assert table == sorted(table) and len(table) == len(rundir.evaluation_at(run_dir, 2)["negshapes"])
  assert 'CLIPModel.from_pretrained("DIR")' in card
  assert "cannot rebuild it" in card  # tiny has 16-wide heads, not OpenAI's 64


def test_export_command_writes_both_formats_of_a_checkpoint(run_dir, tmp_path):
  dirs = export.main(
    [str(run_dir / "checkpoints" / "2"), "--format", "both", "--out", str(tmp_path / "out")]
  )
  assert dirs == {"hf": tmp_path / "out" / "hf", "openai": tmp_path / "out" / "openai"}
  _, params, _ = rundir.load_model(run_dir, step=2)
  for directory in dirs.values():
    _, back = negclip_jax.load_pretrained(directory)
    for a, b in zip(*(convert.params_to_state_dict(p).values() for p in (params, back))):
      np.testing.assert_array_equal(a, b)
    card = (directory / "README.md").read_text()
    assert "| steps | 2 of 2 (" in card and "### negshapes" in card and "| presence_acc |" in card
  assert sorted(p.name for p in dirs["hf"].iterdir()) == sorted(["README.md", *HF_EXPORT_FILES])


def test_openai_conventional_export_loads_in_openai_clip(tmp_path):
  config = model_lib.CLIPConfig(
    text=model_lib.TextConfig(
      hidden_size=64,
      intermediate_size=256,
      num_hidden_layers=2,
      num_attention_heads=1,
      max_position_embeddings=16,
      hidden_act="quick_gelu",
      eos_token_id=2,
    ),
    vision=model_lib.VisionConfig(
      hidden_size=64,
      intermediate_size=256,
      num_hidden_layers=2,
      num_attention_heads=1,
      image_size=32,
      patch_size=8,
      hidden_act="quick_gelu",
    ),
    projection_dim=32,
  )
  model = model_lib.CLIP(config)
  params = model_lib.init_params(model, jax.random.key(0))
  card = export.model_card(config, params)
  out = export.export(model, params, None, tmp_path, ("openai",), card)["openai"]
  assert 'build_model(torch.load("model.pt"))' in (out / "README.md").read_text()
  reference = openai_clip_model().build_model(torch.load(out / "model.pt")).float().eval()
  ids = np.zeros((2, 16), np.int32)
  ids[:, :4] = [[49406, 320, 1929, 49407], [49406, 550, 49407, 0]]
  pixels = _pixels(32)
  with torch.no_grad():
    want_t = reference.encode_text(torch.from_numpy(ids).long()).numpy()
    want_i = reference.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
  got_t = model.apply({"params": params}, jnp.asarray(ids), method="get_text_features")
  got_i = model.apply({"params": params}, jnp.asarray(pixels), method="get_image_features")
  # OpenAI's nn.MultiheadAttention sums in another order: float32 noise up to ~2e-4 here
  # (the open_clip parity tests in test_convert.py allow 1e-4 on smaller towers).
  np.testing.assert_allclose(np.asarray(got_t), want_t, atol=5e-4)
  np.testing.assert_allclose(np.asarray(got_i), want_i, atol=5e-4)


def test_safetensors_dirs_load_without_torch_and_pt_files_name_the_extra(run_dir, tmp_path):
  torch.save({"x": torch.zeros(1)}, tmp_path / "w.pt")
  script = f"""
import sys
sys.modules["torch"] = None  # as if torch were not installed
import negclip_jax
model, params = negclip_jax.load_pretrained({str(run_dir / "export" / "hf")!r})
print("loaded", model.config.text.hidden_size)
try:
  negclip_jax.load_pretrained({str(tmp_path / "w.pt")!r})
except ImportError as e:
  print("error:", e)
"""
  out = _run(["-c", script], cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "loaded 32" in out.stdout
  assert (
    f"error: {tmp_path / 'w.pt'}: reading PyTorch files (.pt, .bin) needs torch: "
    "pip install 'negclip-jax[torch]'"
  ) in out.stdout


def test_metrics_log_the_learning_rate_and_tensorboard_groups_tags(run_dir):
  import tensorflow as tf

  rows = rundir.read_metrics(run_dir)
  train_row = next(r for r in rows if "total" in r)
  # tiny: lr 1e-3, 2 warm-up steps; the logged step 2 ran step index 1: 1e-3 * (1 + 1) / 2.
  assert train_row["step"] == 2 and train_row["learning_rate"] == pytest.approx(1e-3)
  events = next((run_dir / "tensorboard").iterdir())
  tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(events)) for v in e.summary.value}
  assert {"train/total", "train/learning_rate", "eval/negshapes/presence_acc"} <= tags
  assert all(t.startswith(("train/", "eval/")) for t in tags)


def test_export_of_a_converted_model_claims_no_training(run_dir, tmp_path):
  dirs = export.main([str(run_dir / "export" / "hf"), "--format", "openai", "--out", str(tmp_path)])
  card = (dirs["openai"] / "README.md").read_text()
  assert "it was not trained by negclip-jax" in card
  assert "| objective |" not in card and "| architecture | CLIP: ViT 2x32, patch 8, 32 px" in card


def _tiny_model():
  model = model_lib.CLIP(model_lib.get_config("tiny"))
  return model, model_lib.init_params(model, jax.random.key(0))


def _tree(path) -> dict:
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_an_interrupted_export_leaves_the_previous_one_or_nothing(tmp_path, monkeypatch):
  """Issue 26 #8: a killed export left config.json beside a truncated model.safetensors."""
  import safetensors.numpy

  model, params = _tiny_model()
  tokenizer = negclip_jax.ClipTokenizer()
  out = tmp_path / "export" / "hf"
  export.export(model, params, tokenizer, out, ("hf",), "first")
  before = _tree(out)

  def crash(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(safetensors.numpy, "save", crash)  # after config.json is written
  with pytest.raises(OSError, match="No space left"):
    export.export(model, params, tokenizer, out, ("hf",), "second")
  assert _tree(out) == before  # the previous export, whole
  assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]  # nothing half-written beside
  with pytest.raises(OSError):
    export.export(model, params, tokenizer, tmp_path / "new", ("hf",), "first")
  assert not (tmp_path / "new").exists()
  monkeypatch.undo()

  # A writer killed mid-way (no clean-up ran) leaves only a hidden folder that loaders refuse;
  # the next export removes it.
  killed = storage.publish_dir(out)
  partial = killed.__enter__()
  (partial / "config.json").write_text("{}")
  with pytest.raises(ValueError, match="half-written export"):
    convert.load_pretrained(partial)
  assert _tree(out) == before
  export.export(model, params, tokenizer, out, ("hf",), "third")
  assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]
  assert (out / "README.md").read_text() == "third"
  convert.load_pretrained(out)


def test_export_does_not_replace_a_folder_holding_other_files(tmp_path):
  model, params = _tiny_model()
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="holds 'notes.txt', which this write would not"):
    export.export(model, params, None, tmp_path, ("openai",), "card")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
