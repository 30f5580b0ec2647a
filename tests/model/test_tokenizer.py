"""`negclip_jax.tokenizer` against OpenAI reference ids and transformers' `CLIPTokenizer`.

transformers 5's `CLIPTokenizer` is the `tokenizers`-backed one: it normalizes with
NFC + whitespace collapse + lowercase only, with no ftfy / HTML clean-up (there is
no ftfy-based CLIP tokenizer left in transformers 5, whether or not ftfy is
installed). So HF is compared on ``clean_text(text)`` for every text (this checks
regex split, byte-level BPE, special tokens and truncation), directly on texts
the clean-up leaves unchanged, and the clean-up itself is checked against ids
produced by OpenAI's own `clip.simple_tokenizer` (openai-clip 1.0.1, ftfy 6.3.1).

HF pads with its pad token (``<|endoftext|>`` = 49407, as in
openai/clip-vit-base-patch32) and we pad with 0, so rows are compared on HF's
``attention_mask`` positions, and the padding separately.
"""

from __future__ import annotations

import html
import logging
import shutil
import unicodedata

import ftfy
import numpy as np
import pytest
import transformers

from negclip_jax.model.tokenizer import ClipTokenizer, clean_text, tokenize

SOT, EOT = 49406, 49407

# Texts the clean-up leaves unchanged apart from NFC, whitespace and case.
PLAIN_TEXTS = [
  "a dog, not a cat",
  "no people",
  "without a hat",
  "A photo of a DOG. Not a Cat!",
  "Hello!!!  (world) -- 3.14 #tag @user $5 100%",
  "there  are\n\nmultiple   spaces\tand\nnewlines ",
  "don't won't I'm you're they've we'll he'd it's",
  "café naïve résumé Ünïcödé ß",
  "cafe\u0301 (combining accent, NFC-normalized)",
  "dogs 🐶🐱 and emoji 😀😀",
  "一只狗在草地上 and 日本語のテキスト",
  "Ελληνικά Русский العربية हिन्दी",
  "",
  "   ",
]

# Texts OpenAI's ftfy / HTML clean-up changes, with ids from OpenAI's SimpleTokenizer.
OPENAI_CLEANUP_IDS = [
  ("Fish &amp; chips", [SOT, 2759, 261, 8855, EOT]),
  ("&lt;b&gt; bold", [SOT, 283, 321, 285, 8911, EOT]),
  ("&amp;amp; twice", [SOT, 261, 6970, EOT]),
  ("cafÃ© au lait", [SOT, 15304, 2566, 572, 585, EOT]),  # mojibake fixed by ftfy
  ("“quoted” ‘text’", [SOT, 257, 27706, 257, 713, 20072, 262, EOT]),
  ("ＡＢＣ fullwidth", [SOT, 5334, 9407, 23571, EOT]),
  ("ﬁne ligature", [SOT, 3797, 19915, 4490, EOT]),
  ("\x1b[31mred\x1b[0m", [SOT, 736, EOT]),
  ("line\r\nbreak", [SOT, 1148, 2568, EOT]),
]

LONG_TEXT = " ".join(["a red dog and not a blue cat"] * 20)  # 160 words > 77 tokens

ALL_TEXTS = PLAIN_TEXTS + [text for text, _ in OPENAI_CLEANUP_IDS] + [LONG_TEXT]


@pytest.fixture(scope="module")
def tok():
  return ClipTokenizer()


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
  return tok.save_pretrained(tmp_path_factory.mktemp("hf_tokenizer"))


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
  return transformers.CLIPTokenizer.from_pretrained(hf_dir)


def assert_same_as_hf(ours, hf_tok, texts, context_length=77):
  enc = hf_tok(texts, padding="max_length", max_length=context_length, truncation=True)
  hf_ids = np.array(enc["input_ids"])
  mask = np.array(enc["attention_mask"]).astype(bool)
  assert ours.shape == hf_ids.shape == (len(texts), context_length)
  np.testing.assert_array_equal(ours != 0, mask)
  np.testing.assert_array_equal(ours[mask], hf_ids[mask])
  assert (hf_ids[~mask] == hf_tok.pad_token_id).all()


def test_known_openai_ids():
  ids = tokenize("a diagram")
  assert ids.shape == (1, 77) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids[0, :4], [SOT, 320, 22697, EOT])
  assert not ids[0, 4:].any()
  np.testing.assert_array_equal(tokenize(["a dog"])[0, :5], [SOT, 320, 1929, EOT, 0])


def test_special_ids_and_vocab_size(tok):
  assert (tok.sot_token_id, tok.eot_token_id, tok.vocab_size) == (SOT, EOT, 49408)


@pytest.mark.parametrize("text,expected", OPENAI_CLEANUP_IDS)
def test_cleanup_matches_openai(tok, text, expected):
  row = tok(text)[0]
  np.testing.assert_array_equal(row[: len(expected)], expected)
  assert not row[len(expected) :].any()


def test_matches_hf_on_raw_plain_texts(tok, hf_tok):
  for text in PLAIN_TEXTS:  # precondition: ftfy + HTML unescaping only NFC-normalize, as HF does
    assert html.unescape(ftfy.fix_text(text)) == unicodedata.normalize("NFC", text)
  assert_same_as_hf(tok(PLAIN_TEXTS), hf_tok, PLAIN_TEXTS)


@pytest.mark.parametrize("context_length", [77, 16])
def test_matches_hf_after_cleanup(tok, hf_tok, context_length):
  ours = tok(ALL_TEXTS, context_length=context_length)
  assert_same_as_hf(ours, hf_tok, [clean_text(t) for t in ALL_TEXTS], context_length)


def test_truncation_keeps_eot_and_warns_once(caplog):
  tok = ClipTokenizer()
  with caplog.at_level(logging.WARNING, logger="negclip_jax.tokenizer"):
    ids = tok([LONG_TEXT, "a dog", LONG_TEXT])
  assert tok.num_truncated == 2
  assert len(caplog.records) == 1 and "2 of 3" in caplog.records[0].getMessage()
  assert ids[0, 0] == SOT and ids[0, 76] == EOT and (ids[0, 1:76] != EOT).all()
  np.testing.assert_array_equal(ids[0], ids[2])
  tok(LONG_TEXT)
  assert tok.num_truncated == 3


def test_from_pretrained_roundtrip(tok, hf_dir):
  loaded = ClipTokenizer.from_pretrained(hf_dir)
  assert loaded.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(loaded(ALL_TEXTS), tok(ALL_TEXTS))


def test_from_pretrained_missing_merges(hf_dir, tmp_path):
  shutil.copy(hf_dir / "vocab.json", tmp_path / "vocab.json")
  with pytest.raises(FileNotFoundError, match="merges.txt"):
    ClipTokenizer.from_pretrained(tmp_path)


def test_for_model_dir_reads_the_directory_else_bundled(tok, hf_dir, tmp_path):
  import json

  vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
  vocab["a</w>"], vocab["photo</w>"] = vocab["photo</w>"], vocab["a</w>"]
  (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  shutil.copy(hf_dir / "merges.txt", tmp_path / "merges.txt")
  own = ClipTokenizer.for_model_dir(tmp_path)
  assert own(["a photo"])[0, 1] == tok(["photo"])[0, 1]
  for bundled in (tmp_path / "openai.pt", tmp_path / "empty"):
    np.testing.assert_array_equal(ClipTokenizer.for_model_dir(bundled)(ALL_TEXTS), tok(ALL_TEXTS))
