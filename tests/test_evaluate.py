"""Evaluation tasks: JAX results equal an independent PyTorch + numpy evaluation.

Every fixture is written in the real file format; the reference side uses transformers'
`CLIPModel` on the same token ids and preprocessed pixels, and plain numpy metrics.
"""

import csv
import functools
import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from PIL import Image

from negclip_jax import convert, evaluate, model as model_lib
from negclip_jax.data import negshapes
from negclip_jax.embed import Embedder
from negclip_jax.preprocess import preprocess_image
from negclip_jax.tasks import common, metrics
from negclip_jax.tokenizer import ClipTokenizer

CONFIG = model_lib.get_config("tiny")
CONTEXT = CONFIG.text.max_position_embeddings
SIZE = CONFIG.vision.image_size
PREFIX = "/workspace/datasets/cc3m/"

# (file, (width, height), left colour, right colour, corner square colour)
IMAGES = [
    ("img0.jpg", (40, 32), (220, 30, 30), (30, 30, 220), (250, 250, 250)),
    ("img1.jpg", (32, 48), (30, 200, 60), (240, 220, 40), (10, 10, 10)),
    ("img2.jpg", (36, 36), (160, 60, 210), (250, 250, 250), (220, 30, 30)),
    ("img3.jpg", (50, 30), (20, 20, 20), (240, 140, 20), (30, 200, 60)),
    ("img4.jpg", (44, 40), (90, 90, 90), (30, 30, 220), (240, 220, 40)),
    ("img5.jpg", (30, 40), (240, 220, 40), (160, 60, 210), (30, 30, 220)),
    ("val2014/img6.jpg", (40, 40), (30, 30, 220), (220, 30, 30), (90, 90, 90)),
    ("val2014/img7.jpg", (48, 32), (250, 250, 250), (20, 20, 20), (240, 140, 20)),
    ("val2014/img8.jpg", (32, 40), (240, 140, 20), (30, 200, 60), (160, 60, 210)),
    ("val2014/img9.jpg", (38, 34), (30, 200, 60), (220, 30, 30), (250, 250, 250)),
]
CAPTIONS = ["a red square and a blue square", "a green field with a yellow sun",
            "a purple wall, a white door", "a black road next to an orange car",
            "a gray stone on blue water", "a yellow banana and a purple plum",
            "a blue sky over a red roof", "a white cat sleeping on a black sofa",
            "an orange fox in green grass", "a green frog on a red leaf"]
NEGATED = ["a red square, but not a blue square", "a green field with no yellow sun",
           "a purple wall without a white door", "no black road, no orange car",
           "a gray stone not on blue water", "a yellow banana but no purple plum",
           "a blue sky over no red roof", "not a white cat on a black sofa",
           "an orange fox, not in green grass", "a green frog without a red leaf"]

CCNEG = [(i if i < 6 else PREFIX + IMAGES[i][0], CAPTIONS[i], NEGATED[i]) for i in range(10)]
CCNEG_EVAL = 7
REFS = [  # (image index, phrase, ref index, boxes (x, y, w, h))
    (0, "the blue half without a white square", 1,
     [[0, 0, 20, 32], [20, 0, 20, 32], [0, 0, 10.5, 8.5]]),
    (1, "the green part, not the yellow one", 0, [[0, 0, 32, 24], [0, 24, 32, 24]]),
    (3, "a box with no orange", 2,
     [[25, 0, 25, 30], [5, 5, 20, 20], [0, 0, 25, 30], [40, 20, 30, 30]]),
]
COCO_NEG = [(1, 0), (1, 1), (2, 2), (4, 3), (4, 4), (5, 5), (2, 6)]  # (image id, caption)
KARPATHY_TEST = [(6, [6, 0]), (7, [7]), (8, [8, 1, 3]), (9, [9, 2])]  # (image, captions)
MCQ = [(0, 1, "positive"), (2, 3, "negative"), (5, 0, "hybrid"), (7, 2, "negative"),
       (8, 1, "positive")]  # (image, correct, template); captions i, i+1, ... (mod 10)
NEGBENCH_RETRIEVAL = [(1, [1, 2]), (3, [3]), (6, [6, 4, 5]), (9, [9])]


def _path(root, i):
  return os.path.join(root, IMAGES[i][0])


