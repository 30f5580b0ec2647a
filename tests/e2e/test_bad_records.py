"""Bad records, training-time evaluators and CLI errors, tried as a user would (issue 13).

Each kind of bad record is planted in small CC-Neg (JSONL) and NegationCLIP (JSON) files;
`data.on_error=skip` must drop exactly those, with the image cache on and off, list them in
WORKDIR/skipped.jsonl and `stat` each image file at most once.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import write_file_datasets

from negclip_jax import rundir
from negclip_jax.configs import tiny
from negclip_jax.data.records import BadRecords, DataError
from negclip_jax.eval import cli as eval_cli
from negclip_jax.eval import evaluators
from negclip_jax.train import trainer

N = 16


def _bad_datasets(root: Path) -> tuple[dict, set]:
  """config.data overrides for files with one bad record of each kind, and the expected
  skipped.jsonl entries {(file, record, key)}."""
  data = write_file_datasets(root, N, 32)
  images = root / "cc3m/images"
  data["coco_image_dir"] = str(shutil.copytree(images, root / "coco_images"))
  for folder in (images, root / "coco_images"):
    (folder / "4.png").write_bytes(b"not a png")  # undecodable
  lines = []
  for i, (caption, negated) in enumerate(zip(*_ccneg_texts(data["ccneg_path"]))):
    lines.append(
      json.dumps(
        {"image_path": str(images / f"{i}.png"), "caption": caption, "negative_prompt": negated}
      )
    )
  lines[1] = json.dumps(
    {"image_path": str(images / "1.png"), "caption": " ", "negative_prompt": "x"}
  )  # empty text
  lines[2] = json.dumps({"image_path": str(images / "2.png"), "caption": "x"})  # missing key
  lines[3] = lines[3].replace("3.png", "missing.png")  # missing image
  lines[5] = "{not json"  # unparsable record
  ccneg = root / "ccneg.jsonl"
  ccneg.write_text("\n".join(lines) + "\n")
  coco = json.loads(Path(data["coco_json"]).read_text())
  del coco["annotations"][1]["updated_caption"]  # missing key
  coco["annotations"][2]["image_id"] = 999  # unknown image
  coco["annotations"][3]["caption"] = ""  # empty text
  coco["images"][6]["file_name"] = "gone.png"  # missing image
  Path(data["coco_json"]).write_text(json.dumps(coco))
  data["ccneg_path"] = str(ccneg)
  expected = {
    (str(ccneg), 1, "caption"),
    (str(ccneg), 2, "negative_prompt"),
    (str(ccneg), 3, "image_path"),
    (str(ccneg), 4, "image"),
    (str(ccneg), 5, None),
    (data["coco_json"], 1, "updated_caption"),
    (data["coco_json"], 2, "image_id"),
    (data["coco_json"], 3, "caption"),
    (data["coco_json"], 4, "image"),
    (data["coco_json"], 6, "image_path"),
  }
  return data, expected


def _ccneg_texts(pt_path):
  from negclip_jax.data import ccneg

  records = ccneg.load_ccneg(pt_path, "/unused", split="all", check_images=False, keep_commas=True)
  return [r.caption for r in records], [r.negated for r in records]


def _config(data: dict, **overrides):
  c = tiny.get_config()
  c.total_steps, c.log_every, c.save_every = 2, 1, 2
  for k, v in data.items():
    setattr(c.data, k, v)
  c.data.ccneg_eval_size = 0
  c.update_from_flattened_dict(overrides)
  return c


@pytest.mark.parametrize("cache", [True, False])
def test_every_kind_of_bad_record_is_skipped_listed_and_stat_once(tmp_path, cache, monkeypatch):
  data, expected = _bad_datasets(tmp_path / "data")
  stats = {}
  real_stat = os.stat

  def counting_stat(path, *args, **kwargs):
    if str(path).startswith(str(tmp_path / "data")) and str(path).endswith(".png"):
      stats[str(path)] = stats.get(str(path), 0) + 1
    return real_stat(path, *args, **kwargs)

  monkeypatch.setattr(os, "stat", counting_stat)
  out = trainer.train(
    _config(data, **{"data.on_error": "skip", "data.image_cache": cache}), tmp_path / "run"
  )
  assert out["step"] == 2 and np.isfinite(out["last_metrics"]["total"])
  rows = [json.loads(line) for line in (tmp_path / "run/skipped.jsonl").read_text().splitlines()]
  assert {(r["file"], r["record"], r["key"]) for r in rows} == expected
  assert all(r["reason"] for r in rows)
  assert stats and max(stats.values()) == 1, stats


def test_bad_records_raise_by_default_naming_file_record_and_key(tmp_path):
  data, _ = _bad_datasets(tmp_path / "data")
  with pytest.raises(DataError, match=r"ccneg.jsonl, record 1, key 'caption': empty"):
    trainer.train(_config(data), tmp_path / "run")
  assert not (tmp_path / "run/checkpoints").exists()


def test_skipped_undecodable_image_without_cache_is_found_before_training(tmp_path):
  """Without the image cache a corrupt image used to stop the run when its batch was built."""
  data, _ = _bad_datasets(tmp_path / "data")
  c = _config(data, **{"data.on_error": "skip", "data.image_cache": False})
  bad = BadRecords("skip")
  presence, absence = trainer.load_tables(c, 32, bad)
  assert 4 in presence.dropped and 4 in absence.dropped
  assert str(tmp_path / "data/cc3m/images/4.png") not in presence.images


def _read_fault_datasets(root: Path) -> tuple[dict, set]:
  """config.data overrides for files with an image over a 4096-pixel limit (7.png, shared by
  both streams) and a NUL byte in a CC-Neg image path (record 2), and the expected
  skipped.jsonl entries {(file, record, key)}."""
  from PIL import Image

  data = write_file_datasets(root, N, 32)
  images = Path(data["ccneg_image_root"]) / "images"
  Image.new("RGB", (80, 80), (10, 200, 30)).save(images / "7.png")  # 6400 > 4096 pixels
  texts = _ccneg_texts(data["ccneg_path"])
  rows = [
    {"image_path": str(images / f"{i}.png"), "caption": c, "negative_prompt": n}
    for i, (c, n) in enumerate(zip(*texts))
  ]
  rows[2]["image_path"] = str(images / "2\x00.png")
  ccneg = root / "ccneg.jsonl"
  ccneg.write_text("".join(json.dumps(r) + "\n" for r in rows))
  data.update(ccneg_path=str(ccneg), max_image_pixels=4096)
  expected = {
    (str(ccneg), 2, "image_path"),
    (str(ccneg), 7, "image"),
    (data["coco_json"], 7, "image"),
  }
  return data, expected


@pytest.mark.parametrize("cache", [True, False])
def test_too_large_image_and_nul_path_are_bad_records(tmp_path, cache, monkeypatch):
  """Issue 26 #3: PIL's DecompressionBombError and "embedded null byte" stopped the run
  with a traceback under both policies."""
  from PIL import Image

  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # process-wide
  data, expected = _read_fault_datasets(tmp_path / "data")
  c = _config(data, **{"data.on_error": "skip", "data.image_cache": cache})
  out = trainer.train(c, tmp_path / "run")
  assert out["step"] == 2
  rows = [json.loads(line) for line in (tmp_path / "run/skipped.jsonl").read_text().splitlines()]
  assert {(r["file"], r["record"], r["key"]) for r in rows} == expected
  too_large = [r["reason"] for r in rows if r["record"] == 7]
  assert all(
    "6400 pixels, more than the limit 4096 (data.max_image_pixels)" in r for r in too_large
  )
  if not cache:
    return
  with pytest.raises(DataError) as e:  # under "raise": the first of them, one line
    trainer.train(_config(data, **{"data.image_cache": cache}), tmp_path / "run2")
  assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path / "data"))


def test_max_image_pixels_must_be_positive(tmp_path):
  with pytest.raises(trainer.ConfigError, match=r"config.data.max_image_pixels=0"):
    trainer.train(_config({}, **{"data.max_image_pixels": 0}), tmp_path / "run")


# ------------------------------------------------------------------------- evaluators


def test_evaluator_config_errors_are_one_line_and_found_before_training(tmp_path):
  cases = {
    "config.evals.x.task='cc_neg' is not a task": {"x": {"task": "cc_neg"}},
    "config.evals.x: task 'ccneg' needs data, image_root": {"x": {"task": "ccneg"}},
    r"config.evals.x: task 'negshapes' takes no option\(s\) \['data'\]": {
      "x": {"task": "negshapes", "data": "a"}
    },
    "config.evals.ccneg.data: no such file or directory: /no/such.pt": {
      "ccneg": {"data": "/no/such.pt", "image_root": str(tmp_path)}
    },
    r"config.evals.x.every=-1 must be >= 0": {"x": {"task": "negshapes", "every": -1}},
  }
  for message, evals in cases.items():
    with pytest.raises(evaluators.EvalConfigError, match=message):
      evaluators.from_config(evals)
  c = tiny.get_config()
  c.evals = cases["config.evals.ccneg.data: no such file or directory: /no/such.pt"]
  with pytest.raises(evaluators.EvalConfigError):
    trainer.train(c, tmp_path / "run")
  assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_file_evaluators_run_at_their_cadence_and_print_a_final_table(tmp_path, capsys):
  """ccneg, negationclip and layers read their own data files; results equal the
  `evaluate` CLI's on the same files."""
  data = write_file_datasets(tmp_path / "data", N, 32)
  c = tiny.get_config()
  c.total_steps, c.log_every, c.save_every = 2, 1, 2
  images = data["coco_image_dir"]
  c.evals = {
    "ccneg": {
      "data": data["ccneg_path"],
      "image_root": data["ccneg_image_root"],
      "eval_size": 8,
      "every": 1,
    },
    "coco": {"task": "negationclip", "data": data["coco_json"], "image_root": images},
    "layers": {"data": data["ccneg_path"], "eval_size": 8, "num": 4},
  }
  out = trainer.train(c, tmp_path / "run")
  rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
  evaluated = [
    (r["step"], k.split("/")[1])
    for r in rows
    for k in r
    if k.startswith("eval/") and k.endswith("/n")
  ]
  assert evaluated == [(1, "ccneg"), (2, "ccneg"), (2, "coco"), (2, "layers")]
  assert set(out["eval"]) == {"ccneg", "coco", "layers"}
  cli = eval_cli.main(
    [
      "--model",
      str(tmp_path / "run"),
      "--task",
      "ccneg",
      "--data",
      data["ccneg_path"],
      "--image-root",
      data["ccneg_image_root"],
      "--eval-size",
      "8",
    ]
  )
  for k, v in cli["ccneg"].items():
    np.testing.assert_allclose(out["eval"]["ccneg"][k], v, rtol=1e-5, err_msg=k)


