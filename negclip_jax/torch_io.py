"""The project's one way to read PyTorch files, without running code from them.

* A ``torch.save`` file goes through ``torch.load(weights_only=True)``: tensors, plain
  containers, numbers and strings, plus the globals in `SAFE_GLOBALS` (the
  ``argparse.Namespace`` that Omni-NegCLIP / CoN-CLIP training checkpoints carry as
  ``args``). Never ``weights_only=False``, never plain pickle.
* A TorchScript archive (``torch.jit.save``, e.g. OpenAI's released ``ViT-B-32.pt``) is
  a zip: ``<name>/data.pkl`` pickles the module tree (objects of ``__torch__.*`` classes,
  tensors as ``torch._utils._rebuild_tensor_v2`` over persistent ids
  ``('storage', torch.<T>Storage, key, device, numel)`` whose bytes are
  ``<name>/data/<key>``), and ``<name>/code/__torch__/.../<module>.py`` declares each
  class's ``__parameters__`` and ``__buffers__``. `read_torchscript` unpickles
  ``data.pkl`` with an unpickler that allows only tensor rebuilding and
  ``collections.OrderedDict`` (``__torch__`` classes become inert attribute holders) and
  reads those two lists with ``ast`` (parsed, never executed), giving exactly
  ``torch.jit.load(path).state_dict()``. ``torch.jit.load`` is never called.
"""

from __future__ import annotations

import argparse
import ast
import collections
import os
import pickle
import zipfile
from typing import Any

try:
  import torch
except ImportError as e:  # torch is the optional extra `negclip-jax[torch]`
  raise ImportError(
    "reading PyTorch files (.pt, .bin) needs torch: pip install 'negclip-jax[torch]'"
  ) from e

from negclip_jax import storage as storage_lib

SAFE_GLOBALS = (argparse.Namespace,)
"""The only non-tensor classes a ``torch.save`` file may hold."""

_STORAGE_DTYPES = {
  "FloatStorage": torch.float32,
  "HalfStorage": torch.float16,
  "BFloat16Storage": torch.bfloat16,
  "DoubleStorage": torch.float64,
  "LongStorage": torch.int64,
  "IntStorage": torch.int32,
  "ShortStorage": torch.int16,
  "CharStorage": torch.int8,
  "ByteStorage": torch.uint8,
  "BoolStorage": torch.bool,
}
"""The storage classes a TorchScript pickle names, by the dtype of their elements."""


class UnreadableTorchFileError(ValueError):
  """A torch file is corrupt or holds more than weights; the message names the file."""

  def __init__(self, file: str | os.PathLike, reason: str):
    self.file, self.reason = os.fspath(file), reason
    super().__init__(f"{self.file}: {reason}")


def load(path: str | os.PathLike, hint: str = "re-save it as a plain dict of tensors") -> Any:
  """Reads a ``torch.save`` file or a TorchScript archive (its state dict).

  Args:
    path: the file.
    hint: what the user can do instead, appended to the error when the file holds
      objects the safe loader refuses.
  Raises:
    FileNotFoundError: no such file.
    UnreadableTorchFileError: the file is corrupt or holds anything but weights.
  """
  path = os.fspath(path)
  if not storage_lib.isfile(path):
    raise FileNotFoundError(f"No torch file at {path}")
  source = storage_lib.open(path, "rb") if storage_lib.is_remote(path) else path  # read once
  if _is_torchscript(source):
    return read_torchscript(path, source)
  try:
    if not isinstance(source, str):
      source.seek(0)
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
      return torch.load(source, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise UnreadableTorchFileError(
      path,
      f"cannot be loaded by torch's safe loader (weights_only=True): {_reason(e)}. "
      "The file holds objects other than tensors, plain containers, strings, numbers and "
      f"{', '.join(f'{c.__module__}.{c.__qualname__}' for c in SAFE_GLOBALS)}; negclip-jax "
      f"never unpickles arbitrary objects. If you trust the file, {hint}",
    ) from e
  except Exception as e:  # torch reports corrupt files as RuntimeError, KeyError, EOFError, ...
    raise UnreadableTorchFileError(
      path, f"not a readable torch file ({type(e).__name__}: {_first_line(e)})"
    ) from e


def _is_torchscript(source) -> bool:
  if not zipfile.is_zipfile(source):
    return False
  with zipfile.ZipFile(source) as z:
    return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in z.namelist())


def _reason(error: Exception) -> str:
  """The one-line cause inside torch's long weights_only error message."""
  text = str(error).split("WeightsUnpickler error:")[-1]
  boilerplate = ("Weights only load failed", "Check the documentation")
  for line in text.splitlines():
    if line.strip() and not line.strip().startswith(boilerplate):
      return line.strip().split(". ")[0].rstrip(".")
  return type(error).__name__