def _mcq_captions(i):
  return [(NEGATED if k % 2 else CAPTIONS)[(i + k) % 10] for k in range(4)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Images and every task's annotation file; returns {task: run_task options}."""
  root = tmp_path_factory.mktemp("data")
  for name, (w, h), left, right, corner in IMAGES:
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, :w // 2], pixels[:, w // 2:], pixels[:h // 4, :w // 4] = left, right, corner
    (root / name).parent.mkdir(exist_ok=True)
    Image.fromarray(pixels).save(root / name, quality=95)
  with open(root / "ccneg.jsonl", "w") as f:
    for image, caption, negated in CCNEG:
      path = image if isinstance(image, str) else IMAGES[image][0]
      f.write(json.dumps({"image_path": path, "caption": caption,
                          "negative_prompt": negated}) + "\n")
  (root / "refs.json").write_text(json.dumps(
      [{"image": IMAGES[i][0], "phrase": p, "ref_bbox": boxes[ref], "bbox_list": boxes}
       for i, p, ref, boxes in REFS]))
  ids = sorted({i for i, _ in COCO_NEG})
  (root / "coco_neg.json").write_text(json.dumps({
      "images": [{"id": i, "file_name": IMAGES[i][0]} for i in ids],
      "annotations": [{"image_id": i, "caption": CAPTIONS[c], "updated_caption": NEGATED[c]}
                      for i, c in COCO_NEG]}))
  entry = lambda i, split, caps: {"filepath": "val2014", "filename": IMAGES[i][0][8:],
                                  "split": split, "sentences": [{"raw": CAPTIONS[c]} for c in caps]}
  (root / "dataset_coco.json").write_text(json.dumps({"images": [
      entry(i, "test", caps) for i, caps in KARPATHY_TEST[:2]] + [entry(6, "train", [1])] + [
      entry(i, "test", caps) for i, caps in KARPATHY_TEST[2:]]}))
  with open(root / "mcq.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image_path", "correct_answer", "caption_0", "caption_1", "caption_2",
                "caption_3", "correct_answer_template"])
    for i, correct, template in MCQ:
      w.writerow([IMAGES[i][0], correct, *_mcq_captions(i), template])
  with open(root / "negbench_retrieval.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filepath", "captions"])
    for i, caps in NEGBENCH_RETRIEVAL:
      w.writerow([IMAGES[i][0], repr([NEGATED[c] for c in caps])])
  r = str(root)
  return types.SimpleNamespace(root=r, options={
      "ccneg": dict(data=f"{r}/ccneg.jsonl", image_root=r, eval_size=CCNEG_EVAL),
      "negrefcocog": dict(data=f"{r}/refs.json", image_root=r),
      "negationclip": dict(data=f"{r}/coco_neg.json", image_root=r),
      "retrieval": dict(data=f"{r}/dataset_coco.json", image_root=r),
      "negbench-mcq": dict(data=f"{r}/mcq.csv", image_root=r),
      "negbench-retrieval": dict(data=f"{r}/negbench_retrieval.csv", image_root=r),
      "negshapes": dict(num=6, seed=3, image_size=40),
      "layers": dict(data=f"{r}/ccneg.jsonl", eval_size=CCNEG_EVAL, num=5),
  })


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """A random tiny CLIP exported by `save_pretrained`, and transformers' model loaded from it.

  Random weights come from transformers' initializer (faster than compiling `init_params`).
  """
  torch.manual_seed(0)
  source = tmp_path_factory.mktemp("random")
  transformers.CLIPModel(transformers.CLIPConfig(**convert.config_to_hf(CONFIG))).save_pretrained(
      source)
  model, params = convert.load_pretrained(source)
  path = tmp_path_factory.mktemp("model")
  convert.save_pretrained(model, params, path, tokenizer=ClipTokenizer())
  hf = transformers.CLIPModel.from_pretrained(path).eval()
  return types.SimpleNamespace(dir=str(path), model=model, params=params, hf=hf)


@pytest.fixture(scope="module")
def reference(clip, files):
  """task -> its reference metrics (computed once)."""
  return functools.cache(lambda task: _reference(task, clip.hf, files.root))


# ------------------------------------------------------------------ PyTorch reference

def _unit(x):
  x = (x if torch.is_tensor(x) else x.pooler_output).numpy()
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ids(texts):
  return torch.from_numpy(ClipTokenizer()(list(texts), CONTEXT)).long()


