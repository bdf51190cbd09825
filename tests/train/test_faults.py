"""Faults a run survives: kill -9, SIGTERM, a crash during a checkpoint write, a corrupt
checkpoint, non-finite losses, a full disk, and rerunning the same command after each.

Process-level faults hit real ``iomm-train`` processes on the stage-1 quick config; the rest run
the real step loop, train step and checkpointer in-process on a toy model (a linear map, compiled
in well under a second), so they stay cheap.
"""

import errno
import glob
import json
import os
import resource
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from iomm_jax import PREEMPTED_EXIT_CODE, checkpointing, metrics, sharding
from iomm_jax.assembly import workdirs
from iomm_jax.configs import loading, specs
from iomm_jax.configs.loading import load_config
from iomm_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXP = os.path.join(ROOT, "experiments", "shapes")


# ----------------------------------------------------------------------------- a toy run

D = 128  # toy width: params D x D, ~64 KiB, ~200 KiB of state with Adam's moments and the EMA
B = 4


class ToyBatch(grain.transforms.Map):
  """Batch ``i`` (step i + 1) of a fixed regression problem; NaN inputs from step ``nan_from``."""

  def __init__(self, nan_from: int = 0):
    self.nan_from = nan_from

  def map(self, i):
    x = np.random.default_rng(int(i)).standard_normal((B, D)).astype(np.float32)
    if self.nan_from and i + 1 >= self.nan_from:
      x[0, 0] = np.nan
    return {"x": x}


def toy_loss(params, frozen, batch, rng):
  del frozen
  x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)  # randomness from fold_in
  return jnp.mean((x @ params["w"] - jnp.roll(x, 1, axis=-1)) ** 2), {}


def toy_config(**overrides):
  over = {"model.mllm_init": "random", "train.batch_size": B, "train.log_every": 100}
  return load_config(os.path.join(EXP, "pretrain.py:quick"), {**over, **overrides})


def toy_run(config, workdir, batches=None):
  """The real ``restore_or_init`` and step loop around the toy model (``batches``: a
  ``ToyBatch``); returns the finished ``loop.Run``."""
  workdirs.prepare_workdir(config, workdir)
  mesh, rules = sharding.single_device_mesh(), ()
  ds = grain.MapDataset.range(10**6).map(batches or ToyBatch())
  data_iter = iter(ds.to_iter_dataset())
  optimizer, step = loop.make_train_step(
    toy_loss, specs.from_config(config), config.train.num_steps
  )
  init = lambda: {"w": 0.1 * jax.random.normal(jax.random.key(config.seed), (D, D))}
  state, state_sh, ckpt, start = loop.restore_or_init(
    config, workdir, init, optimizer, data_iter, mesh, rules
  )
  meta = {"stage": config.stage, "model": checkpointing.model_signature(config)}
  train_step = sharding.jit_step(step, mesh, rules, state_sh, None)
  run_ = loop.Run(config, workdir, state, None, data_iter, train_step, ckpt, meta, None, start)
  loop.run(run_)
  return run_


