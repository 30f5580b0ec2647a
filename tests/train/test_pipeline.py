"""Training input pipeline: sampler, host sharding, resume, batch layout, data errors."""

import logging

import numpy as np
import pytest
from helpers import small_pipeline

from negclip_jax.data import parallel_read
from negclip_jax.data.records import DataError, PresenceRecord
from negclip_jax.model.preprocess import preprocess_image
from negclip_jax.model.tokenizer import ClipTokenizer
from negclip_jax.train import pipeline as pl

SIZE = 8  # image side, px


@pytest.fixture(scope="module")
def tokenizer():
  return ClipTokenizer()


def _tables(n_presence, n_absence, seed=0):
  rng = np.random.default_rng(seed)
  image = lambda n: rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
  presence = pl.PresenceTable(
    image(n_presence),
    [f"a photo of {i} red circles" for i in range(n_presence)],
    [f"{i} circles but no square" for i in range(n_presence)],
  )
  absence = pl.AbsenceTable(
    image(n_absence),
    [f"{i} blue squares" for i in range(n_absence)],
    [f"{i} blue squares and no cross" for i in range(n_absence)],
  )
  return presence, absence


def _pipeline(tokenizer, presence, absence, **kw):
  return small_pipeline(presence, absence, tokenizer=tokenizer, image_size=SIZE, **kw)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert np.array_equal(a[k], b[k]), k


def test_sampler_is_a_pure_function_of_the_step(tokenizer):
  pipe = _pipeline(tokenizer, *_tables(10, 10))
  forward = [pipe.global_indices(s) for s in range(7)]
  pl.pass_permutation.cache_clear()
  other = _pipeline(tokenizer, *_tables(10, 10))
  for s in (6, 2, 0, 5, 2, 1, 3, 4):
    for name in ("presence", "absence"):
      np.testing.assert_array_equal(other.global_indices(s)[name], forward[s][name])


def test_each_epoch_is_a_permutation():
  n, b = 10, 3  # 3 steps per epoch, one example dropped per epoch
  for epoch in range(3):
    seen = np.concatenate([pl.step_indices(epoch * 3 + s, n, b, 0, 0) for s in range(3)])
    perm = pl.pass_permutation(n, 0, 0, epoch, 0)
    np.testing.assert_array_equal(seen, perm[:9])
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
  first = pl.pass_permutation(n, 0, 0, 0, 0)
  for other in [(0, 0, 1, 0), (0, 1, 0, 0), (0, 0, 0, 1), (1, 0, 0, 0)]:
    assert not np.array_equal(first, pl.pass_permutation(n, *other))


def test_two_processes_split_each_batch_and_cover_the_epoch(tokenizer):
  presence, absence = _tables(13, 16)
  long_caption = " ".join(["red"] * 30)  # 32 tokens: only this example needs bucket 32
  presence = pl.PresenceTable(
    presence.images, [long_caption] + presence.captions[1:], presence.negated
  )
  pipes = [
    _pipeline(tokenizer, presence, absence, process_index=p, process_count=2) for p in range(2)
  ]
  assert pipes[0].steps_per_epoch == {"presence": 3, "absence": 4}
  seen = []
  for step in range(3):
    glob = pipes[0].global_indices(step)["presence"]
    halves = [p.host_indices(step)["presence"] for p in pipes]
    np.testing.assert_array_equal(np.concatenate(halves), glob)
    assert not set(halves[0]) & set(halves[1])
    seen.extend(np.concatenate(halves))
    widths = {p.build_host_batch(step)["presence_caption_ids"].shape[-1] for p in pipes}
    assert widths == ({32} if 0 in glob else {16})  # one bucket per step on every host
  assert sorted(seen) == sorted(pl.pass_permutation(13, 3, 0, 0, 0)[:12])
  assert len(set(seen)) == 12


def test_resume_gives_the_same_batches_through_tf_data(tokenizer):
  tables = _tables(9, 14)
  full = list(_pipeline(tokenizer, *tables))
  assert [int(b["step"][0]) for b in full] == list(range(6))
  for start, batch in enumerate(full):
    _assert_batches_equal(batch, _pipeline(tokenizer, *tables).build_host_batch(start))
  resumed = _pipeline(tokenizer, *tables, start_step=3)
  for a, b in zip(list(resumed), full[3:], strict=True):
    _assert_batches_equal(a, b)
  assert resumed.state_dict()["next_step"] == 6


