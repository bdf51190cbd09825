"""launch/sweep.py: get_sweep checks, the report, local runs through a stub iomm-train (failure,
resume, skip), and a real two-point --quick sweep of the shapes stage 1 (two workdirs, one table;
a re-run skips the finished runs)."""

import json
import os
import re
import signal
import stat
import threading
import time

import pytest

from iomm_jax import PREEMPTED_EXIT_CODE
from launch import common, sweep

EXP = os.path.join(common.ROOT, "experiments", "shapes")
PRETRAIN = os.path.join(EXP, "pretrain.py")


def _experiment(tmp_path, sweep_src):
  path = tmp_path / "exp.py"
  path.write_text(
    "from iomm_jax.configs.base import get_base_config\n\n"
    "def get_config(arg=None):\n  c = get_base_config()\n  c.stage = 'mllm'\n  return c\n\n"
    f"def get_sweep():\n  return {sweep_src}\n"
  )
  return str(path)


@pytest.mark.parametrize(
  "src,match",
  [
    ("{'optim.lr': 1e-3}", "must return a non-empty list of override dicts"),
    ("[]", "must return a non-empty list of override dicts"),
    ("[{'optim.lr': 1e-3}, ('optim.lr', 3e-4)]", "point 1 is .* not a dict"),
    ("[{'optim.lr': 1e-3}, {'optim.learning_rate': 3e-4}]",
     "point 1 .*unknown config key 'optim.learning_rate'"),
    ("[{'optim.lr': 'fast'}]", "point 0 .*config.optim.lr='fast'"),
    ("[{'diffusion.mask_ratio': 1.5}]", r"point 0 .*mask_ratio=1.5 must be in \[0, 1\)"),
    ("[{'optim.lr': 1e-3}, {'optim.lr': 0.001}]", r"points 0 and 1 are the same run \(lr=0.001\)"),
  ],
)  # fmt: skip
def test_a_bad_get_sweep_is_an_error_before_anything_runs(tmp_path, capsys, src, match):
  root = tmp_path / "root"
  argv = ["--config", _experiment(tmp_path, src), "--workdir", str(root)]
  assert common.run_main(sweep.main, argv) == 2
  err = capsys.readouterr().err
  assert re.search(match, err), err
  assert not root.exists()


def test_slugs_are_readable_and_distinct():
  names = sweep._short_names(["optim.lr", "diffusion.mask_ratio", "a.seed", "b.seed"])
  assert sweep.slug({"optim.lr": 3e-4, "diffusion.mask_ratio": 0.85}, names) == (
    "lr=0.0003,mask_ratio=0.85"
  )
  assert sweep.slug({"a.seed": 1, "b.seed": "x y/z"}, names) == "a.seed=1,b.seed=x_y_z"
  assert sweep.slug({}, names) == "base"


def test_report_marks_unfinished_runs(tmp_path, capsys):
  root = tmp_path / "root"
  spec = f"{EXP}/finetune.py:quick"
  flags = [("model.mllm_from", "/m"), ("train.init_from", "/p")]
  points = sweep.plan(spec, str(root), flags)
  done, half = (root / points[0].slug), (root / points[1].slug)
  for wd, steps in ((done, [2, 4, 6]), (half, [2])):
    (wd / "checkpoints" / str(steps[-1])).mkdir(parents=True)
    (wd / "config.json").write_text(json.dumps({"train": {"num_steps": 6}}))
    recs = [{"step": s, "loss": 1.0 / s} for s in steps]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  (done / "eval").mkdir()
  (done / "eval" / "shapes_geneval.json").write_text(json.dumps({"overall": 0.25}))
  # a report needs none of the runs' flags (no mllm_from / init_from here)
  args = ["--config", f"{EXP}/finetune.py", "--quick", "--workdir", str(root), "--report"]
  assert sweep.main(args) == 0
  table = capsys.readouterr().out
  assert "| mask_ratio=0.75 | 0.75 | done | 6/6 | 0.1667 | 0.250 |" in table
  assert "| mask_ratio=0.85 | 0.85 | **unfinished** | 2/6 | 0.5 | - |" in table
  assert "| mask_ratio=0.95 | 0.95 | **not started** | -/6 | - | - |" in table
  assert (root / "sweep.md").read_text().split("\n\n", 1)[1] in table
  runs = json.loads((root / "sweep.json").read_text())["runs"]
  assert [r["status"] for r in runs] == ["done", "unfinished", "not started"]


STUB_TRAIN = """#!/bin/bash
# iomm-train stub: a 6-step run in --workdir (fails on lr=0.0003 when STUB_FAIL is set; exits
# as preempted on lr=0.001 when STUB_TERM is set)
for ((i = 1; i < $#; i++)); do [ "${!i}" = --workdir ] && { j=$((i + 1)); wd=${!j}; }; done
echo "stub $*"
if [[ -n "${STUB_FAIL:-}" && "$*" == *lr=0.0003* ]]; then echo boom >&2; exit 3; fi
if [[ -n "${STUB_TERM:-}" && "$*" == *lr=0.001* ]]; then echo "SIGTERM: saved" >&2; exit 75; fi
mkdir -p "$wd/checkpoints/6"
echo '{"train": {"num_steps": 6}}' > "$wd/config.json"
echo '{"step": 6, "loss": 0.5}' >> "$wd/metrics.jsonl"
"""


