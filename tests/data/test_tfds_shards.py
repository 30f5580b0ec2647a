"""TFDS: the CC-Neg / NegationCLIP COCO builders, `tfds:NAME` records, training from them."""

import dataclasses
import json
import os
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import small_pipeline, tiny_config, write_file_datasets

from negclip_jax import storage
from negclip_jax.data import ccneg, coco_negation, tfds_builders, tfds_shards
from negclip_jax.data.records import BadRecords, DataError
from negclip_jax.train import trainer

N, EVAL = 16, 4


FORMATS = ("tfrecord", "array_record")


def build(files: dict, data_dir, eval_size=EVAL, coco=True, file_format="tfrecord") -> None:
  """The datasets of `write_file_datasets`' files, through the `python -m` entry."""
  out = ["--data-dir", str(data_dir), "--file-format", file_format]
  tfds_builders.main(
    ["ccneg", "--annotations", files["ccneg_path"], "--image-root", files["ccneg_image_root"]]
    + out
    + ["--eval-size", str(eval_size)]
  )
  if coco:
    tfds_builders.main(
      [
        "coco_negation",
        "--annotations",
        files["coco_json"],
        "--image-root",
        files["coco_image_dir"],
      ]
      + out
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  files = write_file_datasets(root / "files", N, 32)
  # Two annotations on one image: the COCO builder writes one example holding both.
  coco = json.loads(open(files["coco_json"]).read())
  coco["annotations"].insert(3, {**coco["annotations"][5], "caption": "a second caption"})
  open(files["coco_json"], "w").write(json.dumps(coco))
  for file_format in FORMATS:
    build(files, root / file_format, file_format=file_format)
  dirs = {f: str(root / f) for f in FORMATS}
  return types.SimpleNamespace(files=files, data_dir=dirs["tfrecord"], dirs=dirs)


def _same(records, reference):
  """Equal records (texts, index), image ranges holding the image files' bytes."""
  assert len(records) == len(reference)
  for a, b in zip(records, reference, strict=True):
    assert a.index == b.index
    assert dataclasses.replace(a, image_path="") == dataclasses.replace(b, image_path="")
    with storage.open(a.image_path, "rb") as f, storage.open(b.image_path, "rb") as g:
      assert f.read() == g.read()  # the image bytes, copied verbatim into the shard


def test_builders_hold_the_records_of_the_files(data):
  f = data.files
  for split, keep in (("train", False), ("eval", True)):
    _same(
      tfds_shards.load_presence("negclip_ccneg", split, data_dir=data.data_dir),
      ccneg.load_ccneg(f["ccneg_path"], f["ccneg_image_root"], split, EVAL, keep_commas=keep),
    )
  absence = tfds_shards.load_absence("negclip_coco_negation", data_dir=data.data_dir)
  _same(absence, coco_negation.load_coco_negation(f["coco_json"], f["coco_image_dir"]))
  assert absence[3].image_path == absence[6].image_path  # one example, one image range
  info = tfds.builder("negclip_coco_negation", data_dir=data.data_dir).info
  assert info.splits["train"].num_examples == N  # one example per image
  with pytest.raises(DataError, match=r"no split 'test'; available: \['eval', 'train'\]"):
    tfds_shards.load_presence("negclip_ccneg", "test", data_dir=data.data_dir)
  with pytest.raises(DataError, match=r"feature 'negated' not found"):
    tfds_shards.load_presence("negclip_coco_negation", data_dir=data.data_dir)
  with pytest.raises(
    DataError,
    match=r"nor prepared in this data_dir; build it with .python -m negclip_jax.data.tfds_builders",
  ):
    tfds_shards.load_presence("negclip_nothing", data_dir=data.data_dir)


def test_array_record_shards_hold_the_records_of_the_tfrecord_shards(data):
  ar = data.dirs["array_record"]
  assert tfds.builder("negclip_ccneg", data_dir=ar).info.file_format.value == "array_record"
  for split in ("train", "eval"):
    records = tfds_shards.load_presence("negclip_ccneg", split, data_dir=ar)
    _same(records, tfds_shards.load_presence("negclip_ccneg", split, data_dir=data.data_dir))
    for r in records:  # FILE#RECORD:OFFSET+SIZE/NAME, the image cache's key
      assert f"negclip_ccneg-{split}.array_record-00000-of-00001#" in r.image_path
      assert storage.file_stamp(r.image_path).endswith(r.image_path.split("#")[1].split("/")[0])
  absence = tfds_shards.load_absence("negclip_coco_negation", data_dir=ar)
  _same(absence, tfds_shards.load_absence("negclip_coco_negation", data_dir=data.data_dir))


def test_a_damaged_array_record_shard_is_named_never_read_as_empty(data, tmp_path):
  shutil.copytree(data.dirs["array_record"], tmp_path, dirs_exist_ok=True)
  (shard,) = Path(tmp_path).glob("negclip_ccneg/*/negclip_ccneg-train.array_record-*")
  image_path = tfds_shards.load_presence("negclip_ccneg", data_dir=str(tmp_path))[0].image_path
  with storage.open(image_path, "rb") as f:  # this thread's reader of the shard, kept open
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # One damaged chunk (one record: TFDS writes group_size:1): that example's fault only.
  damaged = bytearray(shard.read_bytes())
  damaged[3000:3400] = bytes(b ^ 0xFF for b in damaged[3000:3400])
  shard.write_bytes(bytes(damaged))
  with pytest.raises(DataError, match=rf"{shard}, record \d+: unreadable record: .*hash mismatch"):
    tfds_shards.load_presence("negclip_ccneg", data_dir=str(tmp_path))
  bad = BadRecords("skip")
  read = tfds_shards.load_presence("negclip_ccneg", data_dir=str(tmp_path), bad=bad)
  assert len(read) == N - EVAL - 1 and len(bad.skipped) == 1
  kept = {r.index for r in read}
  _same(
    read,
    [
      r
      for r in tfds_shards.load_presence("negclip_ccneg", data_dir=data.data_dir)
      if r.index in kept
    ],
  )
  shard.write_bytes(b"not an ArrayRecord file")
  with pytest.raises(DataError, match=rf"{shard}: not a readable ArrayRecord file"):
    tfds_shards.load_presence("negclip_ccneg", data_dir=str(tmp_path))
  with pytest.raises(OSError, match="not a readable ArrayRecord file"):
    storage.open(image_path, "rb")  # the file changed: its kept reader is not reused
  shard.unlink()
  with pytest.raises(DataError, match=rf"{shard}: shard not found"):
    tfds_shards.load_presence("negclip_ccneg", data_dir=str(tmp_path))


def test_build_command_names_a_missing_file_in_one_line(tmp_path, capsys):
  missing = str(tmp_path / "none.jsonl")
  with pytest.raises(SystemExit) as exit_:
    tfds_builders.main(
      ["ccneg", "--annotations", missing, "--image-root", str(tmp_path)]
      + ["--data-dir", str(tmp_path / "out")]
    )
  err = capsys.readouterr().err
  assert exit_.value.code == 1 and err.startswith("error: ") and missing in err
  assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def _manual_dir(files: dict, folder: Path) -> Path:
  """A --manual_dir for negclip_coco_negation: the COCO file and its images in one folder."""
  folder.mkdir()
  (folder / "images").symlink_to(files["coco_image_dir"])
  coco = json.loads(open(files["coco_json"]).read())
  for image in coco["images"]:
    image["file_name"] = "images/" + image["file_name"]
  (folder / "negation_coco.json").write_text(json.dumps(coco))
  return folder


# What the `tfds` script runs for `tfds build ARGS` (tensorflow_datasets.scripts.cli.main,
# whose other subcommands import apache-beam and mlcroissant before it parses anything): the
# `build` subcommand's parser and command, once per argument list given as one JSON argument.
TFDS_BUILD = """
import json, sys
from tensorflow_datasets.scripts.cli import build, cli_utils
for argv in json.loads(sys.argv[1]):
  cli_utils.make_flags_parser(build.Args, "tfds build")(["tfds build", *argv]).execute()
"""


def test_the_documented_tfds_build_command_builds_what_the_python_m_route_builds(data, tmp_path):
  import subprocess
  import sys

  from helpers import subprocess_env

  docs = (Path(__file__).parents[2] / "docs/data_formats.md").read_text()
  (command,) = re.findall(r"^(tfds build negclip_coco_negation .*array_record)$", docs, re.M)
  manual = str(_manual_dir(data.files, tmp_path / "manual"))
  out = {f: tmp_path / f for f in FORMATS}
  argvs = [
    [{"DIR": manual, "OUT": str(out[f])}.get(a, a) for a in command.split()[2:]] for f in FORMATS
  ]
  argvs[0][-1] = "tfrecord"  # the same command, --file_format tfrecord
  assert argvs[1][-2:] == ["--file_format", "array_record"] and command.startswith("tfds build ")
  subprocess.run(
    [sys.executable, "-c", TFDS_BUILD, json.dumps(argvs)],
    env=subprocess_env(),
    check=True,
    capture_output=True,
    timeout=120,
  )
  for f in FORMATS:
    name = "negclip_coco_negation"
    assert tfds.builder(name, data_dir=str(out[f])).info.file_format.value == f
    assert next(out[f].glob(f"{name}/1.0.0/{name}-train.{f}-00000-of-00001"))
    _same(
      tfds_shards.load_absence(name, data_dir=str(out[f])),
      tfds_shards.load_absence(name, data_dir=data.dirs[f]),
    )


def test_manual_dir_build_reads_the_annotation_file_there(data, tmp_path):
  folder = _manual_dir(data.files, tmp_path / "manual")
  builder = tfds_builders.NegclipCocoNegation(data_dir=str(tmp_path / "out"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=folder))
  got = tfds_shards.load_absence("negclip_coco_negation", data_dir=str(tmp_path / "out"))
  assert [(r.caption, r.updated) for r in got] == [
    (r.caption, r.updated)
    for r in tfds_shards.load_absence("negclip_coco_negation", data_dir=data.data_dir)
  ]
  (folder / "other.json").write_text("{}")
  with pytest.raises(DataError, match="exactly one annotation file"):
    tfds_builders.NegclipCocoNegation(data_dir=str(tmp_path / "out2")).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=folder)
    )


