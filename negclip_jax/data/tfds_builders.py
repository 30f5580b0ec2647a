"""`tfds build`-able builders: CC-Neg and NegationCLIP's COCO file as TFDS shards.

Convert once, then train from the shards (``data.presence=tfds:negclip_ccneg``,
``data.absence=tfds:negclip_coco_negation``, ``data.tfds_data_dir=OUT``; `tfds_shards`):

    python -m negclip_jax.data.tfds_builders ccneg --annotations ccneg_preprocessed.pt \
      --image-root /data/cc3m --data-dir OUT [--eval-size 40000] [--file-format array_record]
    python -m negclip_jax.data.tfds_builders coco_negation \
      --annotations negationclip_captions_train2014.json --image-root /data/coco/train2014 \
      --data-dir OUT

``--file-format``: ``tfrecord`` (default; read from a local or ``gs://`` data_dir) or
``array_record`` (read from a local one). Or through TFDS's own command, with the annotation
file and the images it names in one folder DIR:

    tfds build negclip_ccneg --imports negclip_jax.data.tfds_builders --manual_dir DIR \
      --data_dir OUT [--file_format array_record]

(the default eval size; ``NegclipCcneg(data_dir=OUT).download_and_prepare(...)`` in Python).
tensorflow-datasets 4.9.10's ``tfds`` command imports apache-beam and mlcroissant at start,
for its other subcommands; neither is in our requirements (see the README), so there it needs
``pip install apache-beam mlcroissant``. The records are those the file readers give
(`ccneg.load_ccneg`, `coco_negation.load_coco_negation`: same parsing, same paths, a bad
record stops the build with its DataError); image files are copied byte for byte, never
re-encoded.

negclip_ccneg: one example per record, {"image", "caption", "negated", "index"}; split
"train" holds what ``load_ccneg(split="train")`` gives (negated commas stripped, as training
reads them), "eval" the last `eval_size` records with commas kept (as the ``ccneg`` task
reads them; not written when empty). negclip_coco_negation: one example per image,
{"image", "caption": [...], "updated": [...], "index": [...]} for its annotations; split
"train". ``index`` is each record's position in the annotation file: the readers restore
the file's order from it (TFDS writes examples in a hashed order).
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import numpy as np
import tensorflow_datasets as tfds

from negclip_jax import storage
from negclip_jax.data import ccneg, coco_negation
from negclip_jax.data.records import DataError

_MANUAL = (
  "Put the annotation file ({}) and the images it names (paths relative to this folder) in "
  "one folder and pass it as --manual_dir; or use `python -m negclip_jax.data.tfds_builders`, "
  "which takes --annotations and --image-root."
)


class _FileBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder reading a local annotation file and image folder: `annotations` and
  `image_root`, or else the one annotation file (`SUFFIXES`) in ``manual_dir`` and the
  images under it."""

  VERSION = tfds.core.Version("1.0.0")
  SUFFIXES: tuple[str, ...] = ()

  def __init__(self, *, annotations: str | None = None, image_root: str | None = None, **kwargs):
    self._annotations, self._image_root = annotations, image_root
    super().__init__(**kwargs)

  def _files(self, dl_manager) -> tuple[str, str]:
    """(annotation file, image root)."""
    if self._annotations:
      return self._annotations, self._image_root or os.path.dirname(self._annotations)
    folder = dl_manager.manual_dir
    found = sorted(os.fspath(p) for p in folder.iterdir() if p.name.endswith(self.SUFFIXES))
    if len(found) != 1:
      raise DataError(
        os.fspath(folder),
        f"manual_dir must hold exactly one annotation file ({', '.join(self.SUFFIXES)}); "
        f"found {len(found)}",
      )
    return found[0], os.fspath(folder)


