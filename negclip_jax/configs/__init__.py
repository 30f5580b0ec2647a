"""The shipped training configs (ml_collections `get_config()` files) and `--config` lookup.

`--config` takes a config file path from any directory or the name of a shipped config
(`NAMES`, e.g. ``omni_negclip_vitb32``, ``tiny``), optionally with ``:args`` for its
`get_config`. Every key's one-line meaning is the trailing comment on its line in
`BASE` (``omni_negclip_vitb32.py``), which every shipped config derives from.
"""

from __future__ import annotations

import ast
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


EVALS_FLAG = "--config.evals."


def split_eval_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
  """argv without its ``--config.evals.NAME.KEY=VALUE`` (or ``... VALUE``) arguments, and
  those as (NAME, KEY, VALUE). ml_collections sets only keys that exist; `apply_eval_overrides`
  also creates evaluators and their options. A malformed one raises ValueError (one line)."""
  rest, found, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith(EVALS_FLAG):
      rest.append(arg)
      i += 1
      continue
    dotted, sep, value = arg[len(EVALS_FLAG) :].partition("=")
    if not sep:
      if i + 1 >= len(argv):
        raise ValueError(f"{arg} needs a value: {arg}=VALUE")
      value, i = argv[i + 1], i + 1
    name, _, key = dotted.partition(".")
    if not name or not key or "." in key:
      raise ValueError(
        f"{arg.partition('=')[0]}: expected {EVALS_FLAG}NAME.KEY=VALUE "
        f"(e.g. {EVALS_FLAG}cc.task=ccneg)"
      )
    found.append((name, key, value))
    i += 1
  return rest, found


def _parse_value(text: str, old=None):
  """A command-line value: the type of `old` when it has one, else a Python literal
  (``500``, ``0.5``, ``True``/``true``) or, failing that, the string itself."""
  if isinstance(old, bool) or text.lower() in ("true", "false"):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")
  if isinstance(old, (int, float)) and not isinstance(old, bool):
    return type(old)(text)
  if isinstance(old, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return value if isinstance(value, (int, float, str)) else text


def apply_eval_overrides(config, overrides: list[tuple[str, str, str]]):
  """Sets ``config.evals[NAME][KEY]`` for each (NAME, KEY, VALUE), creating the evaluator
  when it is new (`eval/evaluators.py` validates the result); returns `config`."""
  import ml_collections

  with config.unlocked():
    for name, key, text in overrides:
      if name not in config.evals:
        config.evals[name] = ml_collections.ConfigDict()
      entry = config.evals[name]
      try:
        value = _parse_value(text, entry.get(key))
      except ValueError as e:
        raise ValueError(f"{EVALS_FLAG}{name}.{key}={text}: {e}") from None
      with entry.ignore_type():
        entry[key] = value
  return config


def help_table(config) -> str:
  """Every key of `config` with its value and meaning, one per line; an empty `evals` shows
  how to add an evaluator."""
  flat = flat_config(json.loads(config.to_json()))
  if not config.evals:
    flat["evals.NAME.KEY"] = {}
  meaning = meanings()
  meaning["evals.NAME.KEY"] = (
    "add or change an evaluator: --config.evals.NAME.task=TASK and its options "
    "(every, batch_size, dtype, data, image_root, ...; README, Evaluation)"
  )
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