@pytest.fixture
def stub_sweep(tmp_path, monkeypatch):
  """(root, argv) of a --quick sweep of the shapes stage 1 whose iomm-train is STUB_TRAIN."""
  stub = tmp_path / "iomm-train"
  stub.write_text(STUB_TRAIN)
  stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setattr(common, "local_train_bin", lambda: str(stub))
  root = tmp_path / "root"
  return root, ["--config", PRETRAIN, "--workdir", str(root), "--quick",
                "--config.model.mllm_from=/m"]  # fmt: skip


def test_local_runs_iomm_train_per_point_and_resumes_after_a_failure(
  stub_sweep, capsys, monkeypatch
):
  root, argv = stub_sweep
  monkeypatch.setenv("STUB_FAIL", "1")
  assert sweep.main(argv) == 1  # the second point failed
  out = capsys.readouterr().out
  assert f"stub --config {PRETRAIN}:quick --workdir {root}/lr=0.001 --config.optim.lr=0.001 " \
    "--config.model.mllm_from=/m" in out  # fmt: skip
  assert "# lr=0.0003 failed (exit 3)" in out
  assert "| lr=0.001 | 0.001 | done | 6/6 | 0.5 | - |" in out
  assert "| lr=0.0003 | 0.0003 | **failed** | -/6 | - | - |" in out
  assert "boom" in (root / "lr=0.0003" / "train.log").read_text()

  monkeypatch.delenv("STUB_FAIL")
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert "# skip lr=0.001: finished (6 steps)" in out and f"--workdir {root}/lr=0.0003" in out
  assert "| lr=0.0003 | 0.0003 | done | 6/6 | 0.5 | - |" in out


def test_a_preempted_point_stops_the_sweep(stub_sweep, capsys, monkeypatch):
  root, argv = stub_sweep
  monkeypatch.setenv("STUB_TERM", "1")
  assert sweep.main(argv) == PREEMPTED_EXIT_CODE  # iomm-train exited 75 on the first point
  out = capsys.readouterr().out
  assert "# lr=0.001 stopped by SIGTERM (checkpoint saved); the same command resumes" in out
  assert f"--workdir {root}/lr=0.0003" not in out  # the next point never started
  assert "| lr=0.0003 | 0.0003 | **not started** |" in out


def test_sigterm_to_the_sweep_reaches_the_running_point(tmp_path):
  started = tmp_path / "started"
  child = tmp_path / "train"
  child.write_text(
    "#!/bin/bash\ntrap 'echo saved; exit 75' TERM\n"
    f"touch {started}\nfor _ in $(seq 600); do sleep 0.05; done\n"
  )
  child.chmod(child.stat().st_mode | stat.S_IEXEC)

  def term_when_started():
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)  # to this process, i.e. the sweep

  threading.Thread(target=term_when_started, daemon=True).start()
  before = signal.getsignal(signal.SIGTERM)
  rc = sweep._run_logged([str(child)], str(tmp_path / "w" / "train.log"))
  assert rc == PREEMPTED_EXIT_CODE and "saved" in (tmp_path / "w" / "train.log").read_text()
  assert signal.getsignal(signal.SIGTERM) == before


def test_a_preempted_point_stops_an_in_process_sweep(tmp_path, capsys, monkeypatch):
  from iomm_jax.train import loop, pretrain

  calls = []

  def preempted(config, workdir):
    calls.append(workdir)
    raise loop.Preempted(3, workdir)

  monkeypatch.setattr(pretrain, "train_and_evaluate", preempted)
  root = tmp_path / "root"
  argv = ["--config", PRETRAIN, "--workdir", str(root), "--quick", "--in-process",
          "--config.model.mllm_from=/m"]  # fmt: skip
  assert sweep.main(argv) == PREEMPTED_EXIT_CODE
  assert calls == [str(root / "lr=0.001")]
  assert "SIGTERM: saved step 3 in" in (root / "lr=0.001" / "train.log").read_text()


@pytest.fixture(scope="module")
def stage0(quick_mllm):
  return quick_mllm[0]  # tests/conftest.py: trained once per session


@pytest.mark.slow  # issue 18: a long end-to-end set-up; .ci/run runs every slow test
def test_local_quick_sweep_runs_reports_and_skips_finished(stage0, tmp_path, capsys):
  root = tmp_path / "sweep"
  argv = ["--config", PRETRAIN, "--workdir", str(root), "--quick", "--in-process",
          f"--config.model.mllm_from={stage0}"]  # fmt: skip
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert sorted(p for p in os.listdir(root) if "=" in p) == ["lr=0.0003", "lr=0.001"]
  for slug, lr in (("lr=0.001", 1e-3), ("lr=0.0003", 3e-4)):
    with open(root / slug / "config.json") as f:
      assert json.load(f)["optim"]["lr"] == lr
    assert "step 6/6" in (root / slug / "train.log").read_text()
  runs = json.loads((root / "sweep.json").read_text())["runs"]
  assert [(r["run"], r["status"], r["step"]) for r in runs] == [
    ("lr=0.001", "done", 6), ("lr=0.0003", "done", 6)
  ]  # fmt: skip
  table = (root / "sweep.md").read_text()
  assert (
    "| lr=0.001 | 0.001 | done | 6/6 |" in table and "| lr=0.0003 | 0.0003 | done | 6/6 |" in table
  )
  assert table.split("\n\n", 1)[1] in out  # printed at the end

  before = (root / "lr=0.001" / "metrics.jsonl").read_text()
  assert sweep.main(argv) == 0
  again = capsys.readouterr().out
  assert "# skip lr=0.001: finished (6 steps)" in again and "# skip lr=0.0003" in again
  assert "iomm-train" not in again
  assert (root / "lr=0.001" / "metrics.jsonl").read_text() == before
