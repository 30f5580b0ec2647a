"""Dataset readers: round trips on tiny fixture files in each real format, and errors."""

import csv
import json
import os

import numpy as np
import pytest
from helpers import NEGBENCH_MCQ_HEADER
from PIL import Image

from negclip_jax.data import ccneg
from negclip_jax.data.ccneg import convert_ccneg_to_jsonl, load_ccneg
from negclip_jax.data.coco_negation import load_coco_negation
from negclip_jax.data.karpathy import load_karpathy
from negclip_jax.data.negbench import load_negbench_mcq, load_negbench_retrieval
from negclip_jax.data.negrefcocog import load_negrefcocog
from negclip_jax.data.records import (
  AbsenceRecord,
  BadRecords,
  DataError,
  McqRecord,
  PresenceRecord,
  RetrievalSet,
)


def _jpeg(path, value=128):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (8, 8), (value, value, value)).save(path, "JPEG")
  return str(path)


def _write_json(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f)
  return str(path)


def _write_csv(path, header, rows):
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def _assert_names(err, file, *parts):
  message = str(err.value)
  assert os.path.basename(file) in message
  for part in parts:
    assert part in message, message


# --------------------------------------------------------------------------- records


def test_retrieval_set_derives_image_to_captions_and_validates():
  rs = RetrievalSet(["a.jpg", "b.jpg"], ["x", "y", "z"], [1, 0, 1])
  assert rs.image_paths == ("a.jpg", "b.jpg")
  assert rs.image_to_captions == ((1,), (0, 2))
  with pytest.raises(ValueError, match="outside"):
    RetrievalSet(["a.jpg"], ["x"], [1])
  with pytest.raises(ValueError, match="captions but"):
    RetrievalSet(["a.jpg"], ["x", "y"], [0])


def test_data_error_formats_file_index_key():
  err = DataError("f.json", "empty string", index=3, key="caption")
  assert isinstance(err, ValueError)
  assert str(err) == "f.json, record 3, key 'caption': empty string"
  assert (err.file, err.index, err.key) == ("f.json", 3, "caption")


# --------------------------------------------------------------------------- CC-Neg

PREFIX = "/workspace/datasets/cc3m/"


def _ccneg_data(n=5):
  return {
    "image_paths": [PREFIX + f"cc3m_subset_images_extracted_final/{i}.jpg" for i in range(n)],
    "annotations": [
      {
        "json": {"caption": f"a dog, a ball {i}", "key": f"{i:09d}"},
        "sop_data": {"negative-prompt": f"a dog, but no ball, {i}", "subject": "dog"},
      }
      for i in range(n)
    ],
  }


@pytest.fixture
def ccneg_pt(tmp_path):
  import torch

  root = tmp_path / "ccneg_images"
  for i in range(5):
    _jpeg(root / "cc3m_subset_images_extracted_final" / f"{i}.jpg")
  path = tmp_path / "ccneg_preprocessed.pt"
  torch.save(_ccneg_data(), path)
  return str(path), str(root)


def test_ccneg_pt_splits_prefix_rewrite_and_comma_removal(ccneg_pt):
  path, root = ccneg_pt
  everything = load_ccneg(path, root, split="all", eval_size=2)
  assert len(everything) == 5
  assert everything[0] == PresenceRecord(
    image_path=os.path.join(root, "cc3m_subset_images_extracted_final/0.jpg"),
    caption="a dog, a ball 0",  # true caption keeps its commas
    negated="a dog but no ball 0",
  )
  train = load_ccneg(path, root, split="train", eval_size=2)
  evaluation = load_ccneg(path, root, split="eval", eval_size=2)
  assert train == everything[:3]
  assert evaluation == everything[3:]