def test_state_dict_round_trip(tokenizer):
  tables = _tables(9, 14)
  pipe = _pipeline(tokenizer, *tables)
  it = iter(pipe)
  next(it), next(it)
  state = pipe.state_dict()
  assert state == {
    "next_step": 2,
    "seed": 3,
    "global_batch": 4,
    "presence_size": 9,
    "absence_size": 14,
  }
  restored = _pipeline(tokenizer, *tables)
  restored.load_state_dict(state)
  _assert_batches_equal(next(iter(restored)), next(it))
  with pytest.raises(ValueError, match="seed"):
    _pipeline(tokenizer, *tables, seed=4).load_state_dict(state)


def test_streams_restart_as_the_original_two_loaders(tokenizer):
  """The original loop, literally: per epoch of max(len(loader1), len(loader2)) steps both
  iterators are new (reshuffled); a StopIteration restarts the shorter one."""
  sizes, batch, seed = {"presence": 8, "absence": 22}, 4, 3  # passes of 2 and 5 steps
  pipe = _pipeline(tokenizer, *_tables(sizes["presence"], sizes["absence"]))
  assert pipe.steps_per_epoch == {"presence": 2, "absence": 5} and pipe.epoch_steps == 5
  step = 0
  for epoch in range(3):
    passes = {name: 0 for name in sizes}
    positions = {name: 0 for name in sizes}  # next batch within the current pass ("iterator")
    for _ in range(5):
      got = pipe.global_indices(step)
      for name, n in sizes.items():
        if positions[name] == n // batch:  # StopIteration: iter(loader) again
          passes[name], positions[name] = passes[name] + 1, 0
        perm = pl.pass_permutation(n, seed, pl.STREAMS[name], epoch, passes[name])
        np.testing.assert_array_equal(
          got[name], perm[positions[name] * batch : (positions[name] + 1) * batch]
        )
        positions[name] += 1
      step += 1
  # Epoch 1 restarts the presence stream although its third pass was half done.
  np.testing.assert_array_equal(
    pipe.global_indices(5)["presence"], pl.pass_permutation(8, seed, 0, 1, 0)[:4]
  )


def test_epoch_steps_drop_the_remainder_of_each_stream():
  assert pl.epoch_steps([1000, 300], 128) == 7  # max(1000 // 128, 300 // 128)
  assert pl.epoch_steps([127 + 128, 128], 128) == 1
  with pytest.raises(ValueError, match="fewer than global_batch"):
    pl.epoch_steps([127, 1000], 128)
  with pytest.raises(ValueError, match="shorter than stream"):
    pl.step_indices(0, 100, 10, 0, 0, steps_per_epoch=5)


