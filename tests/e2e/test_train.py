"""Training runs end to end: checkpoints, metrics, preemption, exact resume, fallbacks."""

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from helpers import ROOT, leaves, steps_on_disk, tiny_config, tiny_train_cmd, write_file_datasets

from negclip_jax import rundir
from negclip_jax.eval import evaluators
from negclip_jax.model import clip as model_lib
from negclip_jax.train import checkpoint, image_cache, param_groups, trainer


def test_run_writes_checkpoints_metrics_and_resumes_as_noop(tmp_path):
  out = trainer.train(tiny_config(), tmp_path)
  assert out["step"] == 6 and not out["stopped_early"]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
    2,
    4,
    6,
  ]
  rows = rundir.read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert {"L1", "L2", "L3", "L_neg", "L_orig", "L_text", "total", "samples_per_s"} <= set(rows[0])
  assert list((tmp_path / "tensorboard").iterdir())
  model, params, _ = rundir.load_model(tmp_path)
  for a, b in zip(leaves(params), leaves(out["params"])):
    np.testing.assert_array_equal(a, b)
  again = trainer.train(tiny_config(), tmp_path)  # same command again: nothing left to do
  assert again["step"] == 6


def _wait_for(path, proc, timeout=240):
  deadline = time.time() + timeout
  while not path.exists():
    assert proc.poll() is None, proc.communicate()[0]
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def test_sigterm_saves_and_resume_is_bitwise_identical(tmp_path):
  steps = 24  # SIGTERM lands after checkpoint 4; the run stops at the next save boundary
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
  }
  cmd = tiny_train_cmd(
    tmp_path / "interrupted",
    f"--config.total_steps={steps}",
    "--config.save_every=4",
    "--config.log_every=4",
  )
  proc = subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  _wait_for(tmp_path / "interrupted" / "checkpoints" / "4", proc)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, output
  stopped = json.loads(output.strip().splitlines()[-1])
  assert stopped["stopped_early"] and 4 <= stopped["step"] < steps
  saved = {
    int(p.name) for p in (tmp_path / "interrupted" / "checkpoints").iterdir() if p.name.isdigit()
  }
  assert stopped["step"] in saved
  # Library INFO logs (Orbax: ~40 lines per save) stay off without -v.
  info = [row for row in output.splitlines() if re.match(r"I\d{4} ", row)]
  assert not [row for row in info if "checkpoint" in row], info[:5]
  resumed = trainer.train(
    tiny_config(total_steps=steps, save_every=4, log_every=4), tmp_path / "interrupted"
  )
  straight = trainer.train(
    tiny_config(total_steps=steps, save_every=100, log_every=4), tmp_path / "straight"
  )
  assert resumed["step"] == straight["step"] == steps
  for a, b in zip(leaves(resumed["params"]), leaves(straight["params"])):
    np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_with_step_and_keeps_good_checkpoints(tmp_path):
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step \d+"):
    trainer.train(
      tiny_config(learning_rate=1e30, total_steps=12, save_every=1, log_every=1), tmp_path
    )
  rows = rundir.read_metrics(tmp_path)
  assert steps_on_disk(tmp_path)
  for step in steps_on_disk(tmp_path):  # every checkpoint on disk predates the first bad step
    assert any(r["step"] == step and np.isfinite(r["total"]) for r in rows)


def test_unknown_config_key_is_an_error(tmp_path):
  proc = subprocess.run(
    tiny_train_cmd(tmp_path, "--config.learning_rte=1e-3"), cwd=ROOT, capture_output=True, text=True
  )
  assert proc.returncode != 0 and "learning_rte" in proc.stderr