def saved_state(workdir, step):
  """The raw saved train state of ``step`` as numpy arrays (no target: exactly what is on disk)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as c:
    return jax.tree_util.tree_map(np.asarray, c.restore(path))


def assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and np.array_equal(x, y), "leaves differ"


def listing(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def tree_files(path):
  return {
    os.path.relpath(os.path.join(r, f), path): os.path.getsize(os.path.join(r, f))
    for r, _, fs in os.walk(path)
    for f in fs
  }


# ----------------------------------------------------------------------------- non-finite


def test_nonfinite_updates_are_skipped_then_stop_after_exactly_max(tmp_path):
  wd = str(tmp_path / "nan")
  # NaN from step 5: steps 5, 6, 7 are skipped and the third stops the run (log_every=100,
  # so the stop does not wait for a log step).
  c = toy_config(**{"train.num_steps": 12, "train.ckpt_every": 2, "train.max_nonfinite": 3})
  with pytest.raises(FloatingPointError) as err:
    toy_run(c, wd, ToyBatch(nan_from=5))
  msg = str(err.value)
  assert "3 non-finite updates in a row at step 7" in msg
  assert "config.train.max_nonfinite=3" in msg and wd in msg
  # 6 was saved mid-streak (2 skipped); nothing at or after the limit (step 7) was
  assert listing(wd) == ["4", "6"]
  s4, s6 = saved_state(wd, 4), saved_state(wd, 6)
  assert int(s6["nonfinite"]) == 2 and int(s6["step"]) == 6
  assert_trees_equal(s4["params"], s6["params"])  # skipped updates left params unchanged
  assert_trees_equal(s4["opt_state"], s6["opt_state"])
  recs = metrics.read_metrics(wd)
  assert [(r["step"], r["nonfinite"]) for r in recs] == [(1, 0.0), (7, 3.0)]
  # the same command again: resumes at 6, stops at 7 again, leaves 4 and 6 as they were
  before = {s: tree_files(os.path.join(wd, "checkpoints", s)) for s in ("4", "6")}
  with pytest.raises(FloatingPointError, match="at step 7"):
    toy_run(c, wd, ToyBatch(nan_from=5))
  assert listing(wd) == ["4", "6"]
  assert {s: tree_files(os.path.join(wd, "checkpoints", s)) for s in ("4", "6")} == before


def test_a_transient_nonfinite_step_is_skipped_and_training_goes_on(tmp_path):
  class OneBad(ToyBatch):
    def map(self, i):
      out = super().map(i)
      out["x"] = out["x"] if i + 1 != 3 else out["x"] * np.inf
      return out

  wd = str(tmp_path / "once")
  c = toy_config(**{"train.num_steps": 4, "train.ckpt_every": 2, "train.log_every": 1})
  run_ = toy_run(c, wd, OneBad())
  recs = metrics.read_metrics(wd)
  assert [r["nonfinite"] for r in recs] == [0.0, 0.0, 1.0, 0.0]
  assert not np.isfinite(recs[2]["loss"]) and np.isfinite(recs[3]["loss"])
  assert np.isfinite(np.asarray(run_.state.params["w"])).all()


def test_max_nonfinite_must_be_positive():
  with pytest.raises(ValueError, match="config.train.max_nonfinite=0 must be at least 1"):
    loading.validate(toy_config(**{"train.max_nonfinite": 0}), num_devices=1)


# ----------------------------------------------------------------------------- SIGTERM


class TermAt(ToyBatch):
  """``ToyBatch`` that sends this process SIGTERM while making batch ``at`` (step at + 1)."""

  def __init__(self, at: int):
    super().__init__()
    self.at = at

  def map(self, i):
    if i == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().map(i)


def test_sigterm_saves_then_raises_preempted_and_the_rerun_finishes(tmp_path):
  wd = str(tmp_path / "term")
  c = toy_config(**{"train.num_steps": 12, "train.ckpt_every": 100})
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(loop.Preempted) as err:  # a stopped run never returns as if finished
    toy_run(c, wd, TermAt(3))
  step = err.value.step
  assert 1 <= step < 12 and err.value.workdir == wd  # (grain makes batches ahead of the step)
  assert err.value.exit_code == PREEMPTED_EXIT_CODE == 75
  assert listing(wd) == [str(step)]  # saved there (ckpt_every=100 would save only at 12)
  assert signal.getsignal(signal.SIGTERM) == before  # the loop's handler is gone
  run_ = toy_run(c, wd)  # the same run again: resumes and returns at the end
  assert int(run_.state.step) == 12 and listing(wd) == [str(step), "12"]


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def toy_six(tmp_path_factory):
  """A finished toy run of 6 steps with checkpoints at 4 and 6 (keep 2), and its saved states."""
  wd = str(tmp_path_factory.mktemp("toy") / "six")
  c = toy_config(**{"train.num_steps": 6, "train.ckpt_every": 2})
  toy_run(c, wd)
  return wd, c, {s: saved_state(wd, s) for s in (4, 6)}


def copy_run(src, dst):
  subprocess.run(["cp", "-a", src, dst], check=True)
  return dst


def restore_latest(c, wd):
  """What a rerun of the same command resumes from: (start step, its state)."""
  mesh = sharding.single_device_mesh()
  data_iter = iter(grain.MapDataset.range(10**6).map(ToyBatch()).to_iter_dataset())
  optimizer, _ = loop.make_train_step(toy_loss, specs.from_config(c), c.train.num_steps)
  init = lambda: {"w": jnp.zeros((D, D))}
  state, _, ckpt, start = loop.restore_or_init(c, wd, init, optimizer, data_iter, mesh, ())
  ckpt.close()
  return start, state


def truncate_state_files(step_dir):
  for f in glob.glob(os.path.join(step_dir, "state", "d", "*")):
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def remove_state_manifest(step_dir):
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def remove_meta(step_dir):
  os.remove(os.path.join(step_dir, "meta", "metadata"))


@pytest.mark.parametrize("damage", [truncate_state_files, remove_state_manifest, remove_meta])
def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_previous_used(
  toy_six, tmp_path, damage, capfd
):
  src, c, states = toy_six
  wd = copy_run(src, str(tmp_path / "w"))
  damage(os.path.join(wd, "checkpoints", "6"))
  damaged = tree_files(os.path.join(wd, "checkpoints", "6"))
  start, state = restore_latest(c, wd)
  assert start == 4
  assert_trees_equal(jax.tree_util.tree_map(np.asarray, state.params), states[4]["params"])
  err = capfd.readouterr().err
  assert f"{wd}/checkpoints/6 failed to restore" in err and "resumed from step 4" in err
  (aside,) = [d for d in listing(wd) if d.startswith("6.corrupt-")]
  assert listing(wd) == ["4", aside]
  assert tree_files(os.path.join(wd, "checkpoints", aside)) == damaged  # moved, not deleted
  # the same command then trains on from 4 and saves a new 6 beside the one set aside
  toy_run(c, wd)
  assert listing(wd) == ["4", "6", aside]


def test_no_restorable_checkpoint_is_an_error_and_nothing_moves(toy_six, tmp_path):
  src, c, _ = toy_six
  wd = copy_run(src, str(tmp_path / "w"))
  for s in ("4", "6"):
    remove_state_manifest(os.path.join(wd, "checkpoints", s))
  with pytest.raises(RuntimeError, match=r"no checkpoint in .* restores \(tried steps \[6, 4\]"):
    restore_latest(c, wd)
  assert listing(wd) == ["4", "6"]


def test_a_config_mismatch_moves_no_checkpoint_aside(toy_six, tmp_path):
  src, c, _ = toy_six
  wd = copy_run(src, str(tmp_path / "w"))
  other = toy_config(**{"train.num_steps": 6, "model.num_queries": 8})
  with pytest.raises(ValueError, match="config.model.num_queries"):
    restore_latest(other, wd)
  assert listing(wd) == ["4", "6"]


KILLED_WRITER = """
import sys, time
from absl import flags
flags.FLAGS.mark_as_parsed()
import jax.numpy as jnp
from iomm_jax import checkpointing
ck = checkpointing.Checkpointer(sys.argv[1], writer=True)
ck.save(1, {"w": jnp.full((1000,), 1.0)}, None, {"step": 1})
ck.wait()
ck.save(2, {"w": jnp.full((50_000_000,), 2.0)}, None, {"step": 2})  # 200 MB: takes a while
print("saving", flush=True)
time.sleep(600)
"""


def test_kill9_during_an_async_save_leaves_the_previous_checkpoint_usable(tmp_path, capfd):
  wd = str(tmp_path / "w")
  ckpt_dir = os.path.join(wd, "checkpoints")
  proc = subprocess.Popen(
    [sys.executable, "-c", KILLED_WRITER, wd], stdout=subprocess.PIPE, text=True, cwd=ROOT
  )
  try:
    assert proc.stdout.readline().strip() == "saving"
    tmp = wait_for(lambda: [d for d in os.listdir(ckpt_dir) if d.startswith("2.orbax-ch")])
    assert "2" not in os.listdir(ckpt_dir)
    proc.kill()
  finally:
    proc.kill()
    proc.wait()
  assert tmp and os.path.isdir(os.path.join(ckpt_dir, tmp[0]))  # the interrupted write
  ck = checkpointing.Checkpointer(wd, writer=True)
  assert ck.latest_step() == 1
  state, meta = ck.restore({"w": jax.ShapeDtypeStruct((1000,), jnp.float32)})
  assert meta == {"step": 1} and np.array_equal(np.asarray(state["w"]), np.ones(1000))
  ck.save(2, {"w": jnp.full((1000,), 3.0)}, None, {"step": 2})  # the same step again
  ck.close()
  assert sorted(os.listdir(ckpt_dir)) == ["1", "2"]  # the unfinished write is gone
  assert "an unfinished checkpoint write" in capfd.readouterr().err


def wait_for(cond, timeout=300.0, every=0.02, proc=None):
  """Polls ``cond()`` until it is truthy (and returns it); fails if ``proc`` ends first."""
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    out = cond()
    if out:
      return out
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"process ended (rc {proc.returncode}) before the condition held")
    time.sleep(every)
  raise TimeoutError("condition not met")


# ----------------------------------------------------------------------------- full disk


def test_disk_full_during_a_save_is_a_clear_error_and_earlier_checkpoints_stay(toy_six, tmp_path):
  src, c, states = toy_six
  wd = copy_run(src, str(tmp_path / "w"))
  before = {s: tree_files(os.path.join(wd, "checkpoints", s)) for s in ("4", "6")}
  longer = toy_config(**{"train.num_steps": 10, "train.ckpt_every": 2, "train.log_every": 1})
  # A file-size limit makes the checkpoint's data file fail to grow (EFBIG), as a full disk
  # fails it (ENOSPC); Orbax writes in background threads and the error must still surface.
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  prev = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  # the limit binds every write of this process: keep it away from the shared XLA cache
  jax.config.update("jax_enable_compilation_cache", False)
  resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, hard))
  try:
    with pytest.raises(checkpointing.CheckpointWriteError) as err:
      toy_run(longer, wd)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, prev)
    jax.config.update("jax_enable_compilation_cache", True)
  e = err.value
  assert e.errno == errno.EFBIG and isinstance(e, OSError)
  assert f"checkpoint of step 8 in {wd}/checkpoints" in str(e) and "File too large" in str(e)
  assert "Earlier checkpoints are intact" in str(e)
  assert {s: tree_files(os.path.join(wd, "checkpoints", s)) for s in ("4", "6")} == before
  assert_trees_equal(saved_state(wd, 6), states[6])
  # the same command with space again: resumes from 6 and finishes
  toy_run(longer, wd)
  assert listing(wd) == ["10", "8"]


def test_a_save_that_cannot_fit_is_refused_before_writing(toy_six, tmp_path, monkeypatch):
  src, c, _ = toy_six
  wd = copy_run(src, str(tmp_path / "w"))
  usage = checkpointing.shutil.disk_usage(wd)
  monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p: usage._replace(free=50 * 1024))
  longer = toy_config(**{"train.num_steps": 8, "train.ckpt_every": 2})
  with pytest.raises(checkpointing.CheckpointWriteError, match="not saving the checkpoint") as e:
    toy_run(longer, wd)
  assert e.value.errno == errno.ENOSPC and f"{wd}/checkpoints" in str(e.value)
  assert listing(wd) == ["4", "6"]  # not even a temporary folder


# ----------------------------------------------------------------------------- real processes

STAGES = {  # stage -> the quick config and what it needs besides (no stage-0 run: random MLLM)
  "pretrain": ("pretrain.py:quick", []),
  "finetune": ("finetune.py:quick", ["--config.train.init_from=scratch"]),
}
STEPS = 8


class Train:
  """``python -m iomm_jax.cli.train`` on ``workdir``: always the same command line."""

  def __init__(self, stage, workdir):
    exp, extra = STAGES[stage]
    self.workdir, self.n = workdir, 0
    self.argv = [
      sys.executable, "-m", "iomm_jax.cli.train", "--config", f"experiments/shapes/{exp}",
      "--workdir", workdir, "--config.model.mllm_init=random",
      f"--config.train.num_steps={STEPS}", "--config.train.ckpt_every=2",
      "--config.sample.num_grid=0", *extra,
    ]  # fmt: skip
    path = os.environ.get("PYTHONPATH")
    self.env = {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else "")}

  def start(self, **kw):
    """Starts the command; its output goes to ``<workdir>.<n>.{out,err}``."""
    self.n += 1
    self.out, self.err = (f"{self.workdir}.{self.n}.{x}" for x in ("out", "err"))
    with open(self.out, "w") as out, open(self.err, "w") as err:
      self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=err, **kw)
    return self.proc

  def finish(self, timeout=600):
    rc = self.proc.wait(timeout)
    with open(self.out) as f, open(self.err) as g:
      return rc, f.read(), g.read()

  def steps(self):
    return checkpointing.saved_steps(self.workdir)

  def writing(self, after):
    """Steps above ``after`` whose checkpoint is being written (its temporary folder exists)."""
    d = os.path.join(self.workdir, "checkpoints")
    names = os.listdir(d) if os.path.isdir(d) else []
    return [n for n in names if ".orbax-checkpoint-tmp" in n and int(n.split(".")[0]) > after]


@pytest.fixture(
  scope="module", params=["pretrain", pytest.param("finetune", marks=pytest.mark.slow)]
)
def interrupted(request, tmp_path_factory):
  """An uninterrupted run beside one that is preempted (SIGTERM), rerun, killed (SIGKILL) while
  writing a checkpoint, and rerun to the end: each phase's (rc, stdout, stderr, saved steps)."""
  stage = request.param
  base = str(tmp_path_factory.mktemp(stage))
  ref = Train(stage, os.path.join(base, "straight"))
  run = Train(stage, os.path.join(base, "interrupted"))
  ref.start()
  phases = {}
  try:
    # 1. SIGTERM once the checkpoint of step 2 exists: wherever the loop is by then
    p = run.start()
    wait_for(lambda: 2 in run.steps(), proc=p)
    p.send_signal(signal.SIGTERM)
    phases["term"] = (*run.finish(), run.steps())
    phases["term_logged"] = [r["step"] for r in metrics.read_metrics(run.workdir)]
    # 2. the same command; SIGKILL while a later checkpoint is being written
    resumed_at = max(run.steps())
    p = run.start()
    wait_for(lambda: run.writing(resumed_at + 1), proc=p)
    p.kill()
    phases["kill"] = (*run.finish(), run.steps())
    phases["kill_listing"] = listing(run.workdir)
    # 3. the same command to the end
    run.start()
    phases["end"] = (*run.finish(), run.steps())
    phases["straight"] = (*ref.finish(), ref.steps())
  finally:
    for t in (ref, run):
      if t.proc.poll() is None:
        t.proc.kill()
        t.proc.wait()
  return stage, ref.workdir, run.workdir, phases


