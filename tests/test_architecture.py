"""The package's layers (README "Architecture"): a module imports only its own layer and those
below it, and data/ runs no model. Read from the source with `ast`, function-local imports
included."""

import ast
import fnmatch
from pathlib import Path

import negclip_jax

PACKAGE = Path(negclip_jax.__file__).parent

# Lowest first; fnmatch patterns over dotted module names below negclip_jax.
LAYERS = (
  ("platform", ("storage", "hosts", "torch_io", "console", "configs", "configs.*")),
  ("model and data", ("model", "model.*", "data", "data.*")),
  (
    "training core",
    (
      "train",
      "train.batch",
      "train.losses",
      "train.param_groups",
      "train.optim",
      "train.packing",
      "train.step",
      "train.sharding",
      "train.resume",
      "train.checkpoint",
    ),
  ),
  (
    "run directory and evaluation",
    (
      "rundir",
      "eval",
      "eval.embed",
      "eval.metrics",
      "eval.probe",
      "eval.tasks",
      "eval.tasks.*",
      "eval.registry",
      "eval.evaluators",
      "eval.results",
    ),
  ),
  ("training input", ("train.pipeline", "train.image_cache")),
  (
    "commands",
    (
      "",
      "train.trainer",
      "train.__main__",
      "eval.cli",
      "export",
      "compile",
      "demo",
      "evaluate",
      "partition",
      "train_step",
    ),
  ),
)


def _module(path: Path) -> str:
  parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
  found = [
    i
    for i, (_, patterns) in enumerate(LAYERS)
    if any(fnmatch.fnmatchcase(module, p) for p in patterns)
  ]
  assert len(found) == 1, f"negclip_jax.{module} is in {len(found)} layers; give it one"
  return found[0]


def _imports(path: Path) -> set[str]:
  """negclip_jax modules `path` imports (as names below negclip_jax; "" = the package)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "negclip_jax":
        out.update(
          a.name if (PACKAGE / a.name).exists() or (PACKAGE / f"{a.name}.py").exists() else ""
          for a in node.names
        )
      elif node.module.startswith("negclip_jax."):
        base = node.module.removeprefix("negclip_jax.")
        for a in node.names:  # `from negclip_jax.model import clip` imports model.clip
          sub = f"{base}.{a.name}"
          is_module = (PACKAGE / sub.replace(".", "/")).with_suffix(".py").exists() or (
            PACKAGE / sub.replace(".", "/")
          ).is_dir()
          out.add(sub if is_module else base)
    elif isinstance(node, ast.Import):
      out.update(
        a.name.removeprefix("negclip_jax").lstrip(".")
        for a in node.names
        if a.name == "negclip_jax" or a.name.startswith("negclip_jax.")
      )
  return out


def _modules() -> dict[str, Path]:
  return {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer_and_imports_only_its_own_layer_and_below():
  upward = []
  for module, path in _modules().items():
    for imported in _imports(path):
      if _layer(imported) > _layer(module):
        upward.append(
          f"negclip_jax.{module} ({LAYERS[_layer(module)][0]}) imports "
          f"negclip_jax.{imported} ({LAYERS[_layer(imported)][0]})"
        )
  assert upward == []


def test_data_imports_no_model_training_or_evaluation_code():
  allowed = ("storage", "hosts", "torch_io", "data", "data.*")
  for module, path in _modules().items():
    if module == "data" or module.startswith("data."):
      bad = sorted(i for i in _imports(path) if not any(fnmatch.fnmatchcase(i, p) for p in allowed))
      assert bad == [], f"negclip_jax.{module} imports {bad}"


def test_the_run_directory_layout_is_spelled_only_in_rundir():
  for module, path in _modules().items():
    text = path.read_text()
    for name in ('"checkpoints"', '"metrics.jsonl"', '"skipped.jsonl"', '"tensorboard"'):
      assert module == "rundir" or name not in text, f"negclip_jax.{module} spells {name}"


def test_the_import_checker_sees_upward_imports(tmp_path):
  """The checker itself: a function-local import of a higher layer is found."""
  path = tmp_path / "probe.py"
  path.write_text(
    "def f():\n  from negclip_jax.train import trainer\n"
    "  from negclip_jax import rundir, storage\n  import negclip_jax.eval.cli\n"
  )
  assert _imports(path) == {"train.trainer", "rundir", "storage", "eval.cli"}
  assert _layer("train.trainer") > _layer("model.clip") > _layer("storage")