def test_conclip_trains_from_ccneg_coco_and_distractor_files(tmp_path):
  data_keys = write_file_datasets(tmp_path / "data", 16, 32)
  runs = {}
  for cache in (True, False):
    c = tiny_config(objective="conclip", total_steps=2, log_every=1, save_every=2)
    for k, v in {**data_keys, "image_cache": cache}.items():
      setattr(c.data, k, v)
    if cache:
      presence, _ = trainer.load_tables(c, 32)
      assert presence.distractors == [
        str(tmp_path / "data/coco" / f"{1000 + i}.png") for i in range(16)
      ]
    runs[cache] = trainer.train(c, tmp_path / f"cache_{cache}")
  rows = rundir.read_metrics(tmp_path / "cache_True")
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r[k]) for r in rows for k in ("L1", "L2", "L3", "L_neg", "total"))
  # The cached image tower (images and distractors) trains exactly as the pixel path.
  for k, v in runs[False]["last_metrics"].items():
    if k != "samples_per_s":
      np.testing.assert_allclose(runs[True]["last_metrics"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  # One cache entry for the images (both tables list the same files), one for the distractors.
  assert len(list((tmp_path / "cache_True/image_cache").glob("*/index.json"))) == 2
  # Without the mapping the run stops before training, naming the key.
  c = tiny_config(objective="conclip")
  for k, v in {**data_keys, "distractor_mapping": ""}.items():
    setattr(c.data, k, v)
  with pytest.raises(ValueError, match="config.data.distractor_mapping must be set"):
    trainer.train(c, tmp_path / "no_mapping")
  with pytest.raises(ValueError, match=r"config.objective='con_clip'; choose from"):
    trainer.train(tiny_config(objective="con_clip"), tmp_path / "typo")


@pytest.mark.parametrize(
  "name", sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
)
def test_every_config_loads_with_valid_choices(name):
  import importlib

  from negclip_jax.train import losses, param_groups

  c = importlib.import_module(f"configs.{name}").get_config()
  assert c.objective in losses.OBJECTIVES
  assert param_groups.text_layers(c.layers, 12)
  assert {c.data.presence, c.data.absence} <= {"ccneg", "coco_negation", "negshapes"}
  assert c.data.on_error in ("raise", "skip")


PARSE_CONFIG = (
  "from absl import app; from ml_collections import config_flags; "
  "c = config_flags.DEFINE_config_file('config', lock_config=True); "
  "app.run(lambda argv: print(repr(c.value.layers)))"
)


@pytest.mark.parametrize("spelling", ["0,2", "[0,2]", "(0,2)", "2, 0"])
def test_layers_from_the_command_line(spelling):
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      PARSE_CONFIG,
      "--config",
      str(ROOT / "configs/tiny.py"),
      f"--config.layers={spelling}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr
  layers = ast.literal_eval(proc.stdout)
  trainer.validate_config(tiny_config(layers=layers))
  assert param_groups.text_layers(layers, 4) == (0, 2)
  labels = param_groups.label_params(
    model_lib.init_params(model_lib.CLIP(model_lib.get_config("tiny")), jax.random.key(0)), layers
  )
  blocks = {
    k
    for k, v in labels["text_model"]["encoder"]["layers"].items()
    if v["mlp"]["fc1"]["kernel"] == param_groups.TRAINABLE
  }
  assert blocks == {"0", "2"}


def test_layers_from_a_config_file_and_bad_values():
  assert param_groups.text_layers((2, 0, 2), 4) == (0, 2) and param_groups.text_layers(3, 4) == (3,)
  with pytest.raises(
    trainer.ConfigError,
    match=r"^config.layers: Unknown layer preset '0,x'; use "
    r"one of .* or text block indices such as 0,1$",
  ):
    trainer.validate_config(tiny_config(layers="0,x"))
  with pytest.raises(ValueError, match=r"^layers: text block indices \[4\] out of range"):
    param_groups.text_layers("[0,4]", 4)


def test_data_sources_are_validated_before_anything_loads():
  with pytest.raises(
    trainer.ConfigError, match=r"^config.data.presence='cc-neg'; choose from ccneg"
  ):
    trainer.validate_config(tiny_config(**{"data.presence": "cc-neg"}))
  with pytest.raises(trainer.ConfigError, match=r"^config.data.absence='negshape'; choose from"):
    trainer.validate_config(tiny_config(**{"data.absence": "negshape"}))
  for source in ("wds:shard-{0..3}.tar", "tfds:negclip_ccneg"):
    trainer.validate_config(tiny_config(**{"data.presence": source}))
    with pytest.raises(trainer.ConfigError, match=r"^config.objective='conclip' needs distractor"):
      trainer.validate_config(tiny_config(objective="conclip", **{"data.presence": source}))


def test_image_hard_fraction_needs_a_distractor_objective_and_excludes_hard_fraction():
  image_hard = {"data.negshapes_image_hard_fraction": 0.5}
  with pytest.raises(trainer.ConfigError, match=r"needs config.objective in \(.*'conclip'"):
    trainer.validate_config(tiny_config(**image_hard))
  with pytest.raises(trainer.ConfigError, match="not both"):
    trainer.validate_config(
      tiny_config(objective="conclip", **image_hard, **{"data.negshapes_hard_fraction": 0.5})
    )
  for objective in ("conclip", "paired_choices"):
    trainer.validate_config(tiny_config(objective=objective, **image_hard))
  with pytest.raises(trainer.ConfigError, match=r"^config.objective='paired_choices' needs dis"):
    trainer.validate_config(tiny_config(objective="paired_choices", **{"data.presence": "wds:x"}))
  affirmed = {"data.negshapes_image_hard_affirmed_fraction": 0.5}
  with pytest.raises(trainer.ConfigError, match="needs config.data.negshapes_image_hard_fraction"):
    trainer.validate_config(tiny_config(objective="paired_choices", **affirmed))
  trainer.validate_config(tiny_config(objective="paired_choices", **image_hard, **affirmed))


def test_cli_config_errors_are_one_line(tmp_path):
  proc = subprocess.run(
    tiny_train_cmd(tmp_path, "--config.layers=[0,x]"), cwd=ROOT, capture_output=True, text=True
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config.layers: Unknown layer")
  assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------- multi-host hazards


def test_preemption_check_syncs_hosts_only_at_boundaries(monkeypatch):
  gathered, other_host = [], {"requested": False}
  monkeypatch.setattr(checkpoint.jax, "process_count", lambda: 2)
  monkeypatch.setattr(
    checkpoint.multihost_utils,
    "process_allgather",
    lambda x: gathered.append(x) or np.stack([x, not other_host["requested"]]),
  )
  ckpt = SimpleNamespace(manager=SimpleNamespace(reached_preemption=lambda step: False))
  watcher = checkpoint.PreemptionWatcher()
  try:
    assert not any(watcher.should_stop(s, ckpt, boundary=s % 4 == 0) for s in range(1, 9))
    assert len(gathered) == 2  # steps 4 and 8 only
    other_host["requested"] = True  # SIGTERM on the other host: acted on at the next boundary
    assert not watcher.should_stop(9, ckpt, boundary=False)
    assert watcher.should_stop(12, ckpt, boundary=True) and len(gathered) == 3
  finally:
    watcher.close()


def test_train_loop_marks_log_and_save_steps_as_boundaries_and_evaluates_once(
  tmp_path, monkeypatch
):
  boundaries, evaluated = {}, []
  should_stop = checkpoint.PreemptionWatcher.should_stop

  def spy(self, step, ckpt, boundary):
    boundaries[step] = boundary
    return should_stop(self, step, ckpt, boundary)

  monkeypatch.setattr(checkpoint.PreemptionWatcher, "should_stop", spy)
  monkeypatch.setattr(
    evaluators.Evaluator, "run", lambda self, *a: evaluated.append(self.name) or {"x": 1.0}
  )
  out = trainer.train(
    tiny_config(
      total_steps=7,
      log_every=3,
      save_every=5,
      evals={"a": {"task": "negshapes", "every": 7}, "b": {"task": "negshapes", "every": 3}},
    ),
    tmp_path,
  )
  assert [s for s, b in sorted(boundaries.items()) if b] == [3, 5, 6, 7]
  # every=7 divides 7: once; every=3: steps 3, 6, then once at the end
  assert evaluated == ["b", "b", "a", "b"] and out["eval"] == {"a": {"x": 1.0}, "b": {"x": 1.0}}
  rows = rundir.read_metrics(tmp_path)
  assert [(r["step"], k) for r in rows for k in r if k.startswith("eval/")] == [
    (3, "eval/b/x"),
    (6, "eval/b/x"),
    (7, "eval/a/x"),
    (7, "eval/b/x"),
  ]


def test_image_cache_hit_must_be_agreed_by_every_process(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(image_cache.jax, "process_count", lambda: 2)
  monkeypatch.setattr(
    image_cache.multihost_utils, "process_allgather", lambda x: np.stack([x, np.array(False)])
  )  # the other process misses
  assert not image_cache._hit_everywhere((np.zeros((1, 2)), {}))
  assert "hit here but missed on another process" in caplog.text
  assert not image_cache._hit_everywhere(None)
  monkeypatch.setattr(
    image_cache.multihost_utils, "process_allgather", lambda x: np.stack([x, np.array(True)])
  )
  assert image_cache._hit_everywhere((np.zeros((1, 2)), {}))


def test_image_cache_recomputes_when_any_process_missed(tmp_path, monkeypatch):
  model = model_lib.CLIP(model_lib.get_config("tiny"))
  params = model_lib.init_params(model, jax.random.key(0))
  images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), np.uint8)
  first, _ = image_cache.image_embeddings(model, params, images, 32, cache_dir=str(tmp_path))
  computed = []
  compute = image_cache._compute
  monkeypatch.setattr(image_cache, "_compute", lambda *a: computed.append(1) or compute(*a))
  monkeypatch.setattr(image_cache, "_hit_everywhere", lambda cached: False)
  again, _ = image_cache.image_embeddings(model, params, images, 32, cache_dir=str(tmp_path))
  assert computed == [1]
  np.testing.assert_allclose(again, first, rtol=1e-6)
  monkeypatch.setattr(image_cache, "_hit_everywhere", lambda cached: cached is not None)
  for npy in tmp_path.glob("*/*.npy"):  # a truncated entry is a miss, recomputed, not an error
    npy.write_bytes(npy.read_bytes()[:20])
  healed, _ = image_cache.image_embeddings(model, params, images, 32, cache_dir=str(tmp_path))
  assert computed == [1, 1]
  np.testing.assert_allclose(healed, first, rtol=1e-6)