def test_sigterm_saves_at_the_next_step_and_exits_75(interrupted):
  _, _, wd, phases = interrupted
  rc, out, err, saved = phases["term"]
  assert rc == PREEMPTED_EXIT_CODE == 75, err[-3000:]  # not 0: a chain must not go on
  step = int(out.split("SIGTERM: saved step ")[1].split(",")[0])
  assert 2 <= step < STEPS and max(saved) == step
  assert f"SIGTERM: saved step {step} in {wd}; run the same command to resume" in err
  assert phases["term_logged"][-1] <= step  # it stopped there


def test_kill9_then_the_same_command_resumes(interrupted):
  _, _, wd, phases = interrupted
  term_step = max(phases["term"][3])
  rc, out, err, saved = phases["kill"]
  assert rc == -signal.SIGKILL
  assert f"resuming {wd} at step {term_step}" in out
  assert max(saved) < STEPS
  rc, out, err, saved = phases["end"]
  assert rc == 0, err[-3000:]
  assert f"resuming {wd} at step {max(phases['kill'][3])}" in out
  if any(".orbax-checkpoint-tmp" in d for d in phases["kill_listing"]):  # killed mid-write
    assert "an unfinished checkpoint write" in err
  assert listing(wd) == [str(STEPS - 2), str(STEPS)]  # no temporary folder left