def _first_line(error: Exception) -> str:
  return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# ----------------------------------------------------------------------- TorchScript


class _ScriptObject:
  """An inert stand-in for a ``__torch__.*`` object: keeps its pickled attributes."""

  qualname = ""

  def __setstate__(self, state):
    self.state = state


class _ArchiveUnpickler(pickle.Unpickler):
  """Unpickles ``data.pkl`` of a TorchScript archive, allowing only weights."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive, self._prefix = archive, prefix
    self._storages: dict[str, torch.Tensor] = {}
    self._classes: dict[str, type] = {}

  def find_class(self, module: str, name: str):
    if module.startswith("__torch__.") or module == "__torch__":
      qualname = f"{module}.{name}"
      if qualname not in self._classes:
        self._classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
      return self._classes[qualname]
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch" and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

  def persistent_load(self, pid):
    if not (
      isinstance(pid, tuple)
      and len(pid) == 5
      and pid[0] == "storage"
      and isinstance(pid[1], torch.dtype)
    ):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, dtype, key, _, _ = pid
    if key not in self._storages:
      raw = bytearray(self._archive.read(f"{self._prefix}/data/{key}"))
      self._storages[key] = (
        torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
      )
    return self._storages[key]


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """`torch._utils._rebuild_tensor_v2` over a flat tensor standing in for the storage."""
  return storage.as_strided(size, stride, offset)


def read_torchscript(path: str | os.PathLike, source=None) -> dict[str, torch.Tensor]:
  """TorchScript archive -> its state dict (parameters and buffers, dotted names).

  `source`: the archive's bytes as a file object, if already read (default: `path`).
  Raises:
    UnreadableTorchFileError: the archive refers to anything but weights, or is malformed.
  """
  path = os.fspath(path)
  try:
    with zipfile.ZipFile(path if source is None else source) as archive:
      prefix = next(n.split("/")[0] for n in archive.namelist() if n.endswith("/data.pkl"))
      byteorder = f"{prefix}/byteorder"
      if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
        raise ValueError(f"byte order {archive.read(byteorder)!r} is not supported")
      with archive.open(f"{prefix}/data.pkl") as f:
        root = _ArchiveUnpickler(f, archive, prefix).load()
      state_dict = {}
      _collect(root, "", _Declarations(archive, prefix), state_dict)
      return state_dict
  except Exception as e:  # refused globals, missing entries, bad shapes or code: all refusals
    raise UnreadableTorchFileError(
      path,
      f"TorchScript archive refused by negclip-jax's weights-only reader "
      f"({type(e).__name__}: {_first_line(e)}); it is never run with torch.jit.load. "
      "If you trust the file, re-save its state_dict() with torch.save",
    ) from e


class _Declarations:
  """``__parameters__`` / ``__buffers__`` of each ``__torch__`` class, read with `ast`."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str):
    self._archive, self._prefix = archive, prefix
    self._files: dict[str, ast.Module] = {}

  def names(self, qualname: str) -> list[str]:
    module, _, name = qualname.rpartition(".")
    file = f"{self._prefix}/code/{module.replace('.', '/')}.py"
    if file not in self._files:
      self._files[file] = ast.parse(self._archive.read(file).decode("utf-8"))
    for node in self._files[file].body:
      if isinstance(node, ast.ClassDef) and node.name == name:
        lists = {
          t.id: ast.literal_eval(stmt.value)
          for stmt in node.body
          if isinstance(stmt, ast.Assign)
          for t in stmt.targets
          if isinstance(t, ast.Name) and t.id in ("__parameters__", "__buffers__")
        }
        return [*lists.get("__parameters__", []), *lists.get("__buffers__", [])]
    raise KeyError(f"class {qualname} is not declared in {file}")


def _collect(obj: _ScriptObject, prefix: str, declarations: _Declarations, out: dict):
  """Adds obj's parameters and buffers, then its submodules', like `state_dict()`."""
  state = getattr(obj, "state", None)
  if not isinstance(state, dict):
    raise ValueError(f"object {obj.qualname} at {prefix or 'the root'!r} has no attribute dict")
  for name in declarations.names(obj.qualname):
    value = state.get(name)
    if value is not None and not isinstance(value, torch.Tensor):
      raise ValueError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
    if value is not None:
      out[prefix + name] = value
  for name, value in state.items():
    if isinstance(value, _ScriptObject):
      _collect(value, f"{prefix}{name}.", declarations, out)