@pytest.mark.parametrize("devices", [1, 2])
def test_batch_layout(tokenizer, devices):
  presence, absence = _tables(8, 8)
  pipe = _pipeline(tokenizer, presence, absence, local_devices=devices)
  full = _pipeline(tokenizer, presence, absence, local_devices=devices, truncate_text=False)
  batch, untruncated = pipe.build_host_batch(1), full.build_host_batch(1)
  keys = (
    "presence_caption_ids",
    "presence_negated_ids",
    "absence_caption_ids",
    "absence_updated_ids",
  )
  length = batch[keys[0]].shape[-1]
  assert length == 16  # every text is short; the context is 77
  for k in keys:
    assert batch[k].shape == (devices, 4 // devices, length) and batch[k].dtype == np.int32
    assert untruncated[k].shape == (devices, 4 // devices, 77)
    np.testing.assert_array_equal(batch[k], untruncated[k][..., :length])
    assert not untruncated[k][..., length:].any()
  idx = pipe.host_indices(1)
  for name, table in (("presence", presence), ("absence", absence)):
    pixels = batch[f"{name}_pixels"]
    assert pixels.shape == (devices, 4 // devices, SIZE, SIZE, 3) and pixels.dtype == np.float32
    want = np.stack([preprocess_image(table.images[i], SIZE) for i in idx[name]])
    np.testing.assert_array_equal(pixels.reshape(want.shape), want)
  np.testing.assert_array_equal(batch["step"], np.full(devices, 1, np.int32))
  assert set(batch) == {*keys, "presence_pixels", "absence_pixels", "step"}


def test_image_embeddings_replace_pixels(tokenizer):
  presence, absence = _tables(8, 8)
  emb = np.arange(8 * 5, dtype=np.float32).reshape(8, 5)
  pipe = _pipeline(tokenizer, presence.with_image_emb(image_emb=emb), absence, local_devices=2)
  batch = pipe.build_host_batch(0)
  assert "presence_pixels" not in batch and "absence_pixels" in batch
  np.testing.assert_array_equal(
    batch["presence_image_emb"].reshape(4, 5), emb[pipe.host_indices(0)["presence"]]
  )


def test_batch_size_errors(tokenizer):
  tables = _tables(8, 8)
  with pytest.raises(ValueError, match="divisible"):
    _pipeline(tokenizer, *tables, global_batch=6, local_devices=4)
  with pytest.raises(ValueError, match="fewer than global_batch"):
    _pipeline(tokenizer, *tables, global_batch=12, local_devices=1)


def test_empty_text_raises_with_index_and_field():
  presence, _ = _tables(4, 4)
  negated = list(presence.negated)
  negated[2] = "  "
  with pytest.raises(DataError, match=r"record 2, key 'negated'") as e:
    pl.validate(pl.PresenceTable(presence.images, presence.captions, negated))
  assert (e.value.index, e.value.key) == (2, "negated")


def test_skip_mode_drops_and_reports(caplog):
  presence, _ = _tables(5, 4)
  captions = list(presence.captions)
  captions[1] = ""
  captions[3] = "\n"
  with caplog.at_level(logging.WARNING):
    table = pl.validate(pl.PresenceTable(presence.images, captions, presence.negated), "skip")
  assert len(table) == 3 and sorted(table.dropped) == [1, 3]
  np.testing.assert_array_equal(table.record_index, [0, 2, 4])
  np.testing.assert_array_equal(table.images, presence.images[[0, 2, 4]])
  assert "skipping: presence, record 1, key 'caption'" in caplog.text


def _write_images(tmp_path, n):
  from PIL import Image

  paths = []
  for i in range(n):
    path = tmp_path / f"{i}.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 40 * i, np.uint8)).save(path)
    paths.append(str(path))
  return paths


def test_missing_image_file(tmp_path):
  paths = _write_images(tmp_path, 4)
  paths[1] = str(tmp_path / "missing.jpg")
  records = [PresenceRecord(p, f"caption {i}", f"not {i}") for i, p in enumerate(paths)]
  with pytest.raises(DataError, match=r"record 1, key 'image_path'.*missing\.jpg"):
    pl.presence_table(records)
  table = pl.presence_table(records, on_error="skip")
  assert list(table.dropped) == [1] and table.images == [paths[0], paths[2], paths[3]]


def test_corrupt_image_raises_naming_path_and_record(tmp_path, tokenizer):
  paths = _write_images(tmp_path, 4)
  (tmp_path / "bad.jpg").write_bytes(b"not a jpeg at all")
  paths[2] = str(tmp_path / "bad.jpg")
  records = [PresenceRecord(p, f"caption {i}", f"not {i}") for i, p in enumerate(paths)]
  presence = pl.presence_table(records)  # the file exists: caught when it is decoded
  _, absence = _tables(4, 4)
  for threads in (1, 8):
    pipe = _pipeline(tokenizer, presence, absence, num_steps=2, read_threads=threads)
    with pytest.raises(DataError, match=r"bad\.jpg, record 2, key 'image'"):
      pipe.build_host_batch(0)
    with pytest.raises(DataError, match=r"bad\.jpg, record 2"):
      list(pipe)


def test_batches_read_by_threads_equal_serial_ones(tmp_path, tokenizer, monkeypatch):
  """Serial, 8 reader threads, and 8 threads handing the decoding to 2 processes."""
  from PIL import Image

  paths = [str(tmp_path / f"{i}.png") for i in range(12)]
  for i, path in enumerate(paths):
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (11, 9, 3), np.uint8)).save(path)
  records = [PresenceRecord(p, f"caption {i}", f"not {i}") for i, p in enumerate(paths)]
  presence = pl.presence_table(records)
  _, absence = _tables(12, 12)
  serial, threaded = (
    list(_pipeline(tokenizer, presence, absence, num_steps=3, read_threads=t)) for t in (1, 8)
  )
  monkeypatch.setattr(parallel_read, "_decode_processes", 2)
  in_processes = list(_pipeline(tokenizer, presence, absence, num_steps=3, read_threads=8))
  for a, b, c in zip(serial, threaded, in_processes, strict=True):
    _assert_batches_equal(a, b)
    _assert_batches_equal(a, c)
  assert serial[0]["presence_pixels"].shape == (1, 4, SIZE, SIZE, 3)


def test_distractors_give_their_own_batch_keys(tokenizer):
  presence, absence = _tables(8, 8)
  distractors = 255 - presence.images
  presence = pl.PresenceTable(
    presence.images, presence.captions, presence.negated, distractors=distractors
  )
  pipe = _pipeline(tokenizer, presence, absence, local_devices=2)
  batch, idx = pipe.build_host_batch(2), pipe.host_indices(2)["presence"]
  want = np.stack([preprocess_image(distractors[i], SIZE) for i in idx])
  np.testing.assert_array_equal(batch["presence_distractor_pixels"].reshape(want.shape), want)
  assert not np.array_equal(batch["presence_pixels"], batch["presence_distractor_pixels"])
  # Through tf.data, with the embeddings of both columns.
  image_emb = np.arange(40, dtype=np.float32).reshape(8, 5)
  pipe = _pipeline(
    tokenizer, presence.with_image_emb(image_emb=image_emb, distractor_emb=-image_emb), absence
  )
  batch, idx = next(iter(pipe)), pipe.host_indices(0)["presence"]
  assert "presence_distractor_pixels" not in batch
  np.testing.assert_array_equal(batch["presence_distractor_image_emb"][0], -image_emb[idx])
  # Dropping an example drops its distractor too.
  table = pl.validate(
    pl.PresenceTable(
      presence.images, ["", *presence.captions[1:]], presence.negated, distractors=distractors
    ),
    "skip",
  )
  np.testing.assert_array_equal(table.distractors, distractors[1:])
  with pytest.raises(ValueError, match="7 distractors, 8 captions"):
    pl.PresenceTable(
      presence.images, presence.captions, presence.negated, distractors=distractors[:7]
    )


def test_negshapes_tables_need_generated_distractors():
  from negclip_jax.data import negshapes

  plain = negshapes.generate_pairs(4, seed=0, image_size=SIZE)
  with pytest.raises(ValueError, match=r"generate_pairs\(\.\.\., distractors=True\)"):
    pl.negshapes_tables(plain, distractors=True)
  presence, _ = pl.negshapes_tables(
    negshapes.generate_pairs(4, seed=0, image_size=SIZE, distractors=True), distractors=True
  )
  assert presence.distractors.shape == (4, SIZE, SIZE, 3)


def test_distractor_paths_are_checked(tmp_path, tokenizer):
  paths = _write_images(tmp_path, 4)
  records = [
    PresenceRecord(p, f"caption {i}", f"not {i}", distractor_path=paths[3 - i])
    for i, p in enumerate(paths)
  ]
  table = pl.presence_table(records)
  assert table.distractors == paths[::-1]
  records[2] = PresenceRecord(paths[2], "caption", "not", str(tmp_path / "gone.png"))
  with pytest.raises(DataError, match=r"record 2, key 'distractor_path'.*gone\.png"):
    pl.presence_table(records)
  records[2] = PresenceRecord(paths[2], "caption", "not")
  with pytest.raises(DataError, match=r"record 2, key 'distractor_path': no distractor"):
    pl.presence_table(records)
  (tmp_path / "bad.png").write_bytes(b"not a png")
  records[2] = PresenceRecord(paths[2], "caption", "not", str(tmp_path / "bad.png"))
  _, absence = _tables(4, 4)
  pipe = _pipeline(tokenizer, pl.presence_table(records), absence, num_steps=1)
  with pytest.raises(DataError, match=r"bad\.png, record 2, key 'distractor_image'"):
    pipe.build_host_batch(0)