def test_interrupted_run_ends_bit_identical_to_an_uninterrupted_one(interrupted):
  _, ref, wd, phases = interrupted
  assert phases["straight"][0] == 0, phases["straight"][2][-3000:]
  a, b = saved_state(ref, STEPS), saved_state(wd, STEPS)
  assert set(a) == {"step", "params", "opt_state", "ema", "nonfinite"}
  assert_trees_equal(a, b)  # parameters, EMA, optimiser state: every bit
  # the data iterator too: the next batch would be the same
  data = lambda w: open(
    os.path.join(w, "checkpoints", str(STEPS), "data", "process_0-of-1.json")
  ).read()
  assert json.loads(data(ref)) == json.loads(data(wd))
  last = lambda w: [r for r in metrics.read_metrics(w) if r["step"] == STEPS][-1]
  assert last(ref)["loss"] == last(wd)["loss"]


@pytest.mark.slow
def test_cli_disk_full_is_a_clear_error_and_keeps_earlier_checkpoints(interrupted, tmp_path):
  stage, ref, _, _ = interrupted
  wd = copy_run(ref, str(tmp_path / "w"))
  subprocess.run(["rm", "-r", os.path.join(wd, "checkpoints", str(STEPS))], check=True)
  before = tree_files(os.path.join(wd, "checkpoints", str(STEPS - 2)))
  run = Train(stage, wd)
  # Files cannot grow past 32 KiB, as on a full disk (EFBIG instead of ENOSPC); set in a wrapper
  # that execs the command (no preexec_fn: forking a multithreaded JAX process). Output goes to
  # pipes, which the limit does not cover.
  full_disk = (
    "import os, resource, signal, sys; "
    "hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]; "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, hard)); "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
  )
  proc = subprocess.run(
    [sys.executable, "-c", full_disk, *run.argv[1:]],
    cwd=ROOT, env=run.env, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  rc, out, err = proc.returncode, proc.stdout, proc.stderr
  assert rc != 0 and f"resuming {wd} at step {STEPS - 2}" in out
  assert "CheckpointWriteError: [Errno 27] could not write the checkpoint of step" in err
  assert f"in {wd}/checkpoints: [EFBIG: File too large]" in err
  kept, unfinished = listing(wd)  # the interrupted write stays until the next run
  assert kept == str(STEPS - 2) and unfinished.startswith(f"{STEPS}.orbax-checkpoint-tmp")
  assert tree_files(os.path.join(wd, "checkpoints", str(STEPS - 2))) == before
  # with room again, the same command finishes and ends where the uninterrupted run did
  run.start()
  rc, out, err = run.finish()
  assert rc == 0, err[-3000:]
  assert listing(wd) == [str(STEPS - 2), str(STEPS)]
  assert_trees_equal(saved_state(wd, STEPS), saved_state(ref, STEPS))