class NegclipCcneg(_FileBuilder):
  """CC-Neg (CoN-CLIP's ccneg_preprocessed.pt or its JSONL) as image-caption-negated examples."""

  SUFFIXES = (".pt", ".jsonl")
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL.format("ccneg_preprocessed.pt or .jsonl")

  def __init__(self, *, eval_size: int = ccneg.CCNEG_EVAL_SIZE, **kwargs):
    self._eval_size = eval_size
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(),
          "caption": tfds.features.Text(),
          "negated": tfds.features.Text(),
          "index": tfds.features.Scalar(dtype=np.int64),
        }
      ),
      description=__doc__,
    )

  def _split_generators(self, dl_manager):
    path, root = self._files(dl_manager)
    read = lambda split, keep: ccneg.load_ccneg(
      path, root, split=split, eval_size=self._eval_size, keep_commas=keep
    )
    splits = {"train": self._generate_examples(read("train", False))}
    eval_records = read("eval", True)
    if eval_records:
      splits["eval"] = self._generate_examples(eval_records)
    return splits

  def _generate_examples(self, records):
    for r in records:
      yield (
        r.index,
        {
          "image": storage.path(r.image_path),
          "caption": r.caption,
          "negated": r.negated,
          "index": r.index,
        },
      )


class NegclipCocoNegation(_FileBuilder):
  """NegationCLIP's COCO captions with ``updated_caption``: one example per image."""

  SUFFIXES = (".json",)
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL.format("the COCO-captions .json with updated_caption")

  def _info(self):
    texts = tfds.features.Sequence(tfds.features.Text())
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(),
          "caption": texts,
          "updated": texts,
          "index": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int64)),
        }
      ),
      description=__doc__,
    )

  def _split_generators(self, dl_manager):
    path, root = self._files(dl_manager)
    return {"train": self._generate_examples(coco_negation.load_coco_negation(path, root))}

  def _generate_examples(self, records):
    by_image = defaultdict(list)
    for r in records:
      by_image[r.image_path].append(r)
    for image_path, group in by_image.items():
      yield (
        group[0].index,
        {
          "image": storage.path(image_path),
          "caption": [r.caption for r in group],
          "updated": [r.updated for r in group],
          "index": [r.index for r in group],
        },
      )


BUILDERS = {"ccneg": NegclipCcneg, "coco_negation": NegclipCocoNegation}
FILE_FORMATS = ("tfrecord", "array_record")  # what `tfds_shards` reads


def main(argv: list[str] | None = None) -> None:
  """``python -m negclip_jax.data.tfds_builders {ccneg,coco_negation} --annotations F
  --image-root D --data-dir OUT [--eval-size N] [--file-format F]``: prepare the dataset
  under OUT."""
  parser = argparse.ArgumentParser(
    prog="python -m negclip_jax.data.tfds_builders",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("dataset", choices=sorted(BUILDERS))
  parser.add_argument("--annotations", required=True, help="the annotation file")
  parser.add_argument("--image-root", required=True, help="the folder its image paths are under")
  parser.add_argument("--data-dir", required=True, help="TFDS data_dir to write")
  parser.add_argument(
    "--eval-size", type=int, default=ccneg.CCNEG_EVAL_SIZE, help="ccneg: records held out"
  )
  parser.add_argument(
    "--file-format",
    choices=FILE_FORMATS,
    default=FILE_FORMATS[0],
    help="shard file format (array_record: read from a local data_dir only)",
  )
  args = parser.parse_args(argv)
  if not storage.isfile(args.annotations):
    parser.exit(1, f"error: --annotations {args.annotations}: no such file\n")
  if not storage.isdir(args.image_root):
    parser.exit(1, f"error: --image-root {args.image_root}: no such folder\n")
  kwargs = dict(
    annotations=args.annotations,
    image_root=args.image_root,
    data_dir=args.data_dir,
    file_format=args.file_format,
  )
  if args.dataset == "ccneg":
    kwargs["eval_size"] = args.eval_size
  try:
    builder = BUILDERS[args.dataset](**kwargs)
    builder.download_and_prepare()
  except (DataError, OSError) as e:  # a bad record, a missing file
    parser.exit(1, f"error: {e}\n")
  splits = {name: s.num_examples for name, s in builder.info.splits.items()}
  print(f"wrote {builder.info.full_name} to {builder.data_dir}: {splits}")


if __name__ == "__main__":
  main()
