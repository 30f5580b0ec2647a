"""Hugging Face Hub ids (``openai/clip-vit-base-patch32``) -> local directories.

A path that exists locally is used as is. Otherwise a name shaped ``owner/name`` is a
Hub id: it is taken from the local Hugging Face cache (``HF_HUB_CACHE``, by default
``$HF_HOME/hub``), downloaded with ``huggingface_hub`` when the network is allowed
(``HF_HUB_OFFLINE`` unset), and otherwise refused with one line saying where it was
looked for.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from etils import epath

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What `negclip_jax.convert.load_pretrained` and the tokenizer read: every config, and the
# first weight file the repository has, in load_pretrained's order of preference.
_CONFIGS = [
  "config.json",
  "open_clip_config.json",
  "model_config.json",
  "vocab.json",
  "merges.txt",
  "preprocessor_config.json",
]
_WEIGHTS = [
  "model.safetensors",
  "pytorch_model.bin",
  "open_clip_model.safetensors",
  "open_clip_pytorch_model.bin",
  "model.pt",
]


def is_hub_id(path: str | os.PathLike) -> bool:
  """True for an ``owner/name`` string that is not an existing local path."""
  return not Path(path).exists() and bool(_HUB_ID.fullmatch(os.fspath(path)))


def resolve(path: str | os.PathLike) -> epath.Path:
  """A local or ``gs://`` path -> itself; a Hub id -> the directory of its cached snapshot.

  Raises:
    FileNotFoundError: a Hub id neither cached nor downloadable (one line naming the
      cache directory).
  """
  if not is_hub_id(path):
    return epath.Path(path)  # as given: callers that read it make it a storage path
  import huggingface_hub
  from huggingface_hub import constants

  repo_id = os.fspath(path)
  try:
    return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True))
  except FileNotFoundError:  # LocalEntryNotFoundError: not in the cache
    pass
  where = (
    f"{repo_id!r} is not a local path and is not in the Hugging Face cache "
    f"{constants.HF_HUB_CACHE} (set HF_HUB_CACHE or HF_HOME to use another cache)"
  )
  if huggingface_hub.is_offline_mode():
    raise FileNotFoundError(f"{where}; HF_HUB_OFFLINE is set, so it was not downloaded")
  try:
    for weights in _WEIGHTS:  # one weight file, not every format the repository has
      local = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=_CONFIGS + [weights]))
      if (local / weights).is_file():
        break
    return local
  except Exception as e:  # network, authentication, unknown repository
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise FileNotFoundError(
      f"{where}, and downloading it failed ({type(e).__name__}: {message})"
    ) from e
