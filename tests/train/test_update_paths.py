"""How an update is made: gradient accumulation (k micro-batches of B / k = one batch of B), runs
without an EMA copy (``train.ema_decay = 0``: trains, resumes, samples, exports) and the
throughput figures of metrics.jsonl (samples/s, TFLOP/s per device from XLA's count, MFU)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iomm_jax import metrics, perf
from iomm_jax.assembly import context
from iomm_jax.cli import convert
from iomm_jax.configs import loading, specs
from iomm_jax.configs.loading import load_config
from iomm_jax.data import pipeline
from iomm_jax.models import iomm
from iomm_jax.train import pretrain, steps

EXP = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "experiments", "shapes"
)


def cfg(name, **overrides):
  return load_config(os.path.join(EXP, f"{name}.py:quick"), overrides)


# ----------------------------------------------------------------------------- accumulation


def test_k_micro_batches_make_the_update_of_one_batch():
  """One real stage-2 step (image-only and text rows) with 1 and with 4 micro-batches on the
  same batch, parameters and rng: the same loss, aux, gradient norm and update.

  The optimiser is SGD with learning rate 1, so the update is minus the gradient, compared
  element by element. (Under Adam, the first update of a leaf whose exact gradient is zero,
  such as the attention key bias, is the sign of its float rounding noise, whatever the
  accumulation: that would compare noise, not the accumulation.)"""
  small = {"model.generator_overrides": "num_layers=1,num_single_layers=1"}  # compiles faster
  c = cfg("finetune", **{"model.mllm_init": "random", "train.init_from": "scratch", **small})
  c.train.batch_size = 8
  ctx = context.build(c)
  null = [jnp.asarray(a) for a in ctx.conditioner.null_condition()]
  loss_fn = steps.generator_loss_fn(ctx.model, specs.from_config(c), *null)
  shapes = jax.eval_shape(lambda: iomm.init_trainable(ctx.model, 0, ctx.conditioner.cond_len))
  rng = np.random.default_rng(0)  # random values of every parameter (no init to compile)
  params = jax.tree_util.tree_map(
    lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), nn.meta.unbox(shapes)
  )
  batch = next(iter(pipeline.make_dataset(specs.from_config(c), ctx.conditioner)))
  assert 0 < float(np.mean(batch["is_image_only"])) < 1  # both kinds of rows in the batch
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  sgd = optax.sgd(1.0)
  out = {}
  for k in (1, 4):
    step = steps.make_train_step(loss_fn, sgd, optax.constant_schedule(1.0), 0.9, False, k)
    new, m = jax.jit(step)(steps.create_state(params, sgd), batch, ctx.frozen, jax.random.key(3))
    update = jax.tree_util.tree_map(lambda n, p: n - p, new.params, params)
    out[k] = jax.device_get((m, update))
  (m1, u1), (m4, u4) = out[1], out[4]
  for key in ("loss", "loss_image_only", "loss_pair", "kept_token_share", "grad_norm"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, err_msg=key)
  scale = max(float(np.max(np.abs(u))) for u in jax.tree_util.tree_leaves(u1))
  assert scale > 1e-3  # the update is not zero
  for a, b in zip(jax.tree_util.tree_leaves(u4), jax.tree_util.tree_leaves(u1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


def test_micro_batches_are_interleaved_rows():
  x = jnp.arange(12).reshape(6, 2)
  micro = steps.split_micro_batches({"x": x}, 3)["x"]
  assert micro.shape == (3, 2, 2)
  np.testing.assert_array_equal(micro[1], x[1::3])
  with pytest.raises(ValueError, match="does not split into 4"):
    steps.split_micro_batches({"x": x}, 4)


def test_loss_without_a_draw_folds_in_the_micro_batch():
  """A loss without ``draw`` (stage 0's, a user's) still accumulates: each micro-batch gets its
  own key, and a deterministic loss gives the one-batch update."""

  def loss(params, frozen, batch, rng):
    del frozen, rng
    return jnp.mean((batch["x"] @ params["w"]) ** 2), {"n": jnp.float32(batch["x"].shape[0])}

  params = {"w": jnp.linspace(-1, 1, 12).reshape(4, 3)}
  batch = {"x": jnp.linspace(0, 2, 32).reshape(8, 4)}
  (l1, _), g1 = jax.value_and_grad(loss, has_aux=True)(params, None, batch, jax.random.key(0))
  (l4, aux), g4 = steps.accumulated_value_and_grad(loss, 4)(params, None, batch, jax.random.key(0))
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  np.testing.assert_allclose(g4["w"], g1["w"], rtol=1e-5)
  assert float(aux["n"]) == 2.0  # aux: the micro-batches' mean


def test_grad_accum_config_errors_name_the_keys():
  c = cfg("pretrain", **{"model.mllm_init": "random", "train.grad_accum": 3})
  c.train.batch_size = 8
  with pytest.raises(ValueError, match=r"config.train.batch_size=8 with config.train.grad_accum=3"):
    loading.validate(c, 1)
  c.train.grad_accum = 0
  with pytest.raises(ValueError, match="config.train.grad_accum=0 must be an integer >= 1"):
    loading.validate(c, 1)
  c.train.grad_accum = 4  # micro-batches of 2 rows do not split over 4 data shards
  with pytest.raises(ValueError, match="divides over the 4 data x fsdp"):
    loading.validate(c, 4)


# ----------------------------------------------------------------------------- no EMA


@pytest.fixture(scope="module")
def no_ema_run(quick_mllm, tmp_path_factory):
  """A quick stage-1 run through the real loop with no EMA copy and 2 micro-batches per update;
  also records the micro-batch counts the step was built with."""
  wd = str(tmp_path_factory.mktemp("no_ema") / "pretrain")
  over = {"model.mllm_from": quick_mllm[0], "train.ema_decay": 0.0, "train.grad_accum": 2}
  seen = []
  real = steps.accumulated_value_and_grad
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(steps, "accumulated_value_and_grad", lambda fn, k: seen.append(k) or real(fn, k))
    pretrain.train_and_evaluate(cfg("pretrain", **over), wd)
  return wd, cfg("pretrain", **over), seen


def test_no_ema_run_keeps_no_copy_and_resumes(no_ema_run):
  wd, c, _ = no_ema_run
  meta = os.path.join(wd, "checkpoints", str(c.train.num_steps), "state", "_METADATA")
  with open(meta) as f:
    tree = json.load(f)["tree_metadata"]
  saved = [
    k
    for k, v in tree.items()
    if k.startswith("('ema'") and v["value_metadata"]["value_type"] != "None"
  ]
  params = [k for k in tree if k.startswith("('params'")]
  assert params and not saved, saved[:3]  # parameters saved, no EMA array at all
  ctx = context.build(c)
  cond_len = ctx.conditioner.cond_len
  boxed = jax.eval_shape(lambda: iomm.init_trainable(ctx.model, 0, cond_len))
  ema = context.restore_params(wd, boxed, which="ema")
  params = context.restore_params(wd, boxed, which="params")
  for a, b in zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  c2 = cfg("pretrain", **{"model.mllm_from": c.model.mllm_from, "train.ema_decay": 0.0})
  c2.train.num_steps = c.train.num_steps + 2  # resume past the end: two more steps
  c2.sample.num_grid = 0
  pretrain.train_and_evaluate(c2, wd)
  assert metrics.read_metrics(wd)[-1]["step"] == c2.train.num_steps


def test_no_ema_run_exports(no_ema_run, tmp_path):
  wd, _, _ = no_ema_run
  out = str(tmp_path / "export")
  assert convert.main(["export-torch", "--workdir", wd, "--out", out, "--ema"]) == 0
  assert os.path.exists(os.path.join(out, "transformer", "config.json"))
  with open(os.path.join(out, "source.json")) as f:
    assert json.load(f)["weights"] == "params"  # no EMA was kept: the parameters went out


def test_plan_counts_no_ema_bytes():
  from iomm_jax.train import plan

  c = cfg("pretrain", **{"model.mllm_init": "random", "train.ema_decay": 0.0})
  c.sharding.mesh = (1, 1, 1)
  r = plan.plan(c, compile=False)
  assert r["bytes_per_device"]["ema"] == 0
  c.train.ema_decay = 0.9
  assert plan.plan(c, compile=False)["bytes_per_device"]["ema"] == r["bytes_per_device"]["params"]


# ----------------------------------------------------------------------------- throughput


def test_metrics_carry_throughput(no_ema_run):
  wd, c, _ = no_ema_run
  recs = metrics.read_metrics(wd)
  last = recs[-1]
  np.testing.assert_allclose(last["samples_per_s"], last["steps_per_s"] * c.train.batch_size)
  assert last["tflops_per_device"] > 0
  assert "mfu" not in last  # a CPU has no entry in the peak table and none was configured


def test_step_flops_are_per_device_and_mfu_uses_the_peak():
  f = jax.jit(lambda a, b: a @ b)
  x = jnp.ones((64, 32))
  np.testing.assert_allclose(perf.step_flops(f, x, jnp.ones((32, 16))), 2 * 64 * 32 * 16, rtol=0.01)
  assert perf.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert perf.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert perf.peak_tflops("TPU v5 lite") == 197.0
  assert perf.peak_tflops("cpu") is None
  assert perf.peak_tflops("cpu", configured=2.0) == 2.0
  t = perf.throughput(2.0, 16, 5e12, 100.0)
  assert t == {"samples_per_s": 32.0, "tflops_per_device": 10.0, "mfu": 0.1}
  assert perf.throughput(2.0, 16, None, 100.0) == {"samples_per_s": 32.0}


def test_configured_peak_gives_mfu(tmp_path):
  sink = open(os.devnull, "w")
  logger = metrics.MetricsLogger(
    str(tmp_path), 10, tensorboard=False, batch_size=4, peak_tflops=1.0, stream=sink
  )
  logger.set_step_flops(1e9)
  host = logger.log(1, {"loss": 1.0})
  np.testing.assert_allclose(host["mfu"], host["tflops_per_device"] / 1.0)
  assert "MFU" in logger.progress_line(1, host)
  logger.close()
  sink.close()


def test_the_stage_loop_accumulates(no_ema_run):
  """``train.grad_accum`` reaches the stage loop's step, and the run trains."""
  wd, c, seen = no_ema_run
  assert seen == [2]
  assert all(np.isfinite(r["loss"]) for r in metrics.read_metrics(wd))


