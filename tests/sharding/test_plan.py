"""``iomm-plan``: the stage-1 train step planned on fake CPU devices (one subprocess per plan,
since the device count is fixed when JAX starts), and its flag errors (in-process)."""

import json
import math
import os
import subprocess
import sys

import pytest

from iomm_jax.cli import plan as plan_cli
from iomm_jax.configs import specs
from iomm_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = os.path.join(ROOT, "experiments", "shapes", "pretrain.py")
FIELDS = {
  "stage", "generator", "mllm", "image_size", "mesh", "devices", "platform", "jax", "batch",
  "batch_per_shard", "grad_accum", "micro_batch_per_shard", "cond_len", "remat", "attention",
  "optimizer", "params", "bytes_per_device",
  "xla", "total_per_device", "budget_bytes", "fits", "compile_s", "notes", "config",
}  # fmt: skip
BYTES = {"params", "ema", "opt_state", "frozen", "batch", "state_and_inputs"}
XLA = {"argument", "output", "alias", "temp", "generated_code"}


def start(*args: str) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "iomm_jax.cli.plan", "--config", SHAPES, "--json", *args]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*procs: subprocess.Popen, timeout: float = 900) -> list[dict]:
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=timeout)
      if p.returncode:
        pytest.fail(f"iomm-plan {p.args[3:]} failed ({p.returncode}):\n{stderr[-4000:]}")
      out.append(json.loads(stdout))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return out


@pytest.fixture(scope="module")
def shardings_only():
  """Byte counts without compiling, on meshes (8, 1, 1) and (2, 2, 2)."""
  procs = [start("--mesh", m, "--no-compile") for m in ("data=8", "data=2,fsdp=2,tensor=2")]
  return finish(*procs)


COMPILED = ("--mesh", "data=2,fsdp=2,tensor=2", "--batch", "32")  # 8 rows per batch shard


@pytest.fixture(scope="module")
def compiled():
  """The step compiled on (2, 2, 2) with remat "block" (~1 min on 2 CPU cores)."""
  return finish(start(*COMPILED, "--remat", "block"))[0]


