"""The package's layering (docs/ARCHITECTURE.md): no module imports one from a layer above it."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "iomm_jax")

# top-level module or package of iomm_jax -> its layer (the table in docs/ARCHITECTURE.md)
LAYERS = {
  "configs": 0,
  "files": 0,
  "dtypes": 0,
  "runtime": 1,
  "sharding": 1,
  "perf": 1,
  "metrics": 1,
  "optim": 1,
  "checkpointing": 1,
  "models": 2,
  "diffusion": 2,
  "data": 3,
  "convert": 3,
  "assembly": 4,
  "generate": 5,
  "inference": 5,
  "train": 6,
  "edit": 6,
  "chat": 6,
  "eval": 7,
  "cli": 8,
}
# (importer, imported) pairs allowed upwards: config validation reads the model dataclasses,
# imported inside the function so that `import iomm_jax.configs` stays free of JAX
ALLOWED = {("configs/loading.py", "models")}


def _modules() -> list[str]:
  out = []
  for root, _, names in os.walk(PACKAGE):
    out += [os.path.relpath(os.path.join(root, n), PACKAGE) for n in names if n.endswith(".py")]
  return sorted(out)


def _imported(tree: ast.AST) -> set[str]:
  """The iomm_jax top-level names a module imports, at any depth (lazy imports count)."""
  got = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      parts = node.module.split(".")
      if parts[0] != "iomm_jax":
        continue
      got |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
    elif isinstance(node, ast.Import):
      got |= {a.name.split(".")[1] for a in node.names if a.name.startswith("iomm_jax.")}
  return got & set(LAYERS)


def test_every_module_has_a_layer():
  tops = {m.split(os.sep)[0].removesuffix(".py") for m in _modules()} - {"__init__"}
  assert tops <= set(LAYERS), f"add {sorted(tops - set(LAYERS))} to LAYERS and ARCHITECTURE.md"


@pytest.mark.parametrize("module", _modules())
def test_no_import_from_a_layer_above(module):
  top = module.split(os.sep)[0].removesuffix(".py")
  if top == "__init__":
    return
  with open(os.path.join(PACKAGE, module)) as f:
    tree = ast.parse(f.read())
  upward = sorted(
    m
    for m in _imported(tree)
    if LAYERS[m] > LAYERS[top] and (module.replace(os.sep, "/"), m) not in ALLOWED
  )
  assert not upward, f"iomm_jax/{module} (layer {LAYERS[top]}) imports {upward} from above"


def test_the_check_sees_an_upward_import():
  tree = ast.parse("def f():\n  from iomm_jax.train import loop\n")
  assert "train" in _imported(tree) and LAYERS["train"] > LAYERS["assembly"]