def test_switching_ema_on_or_off_resumes(tmp_path):
  """A checkpoint that holds an EMA copy (an older version saved one even with ema_decay = 0)
  resumes and restores under ``ema_decay = 0``, and one without resumes under ``ema_decay > 0``
  (the EMA then starts from the parameters)."""
  from tests.train.test_faults import saved_state, toy_config, toy_run

  wd = str(tmp_path / "toy")
  r = toy_run(toy_config(**{"train.num_steps": 3, "train.ema_decay": 0.9}), wd)
  assert r.state.ema is not None
  # as if written by a version that kept a copy under ema_decay = 0: config says 0, disk has one
  path = os.path.join(wd, "config.json")
  with open(path) as f:
    saved = json.load(f)
  saved["train"]["ema_decay"] = 0.0
  with open(path, "w") as f:
    json.dump(saved, f)
  boxed = {"w": jax.ShapeDtypeStruct((128, 128), jnp.float32)}
  np.testing.assert_array_equal(
    context.restore_params(wd, boxed, which="ema")["w"], saved_state(wd, 3)["params"]["w"]
  )
  r = toy_run(toy_config(**{"train.num_steps": 5, "train.ema_decay": 0.0}), wd)
  assert r.state.ema is None and int(r.state.step) == 5
  r = toy_run(toy_config(**{"train.num_steps": 7, "train.ema_decay": 0.9}), wd)
  assert r.state.ema is not None and int(r.state.step) == 7
  assert "ema" in saved_state(wd, 7)