def _ref_texts(hf, texts):
  with torch.no_grad():
    return _unit(hf.get_text_features(input_ids=_ids(texts)))


def _ref_pixels(hf, pixels):
  """pixels: preprocessed NHWC float32."""
  with torch.no_grad():
    return _unit(hf.get_image_features(pixel_values=torch.from_numpy(
        np.ascontiguousarray(np.stack(pixels).transpose(0, 3, 1, 2)))))


def _ref_images(hf, images):
  """images: paths, PIL images or uint8 arrays."""
  return _ref_pixels(hf, [preprocess_image(x, SIZE) for x in images])


def _ref_ranks(sims, truth):
  """1-based position of the first ground-truth item in each row's descending order."""
  order = np.argsort(-sims, axis=1, kind="stable")
  return np.array([min(list(row).index(g) for g in gt) + 1 for row, gt in zip(order, truth)])


def _ref_retrieval(image, text, caption_to_image, ks, directions=("t2i", "i2t"),
                   mean_rank=False):
  c2i = list(caption_to_image)
  truth = {"t2i": (text @ image.T, [[i] for i in c2i]),
           "i2t": (image @ text.T, [[j for j, i in enumerate(c2i) if i == q]
                                    for q in range(len(image))])}
  out = {}
  for d in directions:
    ranks = _ref_ranks(*truth[d])
    out.update({f"{d}_r{k}": float(np.mean(ranks <= k)) for k in ks})
    if mean_rank:
      out[f"{d}_mean_rank"] = float(np.mean(ranks))
  return out


def _ref_layers(hf, captions, negated):
  def eot_states(texts):
    ids = _ids(texts)
    with torch.no_grad():
      states = hf.text_model(input_ids=ids, output_hidden_states=True).hidden_states
    eot = ids.argmax(-1)
    return np.stack([_unit(s[torch.arange(len(ids)), eot]) for s in states], 1)
  cos = np.sum(eot_states(captions) * eot_states(negated), -1).mean(0)
  return {**{f"cosine_layer_{i}": float(c) for i, c in enumerate(cos)}, "n": len(captions)}


