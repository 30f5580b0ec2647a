"""Frozen image-tower cache: exactness, hits and misses, bad images, train-step parity."""

import json
import os
import threading
import time

import jax
import numpy as np
import pytest
from flax import jax_utils
from jax.experimental import multihost_utils
from PIL import Image

from negclip_jax.data import negshapes, parallel_read
from negclip_jax.data.records import BadRecords, DataError
from negclip_jax.eval.embed import Embedder
from negclip_jax.model.clip import CLIP, get_config, init_params
from negclip_jax.model.tokenizer import ClipTokenizer
from negclip_jax.train import image_cache, optim, param_groups
from negclip_jax.train import pipeline as pl
from negclip_jax.train import step as train_step

SIZE = 32  # the tiny preset's image size


@pytest.fixture(scope="module")
def model():
  return CLIP(get_config("tiny"))


@pytest.fixture(scope="module")
def params(model):
  return init_params(model, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)


def _no_model(*args, **kwargs):
  raise AssertionError("the image tower ran on a cache hit")


def _perturbed(params, top, leaf_path):
  out = jax.tree_util.tree_map(lambda x: x, params)  # new containers, same leaves
  node = out[top]
  for key in leaf_path[:-1]:
    node = node[key]
  node[leaf_path[-1]] = node[leaf_path[-1]] + 1e-3
  return out


def test_cached_equals_uncached_and_second_call_hits(model, params, images, tmp_path, monkeypatch):
  plain, kept = image_cache.image_embeddings(model, params, images, SIZE)
  assert plain.shape == (5, 16) and plain.dtype == np.float32
  np.testing.assert_array_equal(kept, np.arange(5))
  first, _ = image_cache.image_embeddings(model, params, images, SIZE, cache_dir=str(tmp_path))
  monkeypatch.setattr(image_cache, "Embedder", _no_model)
  second, kept2 = image_cache.image_embeddings(model, params, images, SIZE, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(first, plain)
  np.testing.assert_array_equal(second, plain)
  np.testing.assert_array_equal(kept2, kept)
  (meta,) = [json.loads(p.read_text()) for p in tmp_path.glob("*/index.json")]
  assert (meta["num_images"], meta["num_kept"], meta["dim"], meta["dropped"]) == (5, 5, 16, {})
  assert meta["shards"] == [{"file": "shard-00000-of-00001.npy", "start": 0, "stop": 5}]
  assert not list(tmp_path.glob("*/*.tmp"))


def test_vision_weights_and_image_size_change_the_key(model, params, images, tmp_path, monkeypatch):
  key = image_cache.cache_key(model, params, images, SIZE)
  assert image_cache.cache_key(model, params, images, 64) != key
  assert image_cache.cache_key(model, params, images[::-1].copy(), SIZE) != key
  vision = _perturbed(params, "vision_model", ("encoder", "layers", "1", "mlp", "fc2", "bias"))
  assert image_cache.cache_key(model, vision, images, SIZE) != key
  projection = _perturbed(params, "visual_projection", ("kernel",))
  assert image_cache.cache_key(model, projection, images, SIZE) != key
  text = _perturbed(params, "text_projection", ("kernel",))
  assert image_cache.cache_key(model, text, images, SIZE) == key  # text weights don't matter

  image_cache.image_embeddings(model, params, images, SIZE, cache_dir=str(tmp_path))
  moved, _ = image_cache.image_embeddings(model, vision, images, SIZE, cache_dir=str(tmp_path))
  assert len(list(tmp_path.glob("*/index.json"))) == 2  # a miss wrote a second entry
  monkeypatch.setattr(image_cache, "Embedder", _no_model)
  again, _ = image_cache.image_embeddings(model, vision, images, SIZE, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(again, moved)


def test_unreadable_images_raise_or_are_skipped(model, params, tmp_path, monkeypatch):
  paths = []
  for i in range(4):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(np.full((40, SIZE, 3), 60 * i, np.uint8)).save(paths[-1])
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
  paths[1] = str(tmp_path / "bad.jpg")
  cache = str(tmp_path / "cache")
  with pytest.raises(DataError, match=r"bad\.jpg, record 1, key 'image'"):
    image_cache.image_embeddings(model, params, paths, SIZE, cache_dir=cache)
  assert not os.path.exists(cache)
  emb, kept = image_cache.image_embeddings(
    model, params, paths, SIZE, cache_dir=cache, on_error="skip"
  )
  np.testing.assert_array_equal(kept, [0, 2, 3])
  good, _ = image_cache.image_embeddings(model, params, [paths[i] for i in kept], SIZE)
  np.testing.assert_allclose(emb, good, rtol=1e-6, atol=1e-6)
  # A bad distractor drops its row too; both embeddings keep the surviving rows.
  table = pl.PresenceTable(
    paths, [f"c{i}" for i in range(4)], [f"n{i}" for i in range(4)], distractors=paths[::-1]
  )
  good_images = pl.PresenceTable(
    [paths[i] for i in (0, 2, 3, 0)], table.captions, table.negated, distractors=paths
  )
  with pytest.raises(DataError, match=r"bad\.jpg, record 1, key 'distractor_image'"):
    image_cache.embed_table(good_images, model, params, SIZE)
  embedded = image_cache.embed_table(table, model, params, SIZE, cache_dir=cache, on_error="skip")
  assert sorted(embedded.dropped) == [1, 2] and embedded.distractors == [paths[3], paths[0]]
  assert "distractor_image could not be loaded" in embedded.dropped[2]
  np.testing.assert_allclose(embedded.image_emb, good[[0, 2]], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(embedded.distractor_emb, good[[2, 0]], rtol=1e-6, atol=1e-6)
  monkeypatch.setattr(image_cache, "Embedder", _no_model)
  with pytest.raises(DataError, match=r"bad\.jpg, record 1"):  # the stored skip result
    image_cache.image_embeddings(model, params, paths, SIZE, cache_dir=cache)

  table = pl.PresenceTable(paths, [f"c{i}" for i in range(4)], [f"n{i}" for i in range(4)])
  embedded = image_cache.embed_table(table, model, params, SIZE, cache_dir=cache, on_error="skip")
  assert list(embedded.dropped) == [1] and embedded.images == [paths[0], paths[2], paths[3]]
  np.testing.assert_array_equal(embedded.image_emb, emb)


@pytest.mark.parametrize("decode_processes", [0, 2])
def test_parallel_reading_equals_serial_bitwise_and_keeps_the_bad_record_policy(
  model, params, tmp_path, decode_processes, monkeypatch
):
  """Reader threads that decode, or that hand decoding to processes: the same."""
  monkeypatch.setattr(parallel_read, "_decode_processes", decode_processes)
  paths = []
  for i in range(11):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 36, 3), np.uint8)).save(
      paths[-1]
    )
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
  paths[6] = str(tmp_path / "bad.jpg")
  run = lambda threads, **kw: image_cache.image_embeddings(
    model, params, paths, SIZE, batch_size=4, read_threads=threads, **kw
  )
  for threads in (1, 8):
    with pytest.raises(DataError, match=r"bad\.jpg, record 6, key 'image'"):
      run(threads)
  skipped = {}
  for threads in (1, 8):
    bad = BadRecords("skip")
    skipped[threads] = (*run(threads, on_error=bad), [str(e) for e in bad.skipped])
  serial, parallel = skipped[1], skipped[8]
  assert parallel[0].tobytes() == serial[0].tobytes()  # bitwise
  np.testing.assert_array_equal(parallel[1], serial[1])
  assert parallel[2] == serial[2] and len(serial[2]) == 1 and "record 6" in serial[2][0]