def test_ccneg_jsonl_conversion_round_trip(ccneg_pt, tmp_path, capsys):
  path, root = ccneg_pt
  out = tmp_path / "ccneg.jsonl"
  ccneg.main(["convert", path, str(out)])
  assert "wrote 5 records" in capsys.readouterr().out
  first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
  assert first == {
    "image_path": PREFIX + "cc3m_subset_images_extracted_final/0.jpg",
    "caption": "a dog, a ball 0",
    "negative_prompt": "a dog, but no ball, 0",
  }
  assert load_ccneg(out, root, split="all") == load_ccneg(path, root, split="all")
  assert convert_ccneg_to_jsonl(path, out) == 5


def test_ccneg_other_path_prefixes(tmp_path):
  root = tmp_path / "root"
  rel, absolute = _jpeg(root / "rel" / "a.jpg"), _jpeg(tmp_path / "elsewhere" / "b.jpg")
  path = tmp_path / "ccneg.jsonl"
  path.write_text(
    json.dumps({"image_path": "rel/a.jpg", "caption": "c", "negative_prompt": "n"})
    + "\n\n"
    + json.dumps({"image_path": absolute, "caption": "c", "negative_prompt": "n"})
    + "\n",
    encoding="utf-8",
  )
  records = load_ccneg(path, root, split="all")
  assert [r.image_path for r in records] == [rel, absolute]


_CALLS = []


def _record_call(tag):
  _CALLS.append(tag)
  return tag


class _Payload:
  """Unpickling this would call _record_call: the safe loader must refuse it."""

  def __reduce__(self):
    return _record_call, ("executed",)


def test_ccneg_pt_with_arbitrary_object_is_rejected(tmp_path):
  import torch

  data = _ccneg_data(2)
  data["annotations"][1]["json"]["caption"] = _Payload()
  path = tmp_path / "ccneg_preprocessed.pt"
  torch.save(data, path)
  with pytest.raises(DataError) as err:
    load_ccneg(path, tmp_path, split="all", eval_size=0)
  _assert_names(err, path, "weights_only=True", "Unsupported global", "_record_call", "JSONL")
  assert _CALLS == []
  with pytest.raises(DataError):
    convert_ccneg_to_jsonl(path, tmp_path / "out.jsonl")
  assert _CALLS == []


def test_ccneg_corrupt_pt_and_bad_extension(ccneg_pt, tmp_path):
  path, root = ccneg_pt
  truncated = tmp_path / "truncated.pt"
  with open(path, "rb") as f:
    truncated.write_bytes(f.read()[:200])
  with pytest.raises(DataError) as err:
    load_ccneg(truncated, root)
  _assert_names(err, truncated, "not a readable torch file")
  text = tmp_path / "text.pt"
  text.write_text("not a torch file")
  with pytest.raises(DataError) as err:
    load_ccneg(text, root)
  _assert_names(err, text, "weights_only=True", "Unsupported operand")
  other = tmp_path / "data.json"
  other.write_text("{}")
  with pytest.raises(DataError, match="unsupported extension"):
    load_ccneg(other, root)


def _break_lengths(d):
  d["image_paths"].pop()


def _drop_sop_data(d):
  del d["annotations"][2]["sop_data"]


def _drop_negative_prompt(d):
  del d["annotations"][3]["sop_data"]["negative-prompt"]


def _empty_caption(d):
  d["annotations"][1]["json"]["caption"] = "  "


def _non_str_path(d):
  d["image_paths"][4] = 7


@pytest.mark.parametrize(
  "corrupt, parts",
  [
    (_break_lengths, ["4 image_paths but 5 annotations", "image_paths/annotations"]),
    (_drop_sop_data, ["record 2", "'sop_data'", "missing key"]),
    (_drop_negative_prompt, ["record 3", "'sop_data.negative-prompt'", "missing key"]),
    (_empty_caption, ["record 1", "'json.caption'", "empty string"]),
    (_non_str_path, ["record 4", "'image_paths'", "expected a string"]),
  ],
)
def test_ccneg_malformed_pt(tmp_path, corrupt, parts):
  import torch

  data = _ccneg_data()
  corrupt(data)
  path = tmp_path / "ccneg_preprocessed.pt"
  torch.save(data, path)
  with pytest.raises(DataError) as err:
    load_ccneg(path, tmp_path, split="all", check_images=False)
  _assert_names(err, path, *parts)