def _config(data, source: str, **overrides):
  f = data.files
  if source in FORMATS:
    keys = {
      "data.presence": "tfds:negclip_ccneg",
      "data.absence": "tfds:negclip_coco_negation",
      "data.tfds_data_dir": data.dirs[source],
    }
  else:
    keys = {f"data.{k}": v for k, v in f.items()} | {"data.ccneg_eval_size": EVAL}
  return tiny_config(**keys, **overrides)


def _pipeline(tables, start=0):
  return small_pipeline(*tables, start_step=start, read_threads=2)


@pytest.mark.parametrize("file_format", FORMATS)
def test_batches_from_tfds_equal_batches_from_the_files_and_resume_exactly(data, file_format):
  from_files = trainer.load_tables(_config(data, "files"), 32)
  from_tfds = trainer.load_tables(_config(data, file_format), 32)
  for a, b in zip(from_files, from_tfds, strict=True):
    assert list(a.record_index) == list(b.record_index) and a.texts() == b.texts()
  straight = list(_pipeline(from_tfds))
  for step, (a, b) in enumerate(zip(list(_pipeline(from_files)), straight, strict=True)):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), step
  resumed = list(_pipeline(from_tfds, start=3))
  for a, b in zip(straight[3:], resumed, strict=True):
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_training_from_tfds_skips_and_lists_an_undecodable_image(data, tmp_path):
  files = write_file_datasets(tmp_path / "files", 12, 32)
  (tmp_path / "files/cc3m/images/2.png").write_bytes(b"\x89PNG not really")
  build(files, tmp_path / "tfds", eval_size=0, coco=False)
  coco = "negclip_coco_negation"  # the fixture's, whose image 2 is fine
  shutil.copytree(f"{data.data_dir}/{coco}", tmp_path / "tfds" / coco)
  c = tiny_config(
    **{
      "data.presence": "tfds:negclip_ccneg",
      "data.absence": "tfds:negclip_coco_negation",
      "data.tfds_data_dir": str(tmp_path / "tfds"),
      "data.on_error": "skip",
      "data.image_cache": False,
      "total_steps": 2,
      "batch_size": 4,
    }
  )
  out = trainer.train(c, tmp_path / "run")
  assert out["step"] == 2 and np.isfinite(out["last_metrics"]["total"])
  rows = [json.loads(x) for x in (tmp_path / "run/skipped.jsonl").read_text().splitlines()]
  assert [(r["file"], r["record"], r["key"]) for r in rows] == [("tfds:negclip_ccneg", 2, "image")]
  assert "negclip_ccneg-train.tfrecord-00000-of-00001#" in rows[0]["reason"]  # the image's range


