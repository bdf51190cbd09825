"""``iomm-cache-features`` and training on its output (``config.data.features``).

On the same records and randomness, a step on cached float32 features makes the loss and update
of online encoding (pixel codec and a tiny VAE, stage 1 and a stage-2 mixed step) without reading
the ViT or VAE-encoder weights; a features run stopped by SIGTERM resumes bit-exactly; features of
other encoders or another image size are refused naming both values; the command resumes after an
interruption, splits over processes, never leaves a half-written shard under its final name, and
reports bytes per record.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from iomm_jax.assembly import context
from iomm_jax.cli import cache_features as cli
from iomm_jax.configs import specs
from iomm_jax.configs.loading import load_config
from iomm_jax.data import features, inputs, pipeline, prepare, records
from iomm_jax.data.inputs import InputError
from iomm_jax.train import cache, generator, loop, pretrain, steps
from tests.conftest import perturbed
from tests.data.test_sources import corrupt_record
from tests.train.test_faults import assert_trees_equal, saved_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXP = os.path.join(ROOT, "experiments", "shapes")
VAE = {"model.codec": "vae", "model.vae": "tiny"}
NUM_RECORDS = 9  # 3 shards of at most 4; record 1 is corrupt
PIXEL_BYTES = (36 * 128 + 12 * 12 * 12) * 4  # shapes MLLM tokens + 24 px pixel-codec latent, f32


def cfg(data: str, stage: str = "pretrain", **over):
  """The quick shapes config of ``stage`` on prepared folder ``data`` (random frozen MLLM)."""
  base = {
    "data.source": "array_record",
    "data.path": data,
    "model.mllm_init": "random",
    "sample.num_grid": 0,
    "optim.warmup_steps": 0,  # a nonzero learning rate at step 0: the update is compared
    "model.generator_overrides": "num_layers=1,num_single_layers=1",  # compiles faster
  }
  if stage == "finetune":
    base.update({"train.init_from": "scratch", "diffusion.mix_ratio": 0.5})
  return load_config(os.path.join(EXP, f"{stage}.py:quick"), {**base, **over})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
  """Noise images (6 of 9 captioned) prepared at 32 px, 4 records a shard, record 1 corrupt."""
  root = tmp_path_factory.mktemp("cache_data")
  src = root / "src"
  src.mkdir()
  rng = np.random.default_rng(0)
  for i in range(NUM_RECORDS):
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(src / f"{i:02d}.png")
    if i < 6:
      (src / f"{i:02d}.txt").write_text(f"a red circle above a blue square {i}")
  out = str(root / "prepared")
  opts = prepare.Options(resolution=32, min_size=16, records_per_shard=4)
  prepare.prepare(inputs.FolderSource(str(src)), out, opts, progress=False)
  corrupt_record(out, 1)
  return out


@pytest.fixture(scope="module")
def encoded(data, tmp_path_factory):
  """codec -> (features folder of ``data`` in float32 for the stage-1 config, the command's
  stdout); written once each, by the command line."""
  done = {}

  def get(codec: str):
    if codec not in done:
      out = str(tmp_path_factory.mktemp(f"features_{codec}"))
      extra = ["--config.model.codec=vae", "--config.model.vae=tiny"] if codec == "vae" else []
      argv = [
        "--config", f"{EXP}/pretrain.py:quick", "--config.model.mllm_init=random", *extra,
        "--data", data, "--out", out, "--dtype", "float32", "--batch-size", "3", "--no-progress",
      ]  # fmt: skip
      buf = io.StringIO()
      with contextlib.redirect_stdout(buf):
        assert cli.main(argv) == 0
      done[codec] = (out, buf.getvalue())
    return done[codec]

  return get


def _nan_encoders(frozen):
  """``frozen`` with the ViT, projector and codec weights all NaN (the decoder untouched)."""
  nan = lambda t: jax.tree.map(lambda x: x * np.nan, t)
  mllm = dict(frozen["mllm"])
  for k in cache.VISION_PARAMS:
    mllm[k] = nan(mllm[k])
  return {"mllm": mllm, "codec": nan(frozen["codec"])}


def _first_mixed(online, cached, stage: str):
  """The first pair of batches (online, cached), or in stage 2 the first mixed one."""
  for _ in range(8):
    a, b = next(online), next(cached)
    if stage == "pretrain" or 0 < a["is_image_only"].sum() < len(a["is_image_only"]):
      return a, b
  raise AssertionError("no mixed stage-2 batch in 8")


CASES = [
  pytest.param("pretrain", "pixel", "mean", id="stage1-pixel"),
  pytest.param("finetune", "vae", "sample", id="stage2-vae-sampled-latent"),
  pytest.param("pretrain", "vae", "mean", id="stage1-vae", marks=pytest.mark.slow),
  pytest.param("finetune", "pixel", "mean", id="stage2-pixel", marks=pytest.mark.slow),
  pytest.param("pretrain", "vae", "sample", id="stage1-vae-sampled", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("stage,codec,latent", CASES)
def test_a_step_on_cached_features_matches_online_encoding(data, encoded, stage, codec, latent):
  over = {**(VAE if codec == "vae" else {}), "data.vae_latent": latent}
  online_cfg = cfg(data, stage, **over)
  cached_cfg = cfg(data, stage, **over, **{"data.features": encoded(codec)[0]})
  ctx = context.build(online_cfg)
  on, ca = _first_mixed(
    iter(pipeline.make_dataset(specs.from_config(online_cfg), ctx.conditioner)),
    iter(pipeline.make_dataset(specs.from_config(cached_cfg), ctx.conditioner)),
    stage,
  )
  arrays = {"vision", "latent_mean"} | ({"latent_std"} if codec == "vae" else set())
  assert set(ca) == set(on) - {"image"} | arrays
  for k in ("cond_ids", "cond_valid", "is_image_only"):  # the same records, the same draws
    np.testing.assert_array_equal(on[k], ca[k])
  np.testing.assert_array_equal(on.pop("data_skipped"), ca.pop("data_skipped"))
  cond_len, n = ctx.conditioner.cond_len, len(ca["cond_ids"])
  for batch, dtype in ((on, None), (ca, "float32")):  # what planning (iomm-plan) assumes
    want = generator.abstract_batch(ctx.model, n, cond_len, dtype)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (v.shape, v.dtype) for k, v in want.items()
    }
  optimizer, step = generator.make_step(online_cfg, ctx.model, *ctx.conditioner.null_condition())
  init = generator.init_fn(ctx.model, online_cfg, ctx.conditioner.cond_len)
  state = steps.create_state(perturbed(jax.jit(lambda: nn.meta.unbox(init()))(), 0.02), optimizer)
  step, rng = jax.jit(step), jax.random.key(3)
  s_on, m_on = step(state, on, ctx.frozen, rng)
  s_ca, m_ca = step(state, ca, ctx.frozen, rng)
  assert float(m_on["loss"]) > 0 and float(m_on["lr"]) > 0
  np.testing.assert_allclose(m_ca["loss"], m_on["loss"], rtol=1e-5)
  for k in ("grad_norm", "update_norm"):
    np.testing.assert_allclose(m_ca[k], m_on[k], rtol=1e-4)
  # Adam's first update is lr * g / (|g| + eps): where g is rounding noise (|g| <~ eps, e.g. the
  # adaLN-Zero weights) fp32 noise moves it by a share of lr, so the update is compared as a whole
  upd = lambda s: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), s.params, state.params)
  u_on = np.concatenate([u.ravel() for u in jax.tree.leaves(upd(s_on))])
  u_ca = np.concatenate([u.ravel() for u in jax.tree.leaves(upd(s_ca))])
  assert np.linalg.norm(u_ca - u_on) < 1e-3 * np.linalg.norm(u_on)
  assert np.mean(np.isclose(u_ca, u_on, rtol=1e-3, atol=1e-3 * float(m_on["lr"]))) > 0.999
  # the cached step reads no encoder weight: NaN ViT, projector and codec change nothing
  _, m_nan = step(state, ca, _nan_encoders(ctx.frozen), rng)
  assert float(m_nan["loss"]) == float(m_ca["loss"])


def test_a_features_run_resumes_bit_exactly(data, encoded, tmp_path):
  c = cfg(data, **{
    "data.features": encoded("pixel")[0], "train.num_steps": 4, "train.ckpt_every": 2,
    "train.log_every": 1,
  })  # fmt: skip
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  pretrain.train_and_evaluate(c, straight)
  run_ = pretrain.setup(c, stopped)
  inner, calls = run_.train_step, []

  def preempted_at_step_3(*args):  # SIGTERM arrives during step 3
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return inner(*args)

  run_.train_step = preempted_at_step_3
  with pytest.raises(loop.Preempted, match="saved step 3"):
    loop.run(run_)
  pretrain.train_and_evaluate(c, stopped)  # the same run again: resumes at 3
  assert_trees_equal(saved_state(straight, 4), saved_state(stopped, 4))
  data_state = lambda w: json.load(
    open(os.path.join(w, "checkpoints", "4", "data", "process_0-of-1.json"))
  )
  assert data_state(straight) == data_state(stopped)


def test_fingerprints_see_every_value_position_name_and_dtype():
  a = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
  tree = {"a": a, "b": jnp.ones((2,), jnp.bfloat16), "c": jnp.array(True)}
  f = cache.fingerprint(tree)
  assert f == cache.fingerprint(jax.tree.map(jnp.copy, tree)) and len(f) == 16
  for other in (
    {**tree, "a": a.at[2, 3].add(1e-6)},  # one ulp-sized change
    {**tree, "a": a.at[0, 0].set(1.0).at[0, 1].set(0.0)},  # two values swapped
    {**tree, "a": a.reshape(4, 3)},
    {**tree, "b": tree["b"].astype(jnp.float32)},
    {"z": a, "b": tree["b"], "c": tree["c"]},  # another name
  ):
    assert cache.fingerprint(other) != f
  assert cache.fingerprint(tree, "another architecture") != f


def test_features_of_other_encoders_are_refused_naming_both(data, encoded, tmp_path):
  pixel, vae = encoded("pixel")[0], encoded("vae")[0]
  with pytest.raises(ValueError) as e:  # other ViT weights (a random MLLM of another seed)
    pretrain.setup(cfg(data, **{"data.features": pixel, "seed": 1}), str(tmp_path / "a"))
  msg = str(e.value)
  assert isinstance(e.value, cache.FeaturesError)  # iomm-train: this line, exit status 2
  assert "\n" not in msg and f"config.data.features={pixel!r}" in msg
  assert "ViT + projector fingerprint" in msg and "config.seed=0" in msg and "config.seed=1" in msg
  for over, needles in [
    ({"model.image_size": 32, "data.canvas": 32}, ["config.model.image_size=32", "image size 24"]),
    ({}, ["latent shape [12, 12, 4]", "config.model.codec='pixel'", "[12, 12, 12]"]),
  ]:
    c = cfg(data, **{"data.features": vae, **over})
    ctx = context.build(c)
    with pytest.raises(ValueError) as e:
      cache.check_run(c, ctx.model, ctx.frozen)
    assert all(n in str(e.value) for n in needles), str(e.value)
  c = cfg(data, **{"data.features": vae, **VAE})
  ctx = context.build(c)
  assert cache.check_run(c, ctx.model, ctx.frozen)["num_records"] == NUM_RECORDS
  c = cfg(data, **{"data.features": "/nowhere", **VAE})
  with pytest.raises(cache.FeaturesError, match="config.data.features='/nowhere' is not a"):
    cache.check_run(c, ctx.model, ctx.frozen)


def test_the_command_resumes_and_splits_over_processes(data, encoded, tmp_path):
  straight, _ = encoded("pixel")
  c, out = cfg(data), str(tmp_path / "split")
  names = [records.shard_name(s, 3) for s in range(3)]

  def stop(shard):
    raise KeyboardInterrupt(f"after shard {shard}")

  with pytest.raises(KeyboardInterrupt):  # process 0 of 2 (shards 0 and 2), stopped after 0
    cache.cache_features(c, data, out, "float32", 3, 2, 0, progress=False, after_shard=stop)
  assert sorted(n for n in os.listdir(out) if n.endswith(".array_record")) == [names[0]]
  first = os.stat(os.path.join(out, names[0]))
  written = []
  assert cache.cache_features(c, data, out, "float32", 3, 2, 0, False, written.append) is None
  assert written == [2]  # shard 0 was kept
  again = os.stat(os.path.join(out, names[0]))
  assert (again.st_mtime_ns, again.st_ino) == (first.st_mtime_ns, first.st_ino)
  manifest = cache.cache_features(c, data, out, "float32", 3, 2, 1, progress=False)
  with open(os.path.join(straight, features.MANIFEST)) as f:
    assert manifest == json.load(f)  # the last process wrote the single process's manifest
  for n in names:
    with open(os.path.join(out, n), "rb") as a, open(os.path.join(straight, n), "rb") as b:
      assert a.read() == b.read()
  with pytest.raises(InputError, match=r"dtype differ; see .*features.json"):  # other settings
    cache.cache_features(c, data, out, "bfloat16", 3, progress=False)


def test_an_interruption_inside_a_shard_leaves_no_finished_shard(data, tmp_path, monkeypatch):
  c, out, real, calls = cfg(data), str(tmp_path / "o"), features.encode_record, []

  def dies(*args):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args)

  monkeypatch.setattr(features, "encode_record", dies)
  with pytest.raises(KeyboardInterrupt):
    cache.cache_features(c, data, out, "float32", 1, progress=False)
  names = os.listdir(out)
  assert not any(n.endswith(".array_record") for n in names) and features.MANIFEST not in names
  assert any(".tmp-" in n for n in names)
  monkeypatch.undo()
  m = cache.cache_features(c, data, out, "float32", 3, progress=False)
  assert not any(".tmp-" in n for n in os.listdir(out))  # the stale temporary was removed
  assert (m["num_records"], m["num_bad"], m["num_captioned"]) == (NUM_RECORDS, 1, 5)


def test_the_command_reports_bytes_per_record_and_names_bad_input(data, encoded, tmp_path, capsys):
  out, stdout = encoded("pixel")
  with open(os.path.join(out, features.MANIFEST)) as f:
    m = json.load(f)
  assert m["feature_bytes_per_record"] == PIXEL_BYTES
  assert m["stored_bytes_per_record"] >= PIXEL_BYTES
  assert f"bytes per record: {PIXEL_BYTES:,} of features" in stdout
  assert f"{m['stored_bytes_per_record']:,} stored" in stdout and "1 undecodable" in stdout
  assert f"--config.data.features={out}" in stdout
  exp = ["--config", f"{EXP}/pretrain.py:quick", "--config.model.mllm_init=random"]
  new = str(tmp_path / "new")
  for argv, needle in [
    ([*exp, "--data", data], "--out"),
    ([*exp, "--out", new], "--data"),  # the shapes config names no prepared folder
    ([*exp, "--data", "/nowhere", "--out", new], "--data='/nowhere'"),
    ([*exp, "--data", data, "--out", new, "--config.model.nope=1"], "model.nope"),
    ([*exp, "--data", data, "--out", new, "--dtype", "float16"], "--dtype"),
    ([*exp, "--data", data, "--out", new, "--batch-size", "0"], "--batch-size"),
    ([*exp, "--data", data, "--out", new, "--num-processes", "2", "--process-index", "2"],
     "--process-index"),
    (["--config", "nope.py", "--data", data, "--out", new], "nope.py"),
    (["--workdir", str(tmp_path), "--data", data, "--out", new], "config.json"),
  ]:  # fmt: skip
    with pytest.raises(SystemExit) as e:
      cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err.splitlines()[-1], (argv, err)
  assert not os.path.exists(os.path.join(new, features.MANIFEST))
  # IOMM-B at 512 px from the shapes alone (docs/PERF.md)
  assert cli.main(["--config", "experiments/iomm_b/pretrain.py", "--shapes-only"]) == 0
  text = capsys.readouterr().out
  assert "vision 256x1536 bfloat16 (786,432 B)" in text and "latent_std 64x64x16" in text
  assert "bytes per record: 1,048,576 of features (1.000 MiB) at 512 px" in text