def _reference(task, hf, root):
  """The task's metrics, computed independently of negclip_jax.tasks."""
  path = lambda i: _path(root, i)
  if task == "ccneg":
    records = CCNEG[-CCNEG_EVAL:]
    image = _ref_images(hf, [path(k) for k in range(10)][-CCNEG_EVAL:])
    pos = np.sum(image * _ref_texts(hf, [c for _, c, _ in records]), -1)
    neg = np.sum(image * _ref_texts(hf, [n.replace(",", "") for _, _, n in records]), -1)
    return {"accuracy": float(np.mean(pos >= neg)), "n": CCNEG_EVAL}
  if task == "negrefcocog":
    correct = []
    for i, phrase, ref, boxes in REFS:
      image = Image.open(path(i)).convert("RGB")
      crops = [image.crop((x, y, x + w, y + h)) for x, y, w, h in boxes]
      correct.append(np.argmax(_ref_images(hf, crops) @ _ref_texts(hf, [phrase])[0]) == ref)
    return {"accuracy": float(np.mean(correct)), "n": len(REFS)}
  if task == "negationclip":
    ids = list(dict.fromkeys(i for i, _ in COCO_NEG))
    image = _ref_images(hf, [path(i) for i in ids])
    c2i = [ids.index(i) for i, _ in COCO_NEG]
    out = {}
    for name, texts in (("updated", NEGATED), ("original", CAPTIONS)):
      m = _ref_retrieval(image, _ref_texts(hf, [texts[c] for _, c in COCO_NEG]), c2i, (1, 5, 10))
      out.update({f"{name}_{k}": v for k, v in m.items()})
    return {**out, "n": len(COCO_NEG), "n_images": len(ids)}
  if task == "retrieval":
    image = _ref_images(hf, [path(i) for i, _ in KARPATHY_TEST])
    caps = [c for _, cs in KARPATHY_TEST for c in cs]
    c2i = [q for q, (_, cs) in enumerate(KARPATHY_TEST) for _ in cs]
    out = _ref_retrieval(image, _ref_texts(hf, [CAPTIONS[c] for c in caps]), c2i, (1, 5, 10),
                         mean_rank=True)
    return {**out, "n": len(caps), "n_images": len(KARPATHY_TEST)}
  if task == "negbench-mcq":
    image = _ref_images(hf, [path(i) for i, _, _ in MCQ])
    scores = [_ref_texts(hf, _mcq_captions(i)) @ image[q] for q, (i, _, _) in enumerate(MCQ)]
    correct = np.array([np.argmax(s) == c for s, (_, c, _) in zip(scores, MCQ)])
    templates = np.array([t for _, _, t in MCQ])
    return {"accuracy": float(correct.mean()),
            **{f"accuracy_{t}": float(correct[templates == t].mean())
               for t in ("positive", "negative", "hybrid")}, "n": len(MCQ)}
  if task == "negbench-retrieval":
    image = _ref_images(hf, [path(i) for i, _ in NEGBENCH_RETRIEVAL])
    caps = [c for _, cs in NEGBENCH_RETRIEVAL for c in cs]
    c2i = [q for q, (_, cs) in enumerate(NEGBENCH_RETRIEVAL) for _ in cs]
    out = _ref_retrieval(image, _ref_texts(hf, [NEGATED[c] for c in caps]), c2i, (1, 5),
                         directions=("t2i",))
    return {**out, "n": len(caps), "n_images": len(NEGBENCH_RETRIEVAL)}
  if task == "negshapes":
    p, a, r = (f(6, 3, 40) for f in (negshapes.presence_task, negshapes.absence_task,
                                     negshapes.retrieval_task))
    image = _ref_images(hf, p["images"])
    pos = np.sum(image * _ref_texts(hf, p["captions"]), -1)
    neg = np.sum(image * _ref_texts(hf, p["negated"]), -1)
    text = _ref_texts(hf, a["texts"])
    absence = (np.sum(text * _ref_images(hf, a["images_pos"]), -1)
               > np.sum(text * _ref_images(hf, a["images_neg"]), -1))
    ret = _ref_retrieval(_ref_images(hf, r["images"]), _ref_texts(hf, r["captions"]), range(6),
                         (1,))
    return {"presence_acc": float(np.mean(pos >= neg)), "absence_acc": float(absence.mean()),
            **{f"retrieval_{k}": v for k, v in ret.items()}, "n": 6}
  if task == "layers":
    records = CCNEG[-CCNEG_EVAL:][:5]
    return _ref_layers(hf, [c for _, c, _ in records], [n.replace(",", "") for _, _, n in records])
  raise KeyError(task)


def _assert_same(got, want):
  assert list(got) == list(want)
  for key, value in want.items():
    if key.startswith("cosine"):  # a float, not a decision
      assert got[key] == pytest.approx(value, abs=1e-5), key
    else:
      assert got[key] == value, key


# ------------------------------------------------------------------------------ tests

def test_embeddings_match_pytorch(clip, files):
  embedder = Embedder(clip.model, clip.params, batch_size=3, progress=False)
  paths = [_path(files.root, i) for i in (2, 0, 2, 7)]  # a repeat: embedded once
  np.testing.assert_allclose(common.embed_files(embedder, paths), _ref_images(clip.hf, paths),
                             atol=1e-5)
  np.testing.assert_allclose(common.embed_texts(embedder, ClipTokenizer(), CONTEXT, NEGATED),
                             _ref_texts(clip.hf, NEGATED), atol=1e-5)


@pytest.mark.parametrize("task", list(evaluate.TASKS))
def test_task_matches_pytorch_reference(task, clip, files, reference):
  got = evaluate.run_task(task, clip.model, clip.params, ClipTokenizer(), batch_size=4,
                          progress=False, **files.options[task])
  _assert_same(got, reference(task))


def test_layers_on_negshapes_matches_reference(clip):
  got = evaluate.run_task("layers", clip.model, clip.params, ClipTokenizer(), progress=False,
                          data="negshapes", num=5, seed=1)
  pairs = negshapes.presence_task(5, 1)
  _assert_same(got, _ref_layers(clip.hf, pairs["captions"], pairs["negated"]))


