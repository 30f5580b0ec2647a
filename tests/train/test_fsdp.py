"""config.parallelism="fsdp": the sharded step equals the pmap step; checkpoints move between
meshes, device counts, process counts and pmap; saving writes each process's shards only.

Runs that need another device count than this process's 4 run in subprocesses (XLA_FLAGS
must be set before JAX starts): the step parity on 8 devices (`fsdp_step_parity.py`), the
reference run on mesh (2, 4), a resume on 1 device and a 2-process resume.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import (
  ROOT,
  assert_eval_equals_one_process,
  assert_params_close,
  cluster_config,
  config_with_eval,
  keep_checkpoints_up_to,
  run_cluster,
  subprocess_env,
  tiny_train_cmd,
)
from jax.sharding import PartitionSpec as P

from negclip_jax import rundir
from negclip_jax.model import clip as model_lib
from negclip_jax.model import convert
from negclip_jax.train import sharding, trainer

STEPS = 4
RESUME_FROM = 2
TOL = 1e-5


@pytest.fixture(scope="module")
def env():
  return subprocess_env()


def run(cmd: list[str], env: dict, devices: int) -> str:
  proc = subprocess.run(
    cmd,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


def train_cmd(workdir: Path, **overrides) -> list[str]:
  flags = {**dict(total_steps=STEPS, save_every=1, log_every=1, max_to_keep=10), **overrides}
  return tiny_train_cmd(workdir, *(f"--config.{k}={v}" for k, v in flags.items()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  """An uninterrupted fsdp run on mesh (2, 4) (8 devices) -> (workdir, final params)."""
  workdir = tmp_path_factory.mktemp("mesh_2x4")
  run(train_cmd(workdir, parallelism="fsdp", fsdp=4), env, devices=8)
  return workdir, rundir.load_model(workdir)[1]


def resumable_copy(reference, tmp_path) -> Path:
  """The reference run's workdir with only its checkpoints up to RESUME_FROM."""
  copy = tmp_path / "resumed"
  shutil.copytree(reference[0], copy, ignore=shutil.ignore_patterns("image_cache"))
  keep_checkpoints_up_to(copy, RESUME_FROM)
  return copy


def test_param_spec_shards_the_largest_dimension_that_divides():
  assert sharding.param_spec((49408, 32), 8) == P("fsdp", None)
  assert sharding.param_spec((32, 64), 8) == P(None, "fsdp")
  assert sharding.param_spec((12, 8), 8) == P(None, "fsdp")  # 12 does not divide by 8
  assert sharding.param_spec((6, 6), 4) == P()  # none divides: replicated
  assert sharding.param_spec((), 4) == P()
  assert sharding.param_spec((64, 64), 1) == P()
  with pytest.raises(ValueError, match="config.fsdp=3 must divide the 4 devices"):
    sharding.make_mesh(3)


def test_fsdp_step_equals_pmap_step_on_three_meshes(env):
  out = run([sys.executable, str(Path(__file__).parent / "fsdp_step_parity.py")], env, devices=8)
  result = json.loads(out.strip().splitlines()[-1])
  print("\n" + json.dumps(result, indent=1))
  assert set(result) == {"(8, 1)", "(2, 4)", "(1, 8)"}
  for mesh, r in result.items():
    assert r["step"] == 3, mesh
    assert r["loss"] < TOL and r["params"] < TOL, (mesh, r)
  # Sharded over fsdp on the vocabulary, the moments with it; replicated when fsdp is 1.
  assert result["(8, 1)"]["embedding_shard"] == [49408, 32]
  assert result["(2, 4)"]["embedding_shard"] == result["(2, 4)"]["adam_mu_shard"] == [12352, 32]
  assert result["(1, 8)"]["embedding_shard"] == result["(1, 8)"]["adam_mu_shard"] == [6176, 32]


@pytest.mark.parametrize(
  "overrides",
  [
    dict(parallelism="fsdp", fsdp=1),  # mesh (4, 1)
    dict(parallelism="pmap"),
  ],
  ids=["mesh_4x1", "pmap"],
)
def test_checkpoint_from_mesh_2x4_continues_here(reference, tmp_path, overrides, capsys):
  workdir = resumable_copy(reference, tmp_path)
  out = trainer.train(cluster_config(**overrides), workdir)
  assert f"Resuming from {workdir}/checkpoints/{RESUME_FROM}" in capsys.readouterr().out
  assert out["step"] == STEPS
  assert_params_close(out["params"], reference[1])
  if overrides["parallelism"] == "pmap":  # and back: a pmap checkpoint continues on (2, 2)
    keep_checkpoints_up_to(workdir, STEPS - 1)
    out = trainer.train(cluster_config(parallelism="fsdp", fsdp=2), workdir)
    assert f"Resuming from {workdir}/checkpoints/{STEPS - 1}" in capsys.readouterr().out
    assert_params_close(out["params"], reference[1])


