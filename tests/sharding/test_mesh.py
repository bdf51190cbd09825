"""Mesh sizes, rules, batch checks and multi-process set-up: the parts that need no devices
(the multi-device runs are in ``test_multi_device.py``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from iomm_jax import runtime, sharding
from iomm_jax.configs import loading, specs
from iomm_jax.configs.base import get_base_config
from iomm_jax.models import layers


def cfg(mesh=(-1, 1, 1), batch=8, **kw):
  c = get_base_config()
  c.sharding.mesh = mesh
  c.train.batch_size = batch
  c.model.mllm_init = "random"
  for k, v in kw.items():
    loading.set_dotted(c, k, v)
  return c


@pytest.mark.parametrize(
  "mesh,n,want",
  [((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 2), 8, (2, 2, 2)), ((2, 4, 1), 8, (2, 4, 1)),
   ((1, 1, 1), 1, (1, 1, 1)), ((-1, 2, 1), 4, (2, 2, 1))],
)  # fmt: skip
def test_mesh_shape(mesh, n, want):
  assert sharding.mesh_shape(mesh, n) == want


@pytest.mark.parametrize(
  "mesh,n,match",
  [
    ((3, -1, 1), 8, r"config.sharding.mesh=\(3, -1, 1\) needs a multiple of 3 devices; there "
     r"are 8 devices"),
    ((2, 2, 1), 8, r"config.sharding.mesh=\(2, 2, 1\) uses 4 devices; there are 8 devices"),
    ((4, 4, 1), 8, r"config.sharding.mesh=\(4, 4, 1\) needs a multiple of 16 devices; there are "
     r"8 devices"),
    ((-1, -1, 1), 8, "at most one -1"),
    ((0, 1, 1), 8, "sizes must be positive"),
    ((8, 1), 8, "must have 3 entries"),
  ],
)  # fmt: skip
def test_bad_mesh_is_named(mesh, n, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(mesh, n)
  with pytest.raises(ValueError, match="config.sharding.mesh"):
    loading.validate(cfg(mesh), num_devices=n)


def test_batch_must_divide_over_data_and_fsdp():
  loading.validate(cfg((2, 2, 2), batch=4), num_devices=8)  # tensor does not split the batch
  with pytest.raises(
    ValueError,
    match=r"config.train.batch_size=4 does not divide over 8 devices \(the data x fsdp batch "
    r"shards of config.sharding.mesh=\(2, 4, 1\)",
  ):
    loading.validate(cfg((2, 4, 1), batch=4), num_devices=8)
  with pytest.raises(ValueError, match=r"batch_size=12 does not divide over 8 devices"):
    loading.validate(cfg((-1, 1, 1), batch=12), num_devices=8)


def test_processes_must_own_whole_batch_shards():
  loading.validate(cfg((1, 4, 1), batch=4), num_devices=4, num_processes=2)
  with pytest.raises(ValueError, match=r"split 1 ways .* not a multiple of the 2 processes"):
    loading.validate(cfg((1, 1, 4), batch=4), num_devices=4, num_processes=2)


def test_rules_from_json_lists_and_unknown_mesh_axis():
  c = cfg()
  c.sharding.logical_axis_rules = [["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["kv", None]]
  assert sharding.axis_rules(c) == (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("kv", None))
  c.sharding.logical_axis_rules = [["mlp", "model"]]
  with pytest.raises(ValueError, match="maps 'mlp' to unknown mesh axis 'model'"):
    sharding.axis_rules(c)


def test_mesh_axes_leave_non_dividing_dimensions_replicated():
  rules = sharding.axis_rules(cfg())
  sizes = {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.mesh_axes_for((256, 128), ("vocab", "embed"), rules, sizes) == P("tensor", "fsdp")
  assert sharding.mesh_axes_for((259, 128), ("vocab", "embed"), rules, sizes) == P(None, "fsdp")
  # batch takes fsdp first, so an activation's embed axis stays whole
  assert sharding.mesh_axes_for((8, 5, 64), layers.ACTIVATION, rules, sizes) == P(
    ("data", "fsdp"), None, None
  )
  assert sharding.mesh_axes_for((6, 5, 64), layers.ACTIVATION, rules, sizes) == P(None, None, None)


def test_logical_shardings_of_a_boxed_tree():
  mesh = sharding.single_device_mesh()
  rules = sharding.axis_rules(cfg())
  boxed = jax.eval_shape(
    lambda: {
      "w": nn.LogicallyPartitioned(jnp.zeros((4, 6)), ("embed", "mlp")),
      "count": jnp.zeros((), jnp.int32),
    }
  )
  sh = sharding.logical_shardings(boxed, mesh, rules)
  assert sh["w"].spec == P("fsdp", "tensor") and sh["count"].spec == P()
  target = sharding.abstract_target(boxed, sh)
  assert target["w"].shape == (4, 6) and target["w"].sharding == sh["w"]


def test_activation_constraint_is_identity_without_mesh_and_rules():
  x = jnp.ones((2, 3, 4))
  assert layers.with_logical_constraint(x, layers.ACTIVATION) is x
  with nn.logical_axis_rules(sharding.axis_rules(cfg())):
    assert layers.with_logical_constraint(x, layers.ACTIVATION) is x  # still no mesh


def test_initialize_distributed_from_the_environment(monkeypatch):
  for k in (
    *[runtime.COORDINATOR_ENV, runtime.NUM_PROCESSES_ENV, runtime.PROCESS_ID_ENV],
    runtime.AUTO_ENV,
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
  ):
    monkeypatch.delenv(k, raising=False)  # fmt: skip
  assert runtime.initialize_distributed() is False  # one process: nothing to join
  monkeypatch.setenv(runtime.NUM_PROCESSES_ENV, "1")
  monkeypatch.setenv(runtime.PROCESS_ID_ENV, "0")
  monkeypatch.setenv(runtime.COORDINATOR_ENV, "127.0.0.1:1")
  assert runtime.initialize_distributed() is False
  monkeypatch.delenv(runtime.COORDINATOR_ENV)
  monkeypatch.setenv(runtime.NUM_PROCESSES_ENV, "2")
  with pytest.raises(ValueError, match=r"missing: \['coordinator address'\]"):
    runtime.initialize_distributed()
  with pytest.raises(ValueError, match=r"process id 5 is not in \[0, 2\)"):
    runtime.initialize_distributed("127.0.0.1:1", process_id=5)
  monkeypatch.setenv("SLURM_NTASKS", "4")  # an allocation, but not inside an srun step
  monkeypatch.delenv(runtime.NUM_PROCESSES_ENV)
  monkeypatch.delenv(runtime.PROCESS_ID_ENV)
  assert runtime.initialize_distributed() is False


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizer_state_is_placed_like_its_parameters(name):
  from iomm_jax import optim
  from iomm_jax.train import steps

  c = cfg(**{"optim.name": name})
  opt, _ = optim.make_optimizer(specs.from_config(c).optim, 10)
  params = {
    "w": nn.LogicallyPartitioned(jnp.zeros((4, 6)), ("embed", "mlp")),
    "b": nn.LogicallyPartitioned(jnp.zeros((6,)), ("mlp",)),
  }
  boxed = jax.eval_shape(lambda: steps.create_state(params, opt))
  sh = sharding.logical_shardings(boxed, sharding.single_device_mesh(), sharding.axis_rules(c))
  unboxed = sharding.unbox(boxed)
  assert jax.tree_util.tree_structure(sh) == jax.tree_util.tree_structure(unboxed)
  placed = sharding.describe(sh)
  assert placed["params/w"] == placed["ema/w"] == ["fsdp", "tensor"] and placed["step"] == []
  moments = {k: v for k, v in placed.items() if k.startswith("opt_state") and k.endswith("/w")}
  assert moments and all(v == ["fsdp", "tensor"] for v in moments.values())
