"""Independent reference implementations, imported (never copied) for parity tests."""

import importlib
import importlib.util
import sys
import types


def openai_clip_model():
  """Returns OpenAI's `clip/model.py` module (the `openai-clip` package).

  The package `__init__` imports `pkg_resources` and torchvision, which tests do
  not need, so only `model.py` is loaded from the installed package.
  """
  name = "_openai_clip_model"
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("openai-clip is not installed: pip install openai-clip==1.0.1")
  path = f"{list(spec.submodule_search_locations)[0]}/model.py"
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module
  module_spec.loader.exec_module(module)
  return module


def open_clip_model():
  """Returns open_clip's `model.py` module (the `open_clip_torch` package).

  `open_clip/__init__.py` needs torchvision, whose PyPI wheels do not load with the
  CPU build of torch; the package directory is therefore imported under a private
  name without its `__init__`. Its `utils.py` imports torchvision's `FrozenBatchNorm2d`
  (used only to freeze ResNet towers), so a stub that refuses construction stands in
  for torchvision while that one module imports, and is removed again afterwards.
  """
  name = "_open_clip_reference"
  if f"{name}.model" in sys.modules:
    return sys.modules[f"{name}.model"]
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("open_clip is not installed: pip install --no-deps open_clip_torch==3.3.0")
  package = types.ModuleType(name)
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules[name] = package

  class FrozenBatchNorm2d:
    def __init__(self, *args, **kwargs):
      raise NotImplementedError("torchvision is not installed")

  stubs = {
    n: types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc")
  }
  stubs["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
  try:
    sys.modules.update(stubs)
    importlib.import_module(f"{name}.utils")  # the only module importing torchvision
  finally:
    for n in stubs:
      sys.modules.pop(n, None)
  return importlib.import_module(f"{name}.model")