def test_embedder_reads_a_window_ahead_of_the_device_and_no_further(model, params, monkeypatch):
  started, seen = [], []
  images = np.random.default_rng(0).integers(0, 256, (20, SIZE, SIZE, 3), np.uint8)

  def load(image):
    started.append(1)
    return image.astype(np.float32) / 255

  apply = Embedder._apply

  def slow_apply(self, *args):
    time.sleep(0.3)  # the device is busy: the readers run ahead meanwhile
    seen.append(len(started))
    return apply(self, *args)

  monkeypatch.setattr(Embedder, "_apply", slow_apply)
  embedder = Embedder(model, params, batch_size=4, progress=False, read_threads=4)
  out = embedder.images(images, load)
  reads_at_each_batch = list(seen)
  serial = Embedder(model, params, batch_size=4, progress=False, read_threads=1).images(
    images, load
  )
  assert out.tobytes() == serial.tobytes()
  # While batch k (items 4k..4k+3) is embedded, the window (a batch + 2 x 4 threads = 12
  # items) past it has been read, nothing more.
  assert reads_at_each_batch == [16, 20, 20, 20, 20]


def test_embedder_readers_keep_reading_while_a_slow_image_holds_the_batch(model, params):
  """A slow object (a bucket's tail latency) must not idle the other readers: they go on
  reading the window past it (before: the window was one batch, so 4 threads read 4 items
  and then waited with it)."""
  lock, done, done_while_slow = threading.Lock(), [0], []
  images = np.random.default_rng(0).integers(0, 256, (24, SIZE, SIZE, 3), np.uint8)

  def load(i):
    if i == 0:
      time.sleep(0.5)
      done_while_slow.append(done[0])
    with lock:
      done[0] += 1
    return images[i].astype(np.float32) / 255

  embedder = Embedder(model, params, batch_size=4, progress=False, read_threads=4)
  embedder.images(list(range(24)), load)
  assert done_while_slow == [12]  # the window: one batch + 2 x 4 threads