def test_ccneg_malformed_jsonl(tmp_path):
  path = tmp_path / "ccneg.jsonl"
  good = json.dumps({"image_path": "a.jpg", "caption": "c", "negative_prompt": "n"})
  path.write_text(good + "\n" + json.dumps({"image_path": "a.jpg", "caption": "c"}) + "\n")
  with pytest.raises(DataError) as err:
    load_ccneg(path, tmp_path, split="all", check_images=False)
  _assert_names(err, path, "record 1", "'negative_prompt'")
  path.write_text(good + "\n" + good + "\n{oops\n")
  with pytest.raises(DataError) as err:
    load_ccneg(path, tmp_path, split="all", check_images=False)
  _assert_names(err, path, "record 2", "line 3")


def test_ccneg_jsonl_one_latin1_line_is_one_bad_record(tmp_path):
  """Issue 26 #3: one Latin-1 line refused the whole file, even under on_error=skip."""
  path = tmp_path / "ccneg.jsonl"
  row = lambda caption: json.dumps(
    {"image_path": "a.jpg", "caption": caption, "negative_prompt": "n"}, ensure_ascii=False
  )
  path.write_bytes(
    (row("one") + "\n" + row("caf\u00e9") + "\n" + row("three") + "\n")
    .encode("utf-8")
    .replace("caf\u00e9".encode(), "caf\u00e9".encode("latin-1"))
  )
  bad = BadRecords("skip")
  records = load_ccneg(path, tmp_path, split="all", eval_size=0, check_images=False, bad=bad)
  assert [r.caption for r in records] == ["one", "three"]
  assert [(e.file, e.index) for e in bad.skipped] == [(str(path), 1)]
  with pytest.raises(DataError) as err:
    load_ccneg(path, tmp_path, split="all", eval_size=0, check_images=False)
  _assert_names(err, path, "record 1", "not UTF-8 text on line 2")


def test_ccneg_eval_size_and_missing_images(ccneg_pt, caplog):
  path, root = ccneg_pt
  everything = load_ccneg(path, root, split="all")
  # A file smaller than the default 40000 held-out records: both splits use all of it,
  # with a warning naming the option that holds records out.
  for split in ("train", "eval"):
    caplog.clear()
    assert load_ccneg(path, root, split=split) == everything
    assert f"the {split} split uses all 5" in caplog.text and "--eval-size" in caplog.text
  with pytest.raises(DataError, match=r"eval_size=-1 must be >= 0 \(--eval-size"):
    load_ccneg(path, root, eval_size=-1)
  os.remove(os.path.join(root, "cc3m_subset_images_extracted_final/1.jpg"))
  os.remove(os.path.join(root, "cc3m_subset_images_extracted_final/3.jpg"))
  with pytest.raises(DataError) as err:
    load_ccneg(path, root, split="all")
  _assert_names(err, path, "2 of 5 image paths do not exist", "record 1:", "record 3:")
  assert len(load_ccneg(path, root, split="all", check_images=False)) == 5


def _distractor_fixture(tmp_path, mapping):
  """COCO train2017-like json (ids out of order) + images, and a mapping .pt."""
  import torch

  image_dir = tmp_path / "train2017"
  ids = [30, 4, 17]  # CocoCaptions order (sorted ids): 4, 17, 30
  for k in ids:
    _jpeg(image_dir / f"{k:012d}.jpg", value=k)
  coco = _write_json(
    tmp_path / "captions_train2017.json",
    {"images": [{"id": k, "file_name": f"{k:012d}.jpg"} for k in ids], "annotations": []},
  )
  mapping_path = tmp_path / "distractor_image_mapping.pt"
  torch.save(mapping, mapping_path)
  return str(mapping_path), coco, image_dir


