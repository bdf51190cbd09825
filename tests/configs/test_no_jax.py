"""Config files load without JAX (launchers and planners on a login node read them first)."""

import subprocess
import sys

CODE = """
import sys
from iomm_jax.configs import loading, own_data, paper, mesh, specs
c = loading.load_config("experiments/shapes/pretrain.py", {"train.batch_size": 16})
assert mesh.mesh_shape(c.sharding.mesh, 8)[0] * mesh.mesh_shape(c.sharding.mesh, 8)[1] >= 1
paper.paper_config("iomm_b", "pretrain")
heavy = sorted(m for m in ("jax", "flax", "optax", "orbax", "tensorflow") if m in sys.modules)
print(heavy)
"""


def test_configs_import_no_jax():
  from tests.conftest import ROOT

  out = subprocess.run(
    [sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout
  assert out.strip().splitlines()[-1] == "[]", out