def test_param_bytes_shrink_with_fsdp_as_the_shardings_say(shardings_only):
  dp, mixed = shardings_only
  assert dp["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert mixed["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dp["params"] == mixed["params"]
  n = dp["params"]["trainable_total"]
  # pure data parallelism: every device holds all float32 parameters, EMA and both Adam moments
  b = dp["bytes_per_device"]
  assert b["params"] == b["ema"] == 4 * n
  assert 2 * 4 * n <= b["opt_state"] <= 2 * 4 * n + 64  # mu, nu and int32 step counts
  frozen_dp = b["frozen"]
  assert frozen_dp == 4 * dp["params"]["frozen_total"]  # the tiny MLLM is float32
  # (2, 2, 2): split over fsdp (embed) and tensor (mlp, heads, ...) where the sizes divide; never
  # below a quarter, and most parameters are split
  m = mixed["bytes_per_device"]
  assert 4 * n / 4 <= m["params"] < 4 * n / 2
  assert m["ema"] == m["params"]
  assert m["opt_state"] - 2 * m["params"] == b["opt_state"] - 2 * b["params"]  # the counts
  assert frozen_dp / 4 <= m["frozen"] < frozen_dp / 2
  # the batch is split over data x fsdp: 8 ways on (8, 1, 1), 4 on (2, 2, 2)
  assert b["batch"] * 8 == m["batch"] * 4
  assert dp["xla"] is None and dp["fits"] is None


def test_param_bytes_match_the_parameter_shapes(shardings_only):
  """Exact arithmetic on (2, 2, 2) from the tiny model's parameter shapes and the rules."""
  import flax.linen as nn
  import jax

  from iomm_jax import sharding
  from iomm_jax.configs.loading import load_config
  from iomm_jax.models import iomm
  from iomm_jax.train import plan

  c = load_config(SHAPES)
  layout = plan.token_layout(c)
  model = iomm.build(specs.from_config(c).model, layout.vocab_size, layout.image_token_id)
  boxed = jax.eval_shape(lambda: iomm.init_trainable(model, 0, layout.cond_len))
  rules, sizes = sharding.axis_rules(c), {"data": 2, "fsdp": 2, "tensor": 2}
  want = 0
  for leaf, spec in zip(
    jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)),
    jax.tree_util.tree_leaves(
      nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    ),
  ):
    shape = leaf.value.shape
    axes = sharding.mesh_axes_for(shape, tuple(spec), rules, sizes)
    split = [math.prod(sizes[a] for a in (ax if isinstance(ax, tuple) else (ax,))) if ax else 1
             for ax in tuple(axes) + (None,) * (len(shape) - len(axes))]  # fmt: skip
    want += 4 * math.prod(d // s for d, s in zip(shape, split))
  assert shardings_only[1]["bytes_per_device"]["params"] == want


def test_json_has_every_field_and_xla_counts_the_same_arguments(compiled):
  for r in [compiled]:
    assert set(r) == FIELDS
    assert set(r["bytes_per_device"]) == BYTES and set(r["xla"]) == XLA
    x, b = r["xla"], r["bytes_per_device"]
    # XLA's arguments: the state, batch and frozen weights (+ the 8-byte rng key), less what the
    # step never reads (the frozen MLLM's lm_head is unused by stages 1-2 and pruned)
    assert 0.9 * b["state_and_inputs"] < x["argument"] <= b["state_and_inputs"]
    assert x["alias"] > 0.99 * (b["params"] + b["ema"] + b["opt_state"])  # donated state
    resident = b["state_and_inputs"]  # also the pruned frozen weights: they stay on device
    live = resident + x["output"] - x["alias"] + x["temp"] + x["generated_code"]
    assert r["total_per_device"] == live
    assert r["fits"] is True and r["budget_bytes"] == 80 * 2**30
    assert r["platform"] == "cpu" and any("CPU-backend" in n for n in r["notes"])
    assert r["batch"] == 32 and r["batch_per_shard"] == 8


@pytest.mark.slow
def test_remat_reduces_the_temporaries(compiled):
  """The same step without remat (one more compile): more XLA temporaries, same state."""
  none, block = finish(start(*COMPILED, "--remat", "none"))[0], compiled
  assert (none["remat"], block["remat"]) == ("none", "block")
  assert none["bytes_per_device"] == block["bytes_per_device"]
  assert block["xla"]["temp"] < 0.8 * none["xla"]["temp"]


def test_remat_choices_match_the_policies():
  assert plan_cli.REMAT == tuple(layers.REMAT_POLICIES)


@pytest.mark.parametrize(
  "args,flag,match",
  [
    (["--mesh", "model=8"], "--mesh", "unknown mesh axis 'model'"),
    (["--mesh", "data=two"], "--mesh", "not AXIS=SIZE"),
    (["--mesh", "data=0"], "--mesh", "must be a positive size"),
    (["--mesh", "data=2,fsdp=2", "--devices", "8"], "--mesh", "has 4 devices"),
    (["--mesh", "data=8", "--batch", "12"], "--batch", "12 does not divide over the 8 batch"),
    (["--mesh", "data=3"], "--batch", "the config's batch 8 does not divide over the 3"),
    (["--mesh", "data=8", "--config.model.nope=1"], "--config.model.nope", "unknown config key"),
    (["--mesh", "data=8", "--config.train.batch_size=x"], "--config.train.batch_size", "x"),
    (["--mesh", "data=8", "--remat", "all"], "--remat", "invalid choice"),
    (["--mesh", "data=8", "--stray"], "", "unrecognized arguments: --stray"),
  ],
)  # fmt: skip
def test_bad_flags_exit_2_naming_the_flag(args, flag, match, capsys):
  with pytest.raises(SystemExit) as e:
    plan_cli.main(["--config", SHAPES, *args])
  assert e.value.code == 2
  err = capsys.readouterr().err
  if flag:
    assert f"argument {flag}" in err
  assert match in err


def test_bad_config_file_exits_2():
  with pytest.raises(SystemExit) as e:
    plan_cli.main(["--config", "experiments/nope.py", "--mesh", "data=1"])
  assert e.value.code == 2