def test_an_undecodable_image_in_array_record_shards_is_skipped_and_listed(data, tmp_path):
  files = write_file_datasets(tmp_path / "files", 12, 32)
  (tmp_path / "files/cc3m/images/2.png").write_bytes(b"\x89PNG not really")
  build(files, tmp_path / "ar", eval_size=0, coco=False, file_format="array_record")
  coco = "negclip_coco_negation"  # the fixture's, whose image 2 is fine
  shutil.copytree(f"{data.dirs['array_record']}/{coco}", tmp_path / "ar" / coco)
  c = _config(data, "array_record", **{"data.on_error": "skip", "data.image_cache": False})
  c.data.tfds_data_dir = str(tmp_path / "ar")
  bad = BadRecords("skip")
  presence, _ = trainer.load_tables(c, 32, bad)  # decodes every image: no image cache
  assert 2 not in list(presence.record_index) and len(presence.record_index) == 11
  ((skipped,),) = [[(e.file, e.index, e.key) for e in bad.skipped]]
  assert skipped == ("tfds:negclip_ccneg", 2, "image")
  assert "negclip_ccneg-train.array_record-00000-of-00001#" in bad.skipped[0].reason


def test_examples_without_usable_text_go_to_the_bad_record_policy(tmp_path):
  class BadTexts(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      text = tfds.features.Text()
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(), "caption": text, "negated": text}
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      image = np.zeros((4, 4, 3), np.uint8)
      for i, negated in enumerate(["no cat", " ", "no dog"]):
        yield i, {"image": image, "caption": f"cat {i}", "negated": negated}

  BadTexts(data_dir=str(tmp_path)).download_and_prepare()
  with pytest.raises(DataError, match=r"bad_texts-train\.tfrecord.*record \d, key 'negated'"):
    tfds_shards.load_presence("bad_texts", data_dir=str(tmp_path))
  bad = BadRecords("skip")
  records = tfds_shards.load_presence("bad_texts", data_dir=str(tmp_path), bad=bad)
  assert sorted(r.negated for r in records) == ["no cat", "no dog"]
  assert [(e.key, e.reason) for e in bad.skipped] == [("negated", "empty string")]
  # The same dataset as ArrayRecord files: the same records, the same example skipped.
  BadTexts(data_dir=str(tmp_path / "ar"), file_format="array_record").download_and_prepare()
  with pytest.raises(DataError, match=r"bad_texts-train\.array_record.*record \d, key 'negated'"):
    tfds_shards.load_presence("bad_texts", data_dir=str(tmp_path / "ar"))
  bad = BadRecords("skip")
  records = tfds_shards.load_presence("bad_texts", data_dir=str(tmp_path / "ar"), bad=bad)
  assert sorted(r.negated for r in records) == ["no cat", "no dog"]
  assert [(e.key, e.reason) for e in bad.skipped] == [("negated", "empty string")]
  # As Parquet files: refused, naming dataset_info.json, its file format and the rebuild option.
  BadTexts(data_dir=str(tmp_path / "pq"), file_format="parquet").download_and_prepare()
  info = os.path.join(
    tfds.builder("bad_texts", data_dir=str(tmp_path / "pq")).data_dir, "dataset_info.json"
  )
  with pytest.raises(DataError) as error:
    tfds_shards.load_presence("bad_texts", data_dir=str(tmp_path / "pq"))
  assert str(error.value).startswith(info) and "has file_format parquet; " in str(error.value)
  assert "rebuild it with `tfds build --file_format=tfrecord`" in str(error.value)


@pytest.mark.parametrize("file_format", FORMATS)
def test_each_process_reads_its_split_for_jax_process_share(data, monkeypatch, file_format):
  import jax

  from negclip_jax import hosts

  read = {}
  data_dir = data.dirs[file_format]
  every = tfds_shards.load_presence("negclip_ccneg", data_dir=data_dir)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(hosts, "gather_json", lambda share: [share])  # this process's only
  for p in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    read[p] = tfds_shards.load_presence("negclip_ccneg", data_dir=data_dir)
  assert len(read[0]) == len(read[1]) == (N - EVAL) // 2
  assert sorted(r.index for r in read[0] + read[1]) == [r.index for r in every]
