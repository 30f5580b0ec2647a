"""CLIP byte-level BPE tokenizer, id-for-id identical to OpenAI's `clip.tokenize`.

A pure-Python port of OpenAI's `SimpleTokenizer`: the text is cleaned with
`ftfy.fix_text`, HTML-unescaped twice, whitespace-collapsed and lowercased, split
with OpenAI's regex, byte-encoded and BPE-merged (merges cached per word). Output
rows are ``<|startoftext|> tokens <|endoftext|>`` zero-padded to
``context_length``; longer texts are truncated keeping ``<|endoftext|>`` last
(``clip.tokenize(..., truncate=True)``).

The bundled ``assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI's BPE file (MIT).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import json
import logging
import os
from typing import Mapping, Sequence

import ftfy
import numpy as np
import regex
from etils import epath

from negclip_jax import storage

logger = logging.getLogger(__name__)

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
DEFAULT_BPE_PATH = (
  importlib.resources.files("negclip_jax") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
)
# OpenAI keeps the first 49152 - 256 - 2 merges of the BPE file.
_NUM_OPENAI_MERGES = 49152 - 256 - 2

_PATTERN = regex.compile(
  r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
  regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """OpenAI/GPT-2 map from the 256 byte values to printable unicode characters."""
  bs = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
  """OpenAI's clean-up: ftfy, HTML-unescape twice, collapse whitespace, strip, lowercase."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return _WHITESPACE.sub(" ", text).strip().lower()


def _load_openai_bpe(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Vocabulary (49408 entries) and merges (48894) built from an OpenAI BPE .txt.gz file."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = [tuple(line.split()) for line in lines[1 : _NUM_OPENAI_MERGES + 1]]
  chars = list(bytes_to_unicode().values())
  tokens = (
    chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
  )
  return {t: i for i, t in enumerate(tokens)}, merges


class ClipTokenizer:
  """Callable CLIP tokenizer: ``tok(texts, context_length) -> int32 [N, context_length]``.

  ``ClipTokenizer()`` uses the bundled OpenAI vocabulary; ``from_pretrained(dir)``
  reads a Hugging Face ``vocab.json`` + ``merges.txt``. ``num_truncated`` counts
  the texts truncated so far, over all calls.
  """

  def __init__(
    self, vocab: Mapping[str, int] | None = None, merges: Sequence[tuple[str, str]] | None = None
  ):
    """`vocab` maps token string -> id, `merges` are BPE merges by priority; both None = bundled."""
    if (vocab is None) != (merges is None):
      raise ValueError("pass both `vocab` and `merges`, or neither")
    if vocab is None:
      vocab, merges = _load_openai_bpe(DEFAULT_BPE_PATH)
    for special in (SOT_TOKEN, EOT_TOKEN):
      if special not in vocab:
        raise ValueError(f"vocabulary lacks the special token {special}")
    self._encoder = dict(vocab)
    self._merges = [tuple(m) for m in merges]
    self._ranks = {m: i for i, m in enumerate(self._merges)}
    self._byte_encoder = bytes_to_unicode()
    self._cache: dict[str, tuple[int, ...]] = {
      SOT_TOKEN: (self.sot_token_id,),
      EOT_TOKEN: (self.eot_token_id,),
    }
    self.num_truncated = 0

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> ClipTokenizer:
    """Load ``vocab.json`` and ``merges.txt`` from a Hugging Face CLIP directory."""
    path = storage.path(path)
    files = {name: path / name for name in ("vocab.json", "merges.txt")}
    for name, file in files.items():
      if not file.is_file():
        raise FileNotFoundError(f"CLIP tokenizer file {name} not found: {file}")
    vocab = json.loads(files["vocab.json"].read_text(encoding="utf-8"))
    lines = files["merges.txt"].read_text(encoding="utf-8").split("\n")
    if lines and lines[0].startswith("#version"):
      lines = lines[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return cls(vocab, merges)

  @classmethod
  def for_model_dir(cls, path: str | os.PathLike) -> ClipTokenizer:
    """`from_pretrained(path)` if `path` is a directory with ``vocab.json`` (a HF CLIP
    directory; a Hub id resolves as in `load_pretrained`, see `negclip_jax.hub`), else the
    bundled OpenAI vocabulary (e.g. for an OpenAI checkpoint file)."""
    from negclip_jax.model import hub

    path = hub.resolve(path)
    return cls.from_pretrained(path) if (path / "vocab.json").is_file() else cls()

  @property
  def sot_token_id(self) -> int:
    return self._encoder[SOT_TOKEN]

  @property
  def eot_token_id(self) -> int:
    return self._encoder[EOT_TOKEN]

  @property
  def vocab_size(self) -> int:
    return len(self._encoder)

  def _bpe(self, word: str) -> tuple[int, ...]:
    """Ids of one pre-tokenized word (cached)."""
    ids = self._cache.get(word)
    if ids is not None:
      return ids
    symbols = [self._byte_encoder[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    ranks = self._ranks
    while len(symbols) > 1:
      best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, np.inf))
      if best not in ranks:
        break
      merged, i = [], 0
      while i < len(symbols):  # merge every occurrence of `best`, left to right
        if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
          merged.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    ids = tuple(self._encoder[s] for s in symbols)
    self._cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without start/end tokens."""
    ids: list[int] = []
    for word in _PATTERN.findall(clean_text(text)):
      ids.extend(self._bpe(word))
    return ids

  def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
    """Tokenize `texts` (a str is one text) -> int32 [N, context_length], zero padded."""
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2, got {context_length}")
    if isinstance(texts, str):
      texts = [texts]
    out = np.zeros((len(texts), context_length), np.int32)
    truncated = 0
    for row, text in enumerate(texts):
      ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
      if len(ids) > context_length:
        ids = ids[: context_length - 1] + [self.eot_token_id]
        truncated += 1
      out[row, : len(ids)] = ids
    if truncated:
      self.num_truncated += truncated
      logger.warning("truncated %d of %d texts to %d tokens", truncated, len(texts), context_length)
    return out

  def save_pretrained(self, out_dir: str | os.PathLike, context_length: int = 77) -> epath.Path:
    """Write Hugging Face tokenizer files loadable by `transformers.CLIPTokenizer` (and
    `CLIPProcessor`), with `context_length` as its ``model_max_length``; returns `out_dir`."""
    out_dir = storage.path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(
      json.dumps(self._encoder, ensure_ascii=False), encoding="utf-8"
    )
    (out_dir / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges), encoding="utf-8"
    )
    special = {
      "bos_token": SOT_TOKEN,
      "eos_token": EOT_TOKEN,
      "unk_token": EOT_TOKEN,
      "pad_token": EOT_TOKEN,
    }
    config = {
      "tokenizer_class": "CLIPTokenizer",
      "model_max_length": context_length,
      "do_lower_case": True,
      "errors": "replace",
      **special,
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
      (out_dir / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    return out_dir


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> ClipTokenizer:
  """The shared `ClipTokenizer()` on the bundled OpenAI vocabulary."""
  return ClipTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
  """`clip.tokenize(texts, context_length, truncate=True)` as int32 [N, context_length]."""
  return default_tokenizer()(texts, context_length)