def test_cli_all_writes_json_markdown_and_plot(clip, files, reference, tmp_path, capsys):
  argv = ["--model", clip.dir, "--task", "all", "--out", str(tmp_path / "res.json"),
          "--batch-size", "4", "--eval-size", str(CCNEG_EVAL), "--num", "6", "--seed", "3",
          "--image-size", "40"]
  for task, options in files.options.items():
    if "image_root" in options:
      argv += [f"--{task}-data", options["data"], f"--{task}-image-root", options["image_root"]]
  argv += ["--layers-data", "negshapes"]
  evaluate.main(argv)
  results = json.loads((tmp_path / "res.json").read_text())
  assert list(results) == list(evaluate.TASKS)
  pairs = negshapes.presence_task(6, 3)
  for task in results:
    want = (_ref_layers(clip.hf, pairs["captions"], pairs["negated"]) if task == "layers"
            else reference(task))
    _assert_same(results[task], want)
  table = (tmp_path / "res.md").read_text()
  assert table.startswith("| task | metric | value |") and "| ccneg | n | 7 |" in table
  assert table in capsys.readouterr().out
  assert (tmp_path / "res_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chunked_ranks_match_reference(monkeypatch):
  monkeypatch.setattr(metrics, "_QUERY_CHUNK", 3)  # several chunks, the last one partial
  rng = np.random.default_rng(0)
  image, text = rng.normal(size=(5, 4)), rng.normal(size=(11, 4))
  c2i = np.concatenate([np.arange(5), rng.integers(0, 5, 6)])
  got = metrics.retrieval_metrics(image, text, c2i, ks=(1, 2, 3), mean_rank=True)
  assert got == _ref_retrieval(image, text, c2i, (1, 2, 3), mean_rank=True)


def test_missing_data_is_a_clear_error(clip, files, capsys):
  with pytest.raises(SystemExit):
    evaluate.main(["--model", clip.dir, "--task", "negrefcocog", "--image-root", files.root])
  assert "task 'negrefcocog' needs --data" in capsys.readouterr().err
  with pytest.raises(ValueError, match="needs --image-root"):
    evaluate.run_task("ccneg", clip.model, clip.params, ClipTokenizer(),
                      data=files.options["ccneg"]["data"])
  with pytest.raises(SystemExit):
    evaluate.main(["--model", clip.dir, "--task", "all", "--data", "x.json"])
  assert "ambiguous with --task all" in capsys.readouterr().err


_DEVICE_CHECK = textwrap.dedent("""
    import sys
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import traverse_util
    from negclip_jax import losses, model as model_lib
    from negclip_jax.embed import Embedder
    from negclip_jax.tokenizer import ClipTokenizer
    assert jax.local_device_count() == int(sys.argv[2]), jax.local_device_count()
    model = model_lib.CLIP(model_lib.get_config("tiny"))
    params = traverse_util.unflatten_dict(dict(np.load(sys.argv[1])), sep="/")
    apply = jax.jit(lambda x, method: losses.l2_normalize(model.apply({"params": params}, x,
                    method=method)), static_argnums=1)
    ids = ClipTokenizer()(["a red circle", "no blue square", "a dog", "not a cat", "x y z",
                           "a photo of a green triangle but not a cross", "the end"], 16)
    pixels = np.random.default_rng(0).normal(size=(7, 32, 32, 3)).astype(np.float32)
    direct = {"texts": np.asarray(apply(ids, "get_text_features")),
              "images": np.asarray(apply(pixels, "get_image_features"))}
    embedder = Embedder(model, params, batch_size=2, progress=False)  # 1 batch per device
    for n in (7, 2):  # 7 never fills the last batch; 2 is fewer than 3 or 4 devices
      for kind, got in (("texts", embedder.texts(ids[:n])), ("images", embedder.images(pixels[:n]))):
        err = np.abs(got - direct[kind][:n]).max()
        assert got.shape == direct[kind][:n].shape and err <= 1e-6, (n, kind, err)
    print("ok")
""")


@pytest.fixture(scope="module")
def params_file(clip, tmp_path_factory):
  """The tiny CLIP's params as an .npz of "a/b/kernel" arrays (loads without torch)."""
  path = tmp_path_factory.mktemp("npz") / "params.npz"
  np.savez(path, **traverse_util.flatten_dict(jax.device_get(clip.params), sep="/"))
  return str(path)


@pytest.mark.parametrize("devices", [1, 3, 4])
def test_embedder_padding_is_exact_on_any_device_count(devices, params_file):
  """Padded batches (padding dropped) equal an unpadded direct apply, to 1e-6."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, "-c", _DEVICE_CHECK, params_file, str(devices)],
                        env=env, capture_output=True, text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
