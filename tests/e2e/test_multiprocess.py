"""Multi-process training on CPU: `launch/local_cluster.sh` runs 2 processes x 2 fake devices.

Everything is checked against one in-process reference run (1 process x 4 devices, the
same global batch of 8):
  * a 2-process run from scratch, whose process 1 is SIGKILLed after the first checkpoint:
    the survivor aborts within the heartbeat timeout (no hang) and the cluster exits
    non-zero; re-launching the same command resumes from the last checkpoint and finishes
    with the reference's params, both processes reporting the same final losses;
  * a checkpoint written by 2 processes continues in 1 process, and one written by 1
    process continues in 2 processes, both ending at the reference's params; the latter
    evaluates at the end (`config.evals`) on both processes, equal to a 1-process
    evaluation of its final params;
  * the host sharding of the input pipeline (disjoint shares covering each epoch);
  * the cloud launchers' --dry-run output.
Subprocesses share the session's persistent compilation cache (conftest.py).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
  CLUSTER_STEPS,
  HEARTBEAT_S,
  LOCAL_CLUSTER,
  LOSSES,
  ROOT,
  TOL,
  assert_eval_equals_one_process,
  assert_params_close,
  cluster_cmd,
  cluster_config,
  config_with_eval,
  keep_checkpoints_up_to,
  run_cluster,
  small_pipeline,
  steps_on_disk,
  subprocess_env,
  write_file_datasets,
  write_wds_shards,
)

from negclip_jax import rundir
from negclip_jax.data import negshapes
from negclip_jax.train import pipeline, trainer

STEPS = CLUSTER_STEPS


@pytest.fixture(scope="module")
def env():
  return subprocess_env()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """1 process x 4 devices (this pytest process), checkpoints at every step."""
  workdir = tmp_path_factory.mktemp("reference")
  out = trainer.train(cluster_config(), workdir)
  assert out["step"] == STEPS and steps_on_disk(workdir) == list(range(1, STEPS + 1))
  return workdir, out


def _children(pid: int) -> dict[int, str]:
  """Direct children of `pid` -> command line."""
  children = {}
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
      if int(fields[1]) == pid:
        children[int(stat.parent.name)] = (
          (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        )
    except (OSError, IndexError, ValueError):
      pass
  return children


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, env):
  """2-process run from scratch; process 1 SIGKILLed after checkpoint 1; then the same
  command again. -> (workdir, timings, outputs)."""
  workdir = tmp_path_factory.mktemp("cluster")
  # --no-kill: the cluster script must not stop process 0 for us; it has to notice itself.
  cmd = cluster_cmd(workdir, "--no-kill")
  proc = subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  try:
    first_ckpt = workdir / "checkpoints" / "1"
    deadline = time.time() + 300
    while not first_ckpt.exists():
      assert proc.poll() is None, proc.communicate()
      assert time.time() < deadline, "no checkpoint after 300 s"
      time.sleep(0.05)
    victims = [
      pid
      for pid, cmdline in _children(proc.pid).items()
      if "negclip_jax.train" in cmdline and "--process_id 1" in cmdline
    ]
    assert len(victims) == 1, _children(proc.pid)
    os.kill(victims[0], signal.SIGKILL)
    killed_at = time.time()
    stdout, stderr = proc.communicate(timeout=HEARTBEAT_S + 120)
  finally:
    if proc.poll() is None:
      proc.kill()
  survivor_s = time.time() - killed_at
  killed = {
    "rc": proc.returncode,
    "stdout": stdout,
    "stderr": stderr,
    "steps": steps_on_disk(workdir),
  }
  # A stale cache on one host: process 1's shard of each image-cache entry is gone, so
  # process 1 misses while process 0 hits; all must agree to recompute (no hang).
  stale = sorted((workdir / "image_cache").glob("*/shard-00001-of-00002.npy"))
  assert stale, sorted((workdir / "image_cache").rglob("*"))
  for shard in stale:
    shard.unlink()
  t0 = time.time()
  resumed = run_cluster(workdir, env)  # the same command again
  return workdir, {"survivor_s": survivor_s, "resume_s": time.time() - t0}, killed, resumed


# ----------------------------------------------------------------------------- tests


def test_host_shards_are_disjoint_and_cover_each_epoch():
  data = negshapes.generate_pairs(40, seed=0, image_size=32, split="train")
  presence, absence = pipeline.negshapes_tables(data)
  hosts = [
    small_pipeline(
      presence,
      absence,
      context_length=16,
      global_batch=8,
      num_steps=10,
      local_devices=2,
      process_index=p,
      process_count=2,
    )
    for p in range(2)
  ]
  for stream, n in (("presence", len(presence)), ("absence", len(absence))):
    steps_per_epoch = n // 8
    for epoch in range(2):
      steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
      shares = [np.concatenate([h.host_indices(s)[stream] for s in steps]) for h in hosts]
      assert all(len(s) == steps_per_epoch * 4 for s in shares)
      assert not set(shares[0]) & set(shares[1])  # disjoint
      together = np.concatenate(shares)
      assert len(set(together)) == len(together) == steps_per_epoch * 8  # each once
      for s in steps:  # and the two shares are exactly the global batch
        np.testing.assert_array_equal(
          np.concatenate([h.host_indices(s)[stream] for h in hosts]),
          hosts[0].global_indices(s)[stream],
        )


def test_killed_process_fails_fast_and_relaunch_resumes(killed_then_resumed, reference):
  workdir, timings, killed, (resumed, output) = killed_then_resumed
  print(
    f"\nsurvivor exited {timings['survivor_s']:.1f} s after the SIGKILL; "
    f"relaunch took {timings['resume_s']:.1f} s"
  )
  # The cluster failed with process 1's status; process 0 noticed on its own and failed too.
  assert killed["rc"] == 128 + signal.SIGKILL, killed["stderr"][-3000:]
  assert "process 1" in killed["stderr"] and "failed with exit status 137" in killed["stderr"]
  assert "process 0 (pid" in killed["stderr"] and "process 0 exited 0" not in killed["stderr"]
  assert timings["survivor_s"] < HEARTBEAT_S + 90, timings
  assert killed["steps"] and max(killed["steps"]) < STEPS
  # The same command again: resumed from the last checkpoint, finished, same as 1 process,
  # after both processes recomputed the image cache that only process 1 missed.
  assert "image cache: hit here but missed on another process; recomputing" in output
  assert f"Resuming from {workdir}/checkpoints/{max(killed['steps'])}" in output
  assert resumed["step"] == STEPS and not resumed["stopped_early"]
  assert steps_on_disk(workdir)[-1] == STEPS
  _, params, _ = rundir.load_model(workdir)
  ref_dir, ref = reference
  assert_params_close(params, ref["params"])
  for key in LOSSES:
    np.testing.assert_allclose(resumed[key], ref["last_metrics"][key], **TOL)


def test_two_process_checkpoint_continues_in_one_process(killed_then_resumed, reference, tmp_path):
  workdir = killed_then_resumed[0]
  copy = tmp_path / "from_two"
  shutil.copytree(workdir, copy)
  keep_checkpoints_up_to(copy, 2)  # step 2: written by the 2-process relaunch
  out = trainer.train(cluster_config(), copy)
  assert out["step"] == STEPS
  assert_params_close(out["params"], reference[1]["params"])


def test_one_process_checkpoint_continues_in_two_processes_and_evaluates(reference, env, tmp_path):
  ref_dir, ref = reference
  copy = tmp_path / "from_one"
  shutil.copytree(ref_dir, copy, ignore=shutil.ignore_patterns("image_cache"))
  keep_checkpoints_up_to(copy, STEPS - 1)
  first, output = run_cluster(copy, env, config_file=config_with_eval(tmp_path))
  assert f"Resuming from {copy}/checkpoints/{STEPS - 1}" in output
  assert first["step"] == STEPS
  _, params, _ = rundir.load_model(copy)
  assert_params_close(params, ref["params"])
  assert_eval_equals_one_process(copy, first["eval"])  # each process embedded its block


def test_local_cluster_stops_the_others_when_one_fails(tmp_path):
  fake = tmp_path / "fake_python"
  fake.write_text(
    '#!/usr/bin/env bash\nfor a; do last=$a; done\necho "process $last: $*"\n'
    "if [[ $last == 1 ]]; then sleep 1; exit 3; fi\nexec sleep 60\n"
  )
  fake.chmod(0o755)
  t0 = time.time()
  proc = subprocess.run(
    [
      "bash",
      str(LOCAL_CLUSTER),
      "--processes",
      "3",
      "--devices-per-process",
      "2",
      "--port",
      "1234",
      "--kill-grace",
      "1",
      "--",
      "--config",
      "c.py",
      "--workdir",
      str(tmp_path / "w"),
      "--x=1",
    ],
    cwd=ROOT,
    env={**os.environ, "PYTHON": str(fake)},
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert proc.returncode == 3, proc.stderr
  assert time.time() - t0 < 20
  assert (
    "process 0: -m negclip_jax.train --config c.py --workdir " in proc.stdout
    and "--x=1 --coordinator_address 127.0.0.1:1234 --num_processes 3 --process_id 0" in proc.stdout
  )
  assert "process 1 (pid" in proc.stderr and "stopping the other processes" in proc.stderr
  log2 = (tmp_path / "w" / "cluster_logs" / "process_2.log").read_text()
  assert "--process_id 2" in log2


def test_local_cluster_usage_errors():
  proc = subprocess.run(
    ["bash", str(LOCAL_CLUSTER), "--processes", "2"], cwd=ROOT, capture_output=True, text=True
  )
  assert proc.returncode == 2 and "--devices-per-process" in proc.stderr


def _dry_run(script: str, *args: str) -> str:
  env = {**os.environ, "PATH": "/usr/bin:/bin"}  # no gcloud/srun needed
  proc = subprocess.run(
    ["bash", str(ROOT / "launch" / script), "--dry-run", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


def test_tpu_pod_dry_run():
  out = _dry_run(
    "tpu_pod.sh",
    "--project",
    "my-proj",
    "--zone",
    "us-central2-b",
    "--name",
    "negclip-pod",
    "--config",
    "configs/omni_negclip_vitb32.py",
    "--workdir",
    "gs://bucket/run1",
    "--",
    "--config.batch_size=1024",
  )
  assert "gcloud compute tpus tpu-vm create negclip-pod" in out
  assert "--accelerator-type=v4-32" in out and "--version=tpu-ubuntu2204-base" in out
  assert "--zone=us-central2-b" in out and "--project=my-proj" in out
  assert "gcloud compute tpus tpu-vm scp" in out and "--worker=all" in out
  assert "gcloud compute tpus tpu-vm ssh negclip-pod" in out
  assert "jax[tpu]==0.10.2" in out and "pip install -q -r requirements.txt" in out
  train_lines = [row for row in out.splitlines() if "python -m negclip_jax.train" in row]
  assert len(train_lines) == 1, out
  line = train_lines[0]  # the same command on every worker; the bucket path as given
  assert "ssh negclip-pod" in line and "--worker=all" in line and "--distributed" in line
  assert "gcsfuse" not in out and "mount" not in line
  assert "--workdir gs://bucket/run1" in line and "--config.batch_size=1024" in line
  assert "tail -n +1 -F" in out.splitlines()[-1] and "--worker=0" in out.splitlines()[-1]
  teardown = _dry_run(
    "tpu_pod.sh",
    "--project",
    "my-proj",
    "--zone",
    "us-central2-b",
    "--name",
    "negclip-pod",
    "--teardown",
  )
  assert "gcloud compute tpus tpu-vm delete negclip-pod" in teardown


def test_tpu_pod_preflight_refuses_a_slice_that_does_not_compile():
  args = ["--zone", "z", "--workdir", "gs://b/r", "--accelerator-type", "v5litepod-3"]
  args += ["--preflight", "--", "--config.batch_size=256"]
  assert "-m negclip_jax.compile --config configs/omni_negclip_vitb32.py --topology " in (
    _dry_run("tpu_pod.sh", *args)
  )
  env = {**os.environ, "PATH": "/usr/bin:/bin", "PREFLIGHT_PYTHON": sys.executable}
  proc = subprocess.run(
    ["bash", str(ROOT / "launch" / "tpu_pod.sh"), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )  # no gcloud on PATH: it must stop before needing it
  assert proc.returncode == 2, proc.stderr
  assert "error: --topology 'v5litepod-3'" in proc.stderr
  assert "preflight: the run does not fit or does not compile on v5litepod-3" in proc.stderr
  assert "gcloud" not in proc.stderr


def test_gpu_dry_run():
  single = _dry_run(
    "gpu.sh",
    "--config",
    "configs/omni_negclip_vitb32.py",
    "--workdir",
    "runs/gpu",
    "--",
    "--config.batch_size=512",
  )
  assert "python -m negclip_jax.train --config configs/omni_negclip_vitb32.py" in single
  assert "--config.batch_size=512" in single and "--distributed" not in single
  slurm = _dry_run(
    "gpu.sh",
    "--slurm",
    "--nodes",
    "2",
    "--config",
    "configs/omni_negclip_vitb32.py",
    "--workdir",
    "/shared/runs/gpu",
  )
  assert "srun" in slurm and "--nodes=2" in slurm and "--ntasks-per-node=1" in slurm
  assert "--distributed" in slurm and "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in slurm
  batch = _dry_run(
    "gpu.sh", "--sbatch", "--nodes", "2", "--gpus-per-node", "4", "--workdir", "/shared/runs/gpu"
  )
  assert batch.startswith("sbatch --nodes=2") and "--wrap=" in batch and "srun" in batch


def test_sharded_datasets_read_per_host_train_as_in_one_process(env, tmp_path):
  """Presence from webdataset shards (each process indexes its block of shards), absence
  from a TFDS dataset (each process reads its `tfds.split_for_jax_process` share), both
  all-gathered: the same records, batches and params as one process reading everything."""
  from negclip_jax.data import tfds_builders

  write_wds_shards(tmp_path, samples_per_shard=5, shards=4)
  files = write_file_datasets(tmp_path / "files", 16, 32)
  tfds_builders.main(
    ["coco_negation", "--annotations", files["coco_json"], "--image-root", files["coco_image_dir"]]
    + ["--data-dir", str(tmp_path / "tfds"), "--eval-size", "0"]
  )
  flags = {
    "data.presence": "wds:" + str(tmp_path / "shard-{000..003}.tar"),
    "data.absence": "tfds:negclip_coco_negation",
    "data.tfds_data_dir": str(tmp_path / "tfds"),
    "data.image_cache": False,
  }
  one = trainer.train(cluster_config(**flags), tmp_path / "one")
  first, _ = run_cluster(
    tmp_path / "two", env, train_flags=tuple(f"--config.{k}={v}" for k, v in flags.items())
  )
  assert first["step"] == one["step"] == STEPS
  _, params, _ = rundir.load_model(tmp_path / "two")
  assert_params_close(params, one["params"])