def test_ccneg_distractors_from_coco_mapping(ccneg_pt, tmp_path):
  import torch

  path, root = ccneg_pt
  mapping, coco, image_dir = _distractor_fixture(
    tmp_path, [[2, 0, 1], [0, 1, 2], [1, 2, 0], [2, 1, 0], [0, 2, 1]]
  )
  paths = ccneg.load_distractor_paths(mapping, coco, image_dir)
  by_index = [str(image_dir / f"{k:012d}.jpg") for k in (4, 17, 30)]
  assert paths == [by_index[j] for j in (2, 0, 1, 2, 0)]
  train = load_ccneg(path, root, split="train", eval_size=2, distractor_paths=paths)
  evaluation = load_ccneg(path, root, split="eval", eval_size=2, distractor_paths=paths)
  assert [r.distractor_path for r in train + evaluation] == paths
  assert [r.caption for r in train] == [r.caption for r in load_ccneg(path, root, eval_size=2)]
  # A [N, k] tensor works too; the train-only mapping of the release covers "train".
  torch.save(torch.tensor([[2, 0], [0, 1], [1, 2]]), mapping)
  short = ccneg.load_distractor_paths(mapping, coco, image_dir)
  assert short == paths[:3]
  assert len(load_ccneg(path, root, eval_size=2, distractor_paths=short)) == 3
  with pytest.raises(
    DataError,
    match=r"3 entries; the 'eval' split needs one for each of "
    r"records 3..4",
  ):
    load_ccneg(path, root, split="eval", eval_size=2, distractor_paths=short)


@pytest.mark.parametrize(
  "mapping,parts",
  [
    ([[0], [3]], ("record 1", "COCO index 3 is outside the 3 images", "captions_train2017.json")),
    ([[0], []], ("record 1", "empty list of COCO indices")),
    ([[0], ["a"]], ("record 1", "expected an integer COCO index, got 'a'")),
    ({"a": 1}, ("expected a list (one entry per CC-Neg record), got dict",)),
  ],
)
def test_ccneg_distractor_mapping_errors(tmp_path, mapping, parts):
  mapping_path, coco, image_dir = _distractor_fixture(tmp_path, mapping)
  with pytest.raises(DataError) as err:
    ccneg.load_distractor_paths(mapping_path, coco, image_dir)
  _assert_names(err, mapping_path, *parts)


# --------------------------------------------------------------------------- COCO negation


