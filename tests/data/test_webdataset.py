"""webdataset shards: brace patterns, indexing, text keys, member paths, bad samples."""

import io
import json

import numpy as np
import pytest
from helpers import small_pipeline, write_wds_shards
from PIL import Image

from negclip_jax import storage
from negclip_jax.data import webdataset as wds
from negclip_jax.data.records import BadRecords, DataError
from negclip_jax.model.preprocess import preprocess_image


def test_brace_patterns():
  assert wds.shards("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
  assert wds.shards("{a,b}/x-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]
  assert wds.shards("one.tar") == ["one.tar"]
  with pytest.raises(ValueError, match="bad range"):
    wds.shards("s/{5..2}.tar")


def test_records_hold_texts_by_key_and_images_as_member_ranges(tmp_path):
  images = write_wds_shards(tmp_path)
  pattern = str(tmp_path / "shard-{000..001}.tar")
  records = wds.load_presence(pattern, caption_key="txt", negated_key="negated")
  assert [r.caption for r in records] == [f"a photo {k}" for k in images]
  assert [r.negated for r in records] == [f"no photo {k}" for k in images]
  assert [r.index for r in records] == list(range(6))
  absence = wds.load_absence(pattern, updated_key="updated")
  assert [r.updated for r in absence] == [f"nothing but {k}" for k in images]
  for record, (key, data) in zip(records, images.items()):
    assert record.image_path.startswith(str(tmp_path / "shard-")) and record.image_path.endswith(
      f"/{key}.png"
    )
    with storage.open(record.image_path, "rb") as f:
      assert f.read() == data
    assert storage.isfile(record.image_path) and storage.file_stamp(record.image_path)
    expected = preprocess_image(Image.open(io.BytesIO(data)), 32)
    assert preprocess_image(record.image_path, 32).tobytes() == expected.tobytes()
  assert storage.files_exist([records[0].image_path, str(tmp_path / "no.tar#0+1/x.png")]) == [
    True,
    False,
  ]


def test_bad_samples_raise_or_are_skipped(tmp_path):
  write_wds_shards(tmp_path, bad={(0, 1): "noimage", (1, 2): "nonegated"})
  pattern = str(tmp_path / "shard-{000..001}.tar")
  with pytest.raises(DataError, match=r"shard-000\.tar, record 1, key 'image'.*no image"):
    wds.load_presence(pattern)
  bad = BadRecords("skip")
  records = wds.load_presence(pattern, bad=bad)
  assert [r.index for r in records] == [0, 2, 3, 4]
  assert [(e.file.rsplit("/", 1)[1], e.index, e.key) for e in bad.skipped] == [
    ("shard-000.tar", 1, "image"),
    ("shard-001.tar", 2, "negated"),
  ]
  with pytest.raises(DataError, match=r"shard-007\.tar: shard not found"):
    wds.load_presence(str(tmp_path / "shard-007.tar"))


def test_training_reads_shards_with_and_without_the_cache_and_skips_bad_samples(tmp_path):
  from helpers import tiny_config

  from negclip_jax.train import pipeline, trainer

  write_wds_shards(tmp_path, samples_per_shard=6, bad={(0, 2): "undecodable", (1, 0): "noimage"})
  pattern = "wds:" + str(tmp_path / "shard-{000..001}.tar")
  runs = {}
  for cache in (True,):  # without the cache, batches read members: the resume check below
    c = tiny_config(
      **{
        "data.presence": pattern,
        "data.absence": pattern,
        "data.on_error": "skip",
        "data.image_cache": cache,
        "data.read_threads": 4,
        "total_steps": 2,
        "batch_size": 4,
      }
    )
    runs[cache] = trainer.train(c, tmp_path / f"run_{cache}")
    assert runs[cache]["step"] == 2 and np.isfinite(runs[cache]["last_metrics"]["total"])
    rows = [
      json.loads(x) for x in (tmp_path / f"run_{cache}/skipped.jsonl").read_text().splitlines()
    ]
    found = {(r["file"].rsplit("/", 1)[-1], r["record"], r["key"]) for r in rows}
    assert ("shard-001.tar", 0, "image") in found  # no image member: position in its shard
    assert any(
      r["record"] == 2 and r["key"] == "image" and "0000002.png" in r["reason"] for r in rows
    )
  # Exact resume on a shard table: batches from step 3 on equal an uninterrupted run's.
  bad = BadRecords("skip")
  presence = pipeline.presence_table(
    wds.load_presence(pattern[4:], bad=bad), on_error=bad, decode=True, image_size=32
  )
  assert len(presence) == 10 and [(e.index, e.key) for e in bad.skipped] == [
    (0, "image"),
    (2, "image"),
  ]
  assert "0000002.png" in bad.skipped[1].reason
  absence = pipeline.absence_table(
    wds.load_absence(pattern[4:], bad=BadRecords("skip")),
    on_error="skip",
    decode=True,
    image_size=32,
  )
  make = lambda start: small_pipeline(presence, absence, seed=5, start_step=start, read_threads=3)
  straight, resumed = list(make(0))[3:], list(make(3))
  assert len(resumed) == 3
  for a, b in zip(straight, resumed, strict=True):
    assert all(np.array_equal(a[k], b[k]) for k in a)
