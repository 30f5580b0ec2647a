"""TFDS: the CC-Neg / NegationCLIP COCO builders, `tfds:NAME` records, training from them."""

import dataclasses
import json
import shutil
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import small_pipeline, tiny_config, write_file_datasets

from negclip_jax import storage
from negclip_jax.data import ccneg, coco_negation, tfds_builders, tfds_shards
from negclip_jax.data.records import BadRecords, DataError
from negclip_jax.train import trainer

N, EVAL = 16, 4


def build(files: dict, data_dir, eval_size=EVAL, coco=True) -> None:
  """The datasets of `write_file_datasets`' files, through the `python -m` entry."""
  tfds_builders.main(
    ["ccneg", "--annotations", files["ccneg_path"], "--image-root", files["ccneg_image_root"]]
    + ["--data-dir", str(data_dir), "--eval-size", str(eval_size)]
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
      + ["--data-dir", str(data_dir)]
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  files = write_file_datasets(root / "files", N, 32)
  # Two annotations on one image: the COCO builder writes one example holding both.
  coco = json.loads(open(files["coco_json"]).read())
  coco["annotations"].insert(3, {**coco["annotations"][5], "caption": "a second caption"})
  open(files["coco_json"], "w").write(json.dumps(coco))
  build(files, root / "tfds")
  return types.SimpleNamespace(files=files, data_dir=str(root / "tfds"))


def _same(records, reference):
  """Equal records (texts, index), image ranges holding the image files' bytes."""
  assert len(records) == len(reference)
  for a, b in zip(records, reference, strict=True):
    assert a.index == b.index
    assert dataclasses.replace(a, image_path="") == dataclasses.replace(b, image_path="")
    with storage.open(a.image_path, "rb") as f, open(b.image_path, "rb") as g:
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


def test_manual_dir_build_reads_the_annotation_file_there(data, tmp_path):
  folder = tmp_path / "manual"
  folder.mkdir()
  (folder / "images").symlink_to(data.files["coco_image_dir"])
  coco = json.loads(open(data.files["coco_json"]).read())
  for image in coco["images"]:
    image["file_name"] = "images/" + image["file_name"]
  (folder / "negation_coco.json").write_text(json.dumps(coco))
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
  if source == "tfds":
    keys = {
      "data.presence": "tfds:negclip_ccneg",
      "data.absence": "tfds:negclip_coco_negation",
      "data.tfds_data_dir": data.data_dir,
    }
  else:
    keys = {f"data.{k}": v for k, v in f.items()} | {"data.ccneg_eval_size": EVAL}
  return tiny_config(**keys, **overrides)


def _pipeline(tables, start=0):
  return small_pipeline(*tables, start_step=start, read_threads=2)


def test_batches_from_tfds_equal_batches_from_the_files_and_resume_exactly(data):
  from_files = trainer.load_tables(_config(data, "files"), 32)
  from_tfds = trainer.load_tables(_config(data, "tfds"), 32)
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
  # The same dataset as ArrayRecord files: refused, naming the rebuild option.
  BadTexts(data_dir=str(tmp_path / "ar"), file_format="array_record").download_and_prepare()
  with pytest.raises(DataError, match=r"stored as array_record; .*--file_format tfrecord"):
    tfds_shards.load_presence("bad_texts", data_dir=str(tmp_path / "ar"))


def test_each_process_reads_its_split_for_jax_process_share(data, monkeypatch):
  import jax

  from negclip_jax import hosts

  read = {}
  every = tfds_shards.load_presence("negclip_ccneg", data_dir=data.data_dir)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(hosts, "gather_json", lambda share: [share])  # this process's only
  for p in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    read[p] = tfds_shards.load_presence("negclip_ccneg", data_dir=data.data_dir)
  assert len(read[0]) == len(read[1]) == (N - EVAL) // 2
  assert sorted(r.index for r in read[0] + read[1]) == [r.index for r in every]