def _coco_negation(tmp_path):
  image_dir = tmp_path / "train2014"
  for name in ("COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg"):
    _jpeg(image_dir / name)
  data = {
    "info": {},
    "images": [
      {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 8, "width": 8},
      {"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "height": 8, "width": 8},
    ],
    "annotations": [
      {
        "id": 1,
        "image_id": 25,
        "caption": "A giraffe eating.",
        "updated_caption": "A giraffe eating, with no people around.",
      },
      {
        "id": 2,
        "image_id": 9,
        "caption": "A plate of food.",
        "updated_caption": "A plate of food without a fork.",
      },
      {"id": 3, "image_id": 9, "caption": "Lunch box.", "updated_caption": "Lunch, no box."},
    ],
  }
  return data, image_dir


def test_coco_negation_round_trip(tmp_path):
  data, image_dir = _coco_negation(tmp_path)
  path = _write_json(tmp_path / "negationclip_captions.json", data)
  records = load_coco_negation(path, image_dir)
  assert records[0] == AbsenceRecord(
    str(image_dir / "COCO_train2014_000000000025.jpg"),
    "A giraffe eating.",
    "A giraffe eating, with no people around.",
  )
  assert [r.image_path for r in records[1:]] == [
    str(image_dir / "COCO_train2014_000000000009.jpg")
  ] * 2


@pytest.mark.parametrize(
  "field, value, parts",
  [
    ("image_id", 77, ["record 1", "'image_id'", "unknown image_id 77"]),
    ("caption", "", ["record 1", "'caption'", "empty string"]),
    ("updated_caption", None, ["record 1", "'updated_caption'", "expected a string"]),
    ("updated_caption", KeyError, ["record 1", "'updated_caption'", "missing key"]),
  ],
)
def test_coco_negation_malformed(tmp_path, field, value, parts):
  data, image_dir = _coco_negation(tmp_path)
  if value is KeyError:
    del data["annotations"][1][field]
  else:
    data["annotations"][1][field] = value
  path = _write_json(tmp_path / "captions.json", data)
  with pytest.raises(DataError) as err:
    load_coco_negation(path, image_dir)
  _assert_names(err, path, *parts)


def test_coco_negation_bad_images_table(tmp_path):
  data, image_dir = _coco_negation(tmp_path)
  data["images"][1]["id"] = 9
  path = _write_json(tmp_path / "captions.json", data)
  with pytest.raises(DataError) as err:
    load_coco_negation(path, image_dir)
  _assert_names(err, path, "record 1", "'images.id'", "duplicate image id 9")
  del data["images"]
  _write_json(path, data)
  with pytest.raises(DataError) as err:
    load_coco_negation(path, image_dir)
  _assert_names(err, path, "'images'", "missing key")
  with open(path, "w") as f:
    f.write('{"images": [')
  with pytest.raises(DataError, match="invalid JSON"):
    load_coco_negation(path, image_dir)


# --------------------------------------------------------------------------- NegRefCOCOg


def _negref(tmp_path):
  image_dir = tmp_path / "train2014"
  _jpeg(image_dir / "COCO_train2014_000000000009.jpg")
  entries = [
    {
      "image": "COCO_train2014_000000000009.jpg",
      "phrase": "the bowl without broccoli",
      "ref_bbox": [1, 2.5, 3, 4],
      "bbox_list": [[0, 0, 2, 2], [1.0, 2.5, 3.0, 4.0]],
    },
    {
      "image": "COCO_train2014_000000000009.jpg",
      "phrase": "the plate that is not empty",
      "ref_bbox": [0, 0, 2, 2],
      "bbox_list": [[0, 0, 2, 2]],
    },
  ]
  return entries, image_dir


def test_negrefcocog_round_trip(tmp_path):
  entries, image_dir = _negref(tmp_path)
  path = _write_json(tmp_path / "negrefcocog.json", entries)
  records = load_negrefcocog(path, image_dir)
  assert len(records) == 2
  r = records[0]
  assert r.image_path == str(image_dir / "COCO_train2014_000000000009.jpg")
  assert r.phrase == "the bowl without broccoli"
  assert r.ref_bbox == (1.0, 2.5, 3.0, 4.0)
  assert r.bbox_list == ((0.0, 0.0, 2.0, 2.0), (1.0, 2.5, 3.0, 4.0))
  assert r.ref_index == 1 and records[1].ref_index == 0


@pytest.mark.parametrize(
  "field, value, parts",
  [
    ("ref_bbox", [5, 5, 1, 1], ["record 1", "'ref_bbox'", "not one of bbox_list"]),
    ("ref_bbox", [0, 0, 0, 2], ["record 1", "'ref_bbox'", "must be > 0"]),
    ("ref_bbox", [0, 0, 2], ["record 1", "'ref_bbox'", "4 finite numbers"]),
    ("bbox_list", [[0, 0, 2, 2], [0, 0, True, 2]], ["record 1", "'bbox_list[1]'", "4 finite"]),
    ("bbox_list", [[0, 0, 2, float("nan")]], ["record 1", "'bbox_list[0]'", "4 finite"]),
    ("phrase", "", ["record 1", "'phrase'", "empty string"]),
    ("image", KeyError, ["record 1", "'image'", "missing key"]),
  ],
)
def test_negrefcocog_malformed(tmp_path, field, value, parts):
  entries, image_dir = _negref(tmp_path)
  if value is KeyError:
    del entries[1][field]
  else:
    entries[1][field] = value
  path = _write_json(tmp_path / "negrefcocog.json", entries)
  with pytest.raises(DataError) as err:
    load_negrefcocog(path, image_dir)
  _assert_names(err, path, *parts)


# --------------------------------------------------------------------------- Karpathy


def _sentences(*raws):
  return [{"raw": r, "tokens": r.lower().split(), "sentid": k} for k, r in enumerate(raws)]


def test_karpathy_coco_layout(tmp_path):
  root = tmp_path / "coco"
  _jpeg(root / "val2014" / "COCO_val2014_000000000042.jpg")
  _jpeg(root / "val2014" / "COCO_val2014_000000000073.jpg")
  data = {
    "dataset": "coco",
    "images": [
      {
        "filepath": "val2014",
        "filename": "COCO_val2014_000000000042.jpg",
        "split": "test",
        "sentences": _sentences("a", "b", "c", "d", "e", "f"),
      },
      {
        "filepath": "train2014",
        "filename": "COCO_train2014_000000000001.jpg",
        "split": "train",
        "sentences": _sentences("t"),
      },
      {
        "filepath": "val2014",
        "filename": "COCO_val2014_000000000073.jpg",
        "split": "test",
        "sentences": _sentences("g", "h"),
      },
      {
        "filepath": "val2014",
        "filename": "COCO_val2014_000000000099.jpg",
        "split": "val",
        "sentences": _sentences("v"),
      },
    ],
  }
  path = _write_json(tmp_path / "dataset_coco.json", data)
  rs = load_karpathy(path, root)
  assert rs.image_paths == (
    str(root / "val2014/COCO_val2014_000000000042.jpg"),
    str(root / "val2014/COCO_val2014_000000000073.jpg"),
  )
  assert rs.captions == tuple("abcdefgh")
  assert rs.caption_to_image == (0,) * 6 + (1,) * 2
  assert rs.image_to_captions == ((0, 1, 2, 3, 4, 5), (6, 7))
  five = load_karpathy(path, root, max_captions_per_image=5)
  assert five.captions == tuple("abcdegh")
  # The val image does not exist: the error names its index in images[].
  with pytest.raises(DataError) as err:
    load_karpathy(path, root, split="val")
  _assert_names(err, path, "1 of 1 image paths do not exist", "record 3:")


def test_karpathy_flickr_layout_without_filepath(tmp_path):
  root = tmp_path / "flickr30k-images"
  _jpeg(root / "1000092795.jpg")
  data = {
    "dataset": "flickr30k",
    "images": [{"filename": "1000092795.jpg", "split": "test", "sentences": _sentences("x", "y")}],
  }
  path = _write_json(tmp_path / "dataset_flickr30k.json", data)
  rs = load_karpathy(path, root)
  assert rs.image_paths == (str(root / "1000092795.jpg"),)
  assert rs.captions == ("x", "y")


def test_karpathy_malformed(tmp_path):
  images = [
    {"filename": "a.jpg", "split": "test", "sentences": _sentences("x")},
    {"filename": "b.jpg", "split": "test", "sentences": [{"tokens": []}]},
  ]
  path = _write_json(tmp_path / "dataset_flickr30k.json", {"images": images})
  with pytest.raises(DataError) as err:
    load_karpathy(path, tmp_path, check_images=False)
  _assert_names(err, path, "record 1", "'sentences[0].raw'", "missing key")
  images[1] = {"filename": "b.jpg", "split": "testing", "sentences": _sentences("x")}
  _write_json(path, {"images": images})
  with pytest.raises(DataError) as err:
    load_karpathy(path, tmp_path, check_images=False)
  _assert_names(err, path, "record 1", "'split'", "unknown split 'testing'")
  _write_json(path, {"images": images[:1]})
  with pytest.raises(DataError, match="no images in split 'val'"):
    load_karpathy(path, tmp_path, split="val", check_images=False)
  with pytest.raises(ValueError, match="split must be one of"):
    load_karpathy(path, tmp_path, split="dev")


# --------------------------------------------------------------------------- NegBench


def test_negbench_mcq_round_trip(tmp_path):
  root = tmp_path / "images"
  rel = _jpeg(root / "val2017" / "000000397133.jpg")
  absolute = _jpeg(tmp_path / "other" / "x.jpg")
  path = _write_csv(
    tmp_path / "COCO_val_mcq_llama3.1_rephrased.csv",
    NEGBENCH_MCQ_HEADER,
    [
      [
        "val2017/000000397133.jpg",
        "2",
        "A dog, no cat.",
        "A cat.",
        "No dog, a cat.",
        "A bird.",
        "hybrid",
      ],
      [absolute, "0", "No person.", "A person.", "A car.", "A bus.", "negative"],
    ],
  )
  records = load_negbench_mcq(path, root)
  assert records[0] == McqRecord(
    rel, ("A dog, no cat.", "A cat.", "No dog, a cat.", "A bird."), 2, "hybrid"
  )
  assert records[1].image_path == absolute
  assert records[1].correct == 0 and records[1].template == "negative"


@pytest.mark.parametrize(
  "column, value, parts",
  [
    ("correct_answer", "4", ["record 1", "'correct_answer'", "integer 0-3"]),
    ("correct_answer", "1.0", ["record 1", "'correct_answer'", "integer 0-3"]),
    ("caption_2", " ", ["record 1", "'caption_2'", "empty string"]),
    ("image_path", "", ["record 1", "'image_path'", "empty string"]),
  ],
)
def test_negbench_mcq_malformed(tmp_path, column, value, parts):
  row = {
    "image_path": "a.jpg",
    "correct_answer": "1",
    "caption_0": "a",
    "caption_1": "b",
    "caption_2": "c",
    "caption_3": "d",
    "correct_answer_template": "positive",
  }
  bad = dict(row, **{column: value})
  path = _write_csv(
    tmp_path / "mcq.csv", NEGBENCH_MCQ_HEADER, [list(row.values()), list(bad.values())]
  )
  with pytest.raises(DataError) as err:
    load_negbench_mcq(path, tmp_path, check_images=False)
  _assert_names(err, path, *parts)


def test_negbench_mcq_bad_header_and_short_row(tmp_path):
  path = _write_csv(
    tmp_path / "mcq.csv", NEGBENCH_MCQ_HEADER[:-1], [["a.jpg", "0", "a", "b", "c", "d"]]
  )
  with pytest.raises(DataError) as err:
    load_negbench_mcq(path, tmp_path, check_images=False)
  _assert_names(err, path, "'correct_answer_template'", "missing columns")
  path = _write_csv(tmp_path / "mcq.csv", NEGBENCH_MCQ_HEADER, [["a.jpg", "0", "a", "b"]])
  with pytest.raises(DataError) as err:
    load_negbench_mcq(path, tmp_path, check_images=False)
  _assert_names(err, path, "record 0", "number of fields")


def test_negbench_retrieval_round_trip(tmp_path):
  root = tmp_path / "images"
  a, b = _jpeg(root / "a.jpg"), _jpeg(root / "b.jpg")
  path = _write_csv(
    tmp_path / "COCO_val_retrieval.csv",
    ["filepath", "captions"],
    [["a.jpg", repr(["A dog on grass.", "No cat, just a dog."])], [b, "['A bus.']"]],
  )
  rs = load_negbench_retrieval(path, root)
  assert rs.image_paths == (a, b)
  assert rs.captions == ("A dog on grass.", "No cat, just a dog.", "A bus.")
  assert rs.caption_to_image == (0, 0, 1)


@pytest.mark.parametrize(
  "captions, parts",
  [
    ("__import__('os').system('touch {sentinel}')", ["not a Python list literal"]),
    ("['ok', __import__('os').system('touch {sentinel}')]", ["not a Python list literal"]),
    ("('a tuple', 'of str')", ["non-empty list of strings"]),
    ("[]", ["non-empty list of strings"]),
    ("'just a string'", ["non-empty list of strings"]),
    ("['fine', 3]", ["'captions[1]'", "expected a string"]),
    ("['fine', ''", ["not a Python list literal"]),
  ],
)
def test_negbench_retrieval_rejects_bad_captions(tmp_path, captions, parts):
  sentinel = tmp_path / "executed"
  path = _write_csv(
    tmp_path / "retrieval.csv",
    ["filepath", "captions"],
    [["a.jpg", "['ok']"], ["b.jpg", captions.format(sentinel=sentinel)]],
  )
  with pytest.raises(DataError) as err:
    load_negbench_retrieval(path, tmp_path, check_images=False)
  _assert_names(err, path, "record 1", *parts)
  assert not sentinel.exists()


# --------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tfds_tiny(tmp_path_factory):
  """A 3-example caption dataset built offline into a temporary data_dir."""
  tfds = pytest.importorskip("tensorflow_datasets")
  tfds.disable_progress_bar()

  class NegclipTinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
            "label": tfds.features.Text(),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        yield (
          i,
          {
            "image": np.full((8, 8, 3), 10 * i, np.uint8),
            "label": "x",
            "captions": {"text": [f"cap {i} a", f"cap {i}, no b"]},
          },
        )

  data_dir = tmp_path_factory.mktemp("tfds")
  NegclipTinyCaptions(data_dir=str(data_dir)).download_and_prepare()
  return "negclip_tiny_captions", str(data_dir)


def test_tfds_reads_prepared_dataset(tfds_tiny):
  from negclip_jax.data.tfds_source import load_tfds_captions

  name, data_dir = tfds_tiny
  examples = list(
    load_tfds_captions(name, "test", data_dir=data_dir, caption_key=("captions", "text"))
  )
  assert len(examples) == 3
  by_value = {int(image[0, 0, 0]): (image, caps) for image, caps in examples}
  assert sorted(by_value) == [0, 10, 20]
  image, caps = by_value[10]
  assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
  assert caps == ["cap 1 a", "cap 1, no b"]
  scalar = next(load_tfds_captions(name, "test", data_dir=data_dir, caption_key="label"))
  assert scalar[1] == ["x"]


def test_tfds_errors(tfds_tiny, tmp_path):
  from negclip_jax.data.tfds_source import load_tfds_captions

  name, data_dir = tfds_tiny
  with pytest.raises(DataError) as err:
    load_tfds_captions(name, "test", data_dir=str(tmp_path))
  _assert_names(err, str(tmp_path), "not prepared", "1.0.0", f"tfds build {name} --data_dir")
  with pytest.raises(DataError, match="neither a registered TFDS dataset"):
    load_tfds_captions("negclip_no_such_dataset", data_dir=str(tmp_path))
  with pytest.raises(DataError, match="cannot be loaded at version 9.9.9"):
    load_tfds_captions(f"{name}:9.9.9", data_dir=data_dir)
  with pytest.raises(DataError, match="does not exist"):
    load_tfds_captions(name, data_dir=str(tmp_path / "missing"))
  with pytest.raises(DataError) as err:
    load_tfds_captions(name, "test", data_dir=data_dir, caption_key=("captions", "txt"))
  _assert_names(err, data_dir, "'captions/txt'", "available at this level: ['text']")
  with pytest.raises(DataError, match="expected a Text feature"):
    load_tfds_captions(name, "test", data_dir=data_dir, caption_key="image")
  with pytest.raises(DataError, match="cannot read split 'validation'"):
    load_tfds_captions(name, "validation", data_dir=data_dir)


@pytest.mark.parametrize(
  "name, load",
  [
    ("captions.json", lambda p: load_coco_negation(p, p.parent)),
    ("ccneg.jsonl", lambda p: load_ccneg(p, p.parent, split="all", eval_size=0)),
    ("mcq.csv", lambda p: load_negbench_mcq(p, p.parent)),
  ],
)
def test_non_utf8_files_are_one_line_naming_the_file(tmp_path, name, load):
  path = tmp_path / name
  path.write_bytes(b'{"caption": "a cat \xff\xfe"}\n')
  with pytest.raises(
    DataError, match=r"not UTF-8 text( on line 1)? \(invalid start byte: b'\\xff'\)"
  ) as e:
    load(path)
  assert e.value.file == str(path) and "\n" not in str(e.value)
