"""The shipped training configs (ml_collections `get_config()` files) and `--config` lookup.

`--config` takes a config file path from any directory or the name of a shipped config
(`NAMES`, e.g. ``omni_negclip_vitb32``, ``tiny``), optionally with ``:args`` for its
`get_config`. Every key's one-line meaning is the trailing comment on its line in
`BASE` (``omni_negclip_vitb32.py``), which every shipped config derives from.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tokenize
from pathlib import Path

from absl import flags
from ml_collections import config_flags

DIR = Path(__file__).parent
BASE = "omni_negclip_vitb32"
NAMES = tuple(sorted(p.stem for p in DIR.glob("*.py") if p.stem != "__init__"))


def resolve(value: str) -> str:
  """`--config` value -> "path[:args]": an existing file as given, else a shipped name.

  Raises ValueError (one line) when `value` is neither.
  """
  path, sep, args = value.partition(":")
  if os.path.isfile(path):
    return value
  name = path.removesuffix(".py")
  if name in NAMES:
    return str(DIR / f"{name}.py") + sep + args
  raise ValueError(
    f"--config {path!r} is neither a file nor a shipped config name ({', '.join(NAMES)})"
  )


def load(value: str):
  """The ConfigDict that `--config value` gives (no overrides applied)."""
  path, _, args = resolve(value).partition(":")
  spec = importlib.util.spec_from_file_location("negclip_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*([args] if args else []))


class _NameOrFileParser(flags.ArgumentParser):
  """ml_collections' config-file parser, given a `resolve`d value."""

  def __init__(self, file_parser: flags.ArgumentParser):
    self._file_parser = file_parser

  def parse(self, argument):
    return self._file_parser.parse(resolve(argument))

  def flag_type(self):
    return self._file_parser.flag_type()


def define_flag(name: str, help_string: str) -> flags.FlagHolder:
  """`config_flags.DEFINE_config_file` whose value may also be a shipped config name."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
  flags.FLAGS[name].parser = _NameOrFileParser(flags.FLAGS[name].parser)
  return holder


def meanings() -> dict[str, str]:
  """{dotted key: one-line meaning}: the trailing comments of `BASE`'s ``c.<key> = ...`` lines."""
  source = (DIR / f"{BASE}.py").read_text(encoding="utf-8")
  out, line_tokens = {}, []
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type in (tokenize.NEWLINE, tokenize.NL):
      line_tokens = []
      continue
    line_tokens.append(token)
    if token.type == tokenize.COMMENT:
      code = [t.string for t in line_tokens[:-1]]
      if len(code) > 3 and code[:2] == ["c", "."] and "=" in code:
        out["".join(code[2 : code.index("=")])] = token.string.lstrip("# ").strip()
  return out


def help_table(config) -> str:
  """Every key of `config` with its value and meaning, one per line."""
  flat = flat_config(json.loads(config.to_json()))
  meaning = meanings()
  width = max(len(k) for k in flat) + 2
  return "\n".join(
    f"  --config.{k.ljust(width)}{json.dumps(v):<16} {meaning.get(k, '')}".rstrip()
    for k, v in flat.items()
  )


def flat_config(config: dict, prefix: str = "") -> dict:
  """Nested config dict -> {"a.b": value}."""
  out = {}
  for k, v in config.items():
    if isinstance(v, dict):
      out.update(flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