@pytest.mark.parametrize("objective", ["omni_negclip", "conclip"])
def test_train_step_on_cached_embeddings_matches_pixels(model, params, tmp_path, objective):
  devices = jax.local_device_count()
  batch_size = 2 * devices
  distractors = objective == "conclip"
  data = negshapes.generate_pairs(
    max(8, batch_size), seed=0, image_size=SIZE, distractors=distractors
  )
  presence, absence = pl.negshapes_tables(data, distractors=distractors)
  embedded = [
    image_cache.embed_table(t, model, params, SIZE, cache_dir=str(tmp_path))
    for t in (presence, absence)
  ]
  # Both tables share the images; distractors are a second array.
  assert len(list(tmp_path.glob("*/index.json"))) == 1 + distractors
  args = dict(
    tokenizer=ClipTokenizer(),
    context_length=model.config.text.max_position_embeddings,
    global_batch=batch_size,
    seed=0,
    image_size=SIZE,
    num_steps=1,
  )
  pixel_batch = pl.TrainPipeline(presence, absence, **args).build_host_batch(0)
  emb_batch = pl.TrainPipeline(*embedded, **args).build_host_batch(0)
  assert "presence_pixels" in pixel_batch and "presence_image_emb" in emb_batch
  assert ("presence_distractor_image_emb" in emb_batch) == distractors

  labels = param_groups.label_params(params)
  tx = optim.make_optimizer(labels, learning_rate=1e-3, warmup_steps=0, total_steps=10)
  step = train_step.pmap_train_step(
    train_step.make_train_step(model, labels, tx, objective=objective)
  )
  state = train_step.create_train_state(params, tx)
  _, from_pixels = step(jax_utils.replicate(state), pixel_batch)
  _, from_cache = step(jax_utils.replicate(state), emb_batch)
  from_pixels, from_cache = jax.device_get((from_pixels, from_cache))
  assert from_pixels.keys() == from_cache.keys()
  for k in from_pixels:
    np.testing.assert_allclose(from_cache[k], from_pixels[k], rtol=1e-6, atol=1e-6, err_msg=k)


def _as_process(monkeypatch, p: int, count: int, plain: np.ndarray):
  """Runs the next calls as process p of `count`: the all-gather of feature blocks puts this
  process's block beside the other processes' rows of `plain`; hits and failures of the
  others are this one's hit and none."""
  monkeypatch.setattr(jax, "process_count", lambda: count)
  monkeypatch.setattr(jax, "process_index", lambda: p)
  per = -(-len(plain) // count)

  def allgather(x):
    x = np.asarray(x)
    if x.dtype == bool:
      return np.stack([x] * count)
    if x.dtype == np.int32:  # failure masks
      return np.stack([x if q == p else np.zeros_like(x) for q in range(count)])
    blocks = [np.zeros_like(x) for _ in range(count)]
    for q in range(count):
      rows = x if q == p else plain[q * per : (q + 1) * per]
      blocks[q][: len(rows)] = rows
    return np.stack(blocks)

  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)


def test_each_process_writes_and_reads_only_its_shard(model, params, images, tmp_path, monkeypatch):
  plain, _ = image_cache.image_embeddings(model, params, images, SIZE)
  cache = str(tmp_path)
  for p in (1, 0):  # process 0 writes the index after every shard (the barrier's order)
    with monkeypatch.context() as m:
      _as_process(m, p, 2, plain)
      emb, _ = image_cache.image_embeddings(model, params, images, SIZE, cache_dir=cache)
    np.testing.assert_allclose(emb, plain, rtol=1e-6, atol=1e-6)
  (entry,) = tmp_path.iterdir()
  index = json.loads((entry / "index.json").read_text())
  assert index["shards"] == [
    {"file": "shard-00000-of-00002.npy", "start": 0, "stop": 3},
    {"file": "shard-00001-of-00002.npy", "start": 3, "stop": 5},
  ]
  assert sorted(p.name for p in entry.iterdir()) == [
    "index.json",
    "shard-00000-of-00002.npy",
    "shard-00001-of-00002.npy",
  ]
  monkeypatch.setattr(image_cache, "Embedder", _no_model)
  one, _ = image_cache.image_embeddings(model, params, images, SIZE, cache_dir=cache)
  np.testing.assert_allclose(one, plain, rtol=1e-6, atol=1e-6)  # one process reads both
  (entry / "shard-00000-of-00002.npy").unlink()
  with monkeypatch.context() as m:  # process 1 reads only its own shard: still a hit
    _as_process(m, 1, 2, plain)
    emb, _ = image_cache.image_embeddings(model, params, images, SIZE, cache_dir=cache)
  np.testing.assert_allclose(emb, plain, rtol=1e-6, atol=1e-6)
  with pytest.raises(AssertionError, match="the image tower ran"):  # one process misses now
    image_cache.image_embeddings(model, params, images, SIZE, cache_dir=cache)