def test_checkpoint_from_mesh_2x4_continues_on_one_device(reference, tmp_path, env):
  workdir = resumable_copy(reference, tmp_path)
  out = run(train_cmd(workdir, parallelism="fsdp"), env, devices=1)
  assert "1 process(es), 1 device(s)" in out and f"checkpoints/{RESUME_FROM}" in out
  assert_params_close(rundir.load_model(workdir)[1], reference[1])


def test_two_process_fsdp_resumes_evaluates_and_each_process_writes_its_shards(
  reference, tmp_path, env
):
  workdir = resumable_copy(reference, tmp_path)
  first, output = run_cluster(
    workdir, env, config_file=config_with_eval(tmp_path), train_flags=("--config.parallelism=fsdp",)
  )  # 2 x 2 devices
  assert f"Resuming from {workdir}/checkpoints/{RESUME_FROM}" in output
  assert first["step"] == STEPS
  assert_params_close(rundir.load_model(workdir)[1], reference[1])
  # The final evaluation embedded with the params sharded across both processes.
  assert_eval_equals_one_process(workdir, first["eval"])
  # Step 4 was written by the 2 processes, state sharded (1, 4): each wrote its own half.
  state = workdir / "checkpoints" / str(STEPS) / "state"
  written = {
    p: sum(f.stat().st_size for f in (state / f"ocdbt.process_{p}").rglob("*") if f.is_file())
    for p in (0, 1)
  }
  total = sum(written.values())
  print(f"\nbytes written per process: {written}")
  assert all(0.3 * total < n < 0.7 * total for n in written.values()), written
  # Its checksums (summed over both processes' shards) verify here in one process; bytes
  # flipped in process 1's half are caught, and the reader falls back a step.
  assert rundir.load(workdir).step == STEPS
  data_file = max(
    (f for f in (state / "ocdbt.process_1").rglob("*") if f.is_file()),
    key=lambda f: f.stat().st_size,
  )
  data = bytearray(data_file.read_bytes())
  middle = slice(len(data) // 2, len(data) // 2 + 64)
  data[middle] = bytes(b ^ 0xFF for b in data[middle])
  data_file.write_bytes(bytes(data))
  assert rundir.load(workdir).step == STEPS - 1


@pytest.mark.parametrize("preset,name", [("vit-h-14", "ViT-H-14"), ("vit-bigg-14", "ViT-bigG-14")])
def test_big_presets_are_open_clips(preset, name):
  """The presets are open_clip's model_configs (installed with open_clip_torch), parsed the
  way `convert` loads an open_clip checkpoint."""
  spec = importlib.util.find_spec("open_clip")
  assert spec is not None, "pip install --no-deps open_clip_torch==3.3.0 (see the Makefile)"
  cfg = json.loads((Path(spec.origin).parent / "model_configs" / f"{name}.json").read_text())
  assert model_lib.get_config(preset) == convert.config_from_open_clip(cfg)
  counts = {"vit-h-14": 986e6, "vit-bigg-14": 2.54e9}  # open_clip's published sizes
  model = model_lib.CLIP(model_lib.get_config(preset))
  params = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
  assert abs(n - counts[preset]) / counts[preset] < 0.01, n


def test_embedder_sharded_like_fsdp_equals_replicated():
  from test_train_step import CONFIG, MODEL, make_batch

  from negclip_jax.eval.embed import Embedder

  params = model_lib.init_params(MODEL, jax.random.key(0))
  batch = make_batch(13)  # not a multiple of the batch size: padding is dropped
  replicated = Embedder(MODEL, params, batch_size=8, progress=False)
  sharded = Embedder(MODEL, params, batch_size=8, progress=False, mesh=sharding.make_mesh(2))
  emb = sharded.params["text_model"]["embeddings"]["token_embedding"]["embedding"]
  assert emb.sharding.spec == P("fsdp", None)  # [49408, 32] split over the fsdp pairs
  for kind, x in (("texts", batch["presence_caption_ids"]), ("images", batch["presence_pixels"])):
    expected, actual = getattr(replicated, kind)(x), getattr(sharded, kind)(x)
    assert actual.shape == (13, CONFIG.projection_dim)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=kind)


def test_fsdp_config_errors_are_one_line():
  with pytest.raises(trainer.ConfigError, match="config.parallelism='ddp'; choose from"):
    trainer.validate_config(cluster_config(parallelism="ddp"))
  with pytest.raises(trainer.ConfigError, match="global_negatives=False needs config.parallelism"):
    trainer.validate_config(cluster_config(parallelism="fsdp", global_negatives=False))