# ------------------------------------------------------------------------- CLI errors


def _one_error_line(capsys, cli, argv) -> str:
  """The one `error:` line of `cli(argv)`, which exits 1 (progress bars may precede it)."""
  capsys.readouterr()  # what ran before
  with pytest.raises(SystemExit) as exit_info:
    cli(argv)
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert exit_info.value.code == 1 and len(errors) == 1 and "Traceback" not in err, err
  return errors[0]


def test_evaluate_cli_errors_are_one_line_naming_the_file_and_record(tmp_path, capsys):
  data = write_file_datasets(tmp_path / "data", N, 32)
  line = _one_error_line(capsys, eval_cli.cli, ["--model", "/no/such/model", "--task", "negshapes"])
  assert line.startswith("error: /no/such/model: no such file or directory")
  run = tmp_path / "run"
  c = tiny.get_config()
  c.total_steps = c.save_every = 1
  trainer.train(c, run)
  bad_image = Path(data["ccneg_image_root"]) / "images/5.png"
  bad_image.write_bytes(b"\x89PNG truncated")
  line = _one_error_line(
    capsys,
    eval_cli.cli,
    [
      "--model",
      str(run),
      "--task",
      "ccneg",
      "--data",
      data["ccneg_path"],
      "--image-root",
      data["ccneg_image_root"],
      "--eval-size",
      str(N),
    ],
  )
  assert line.startswith(f"error: {bad_image}, record 5, key 'image_path': cannot read the image")


def test_metrics_log_keeps_one_row_per_step_after_a_fallback(tmp_path):
  rows = [{"step": s, "total": float(s)} for s in (1, 2, 3, 4, 5, 6)]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  rundir.drop_rows_after(path, 4)
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.parametrize("value", [-2, True])
def test_decode_processes_must_be_a_count(tmp_path, value):
  with pytest.raises(trainer.ConfigError, match=r"config.data.decode_processes="):
    trainer.train(_config({}, **{"data.decode_processes": value}), tmp_path / "run")
