"""The launchers' --dry-run output (local, SLURM, TPU) and the SLURM script run by bash against
stub srun/scontrol/iomm-train commands (environment per task, SIGTERM -> checkpoint -> requeue)."""

import os
import re
import shlex
import signal
import stat
import subprocess
import time

import pytest

from launch import common, local, slurm, sweep, tpu

ROOT = common.ROOT
PRETRAIN = "experiments/shapes/pretrain.py"
SPACED = "--config.model.mllm_from=/shared/my runs/mllm"  # an override with a space


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
  monkeypatch.chdir(ROOT)


def dry(main, *argv, capsys):
  assert main([*argv, "--dry-run"]) == 0
  return capsys.readouterr().out


def test_local_dry_run_prints_the_iomm_train_command(capsys, tmp_path):
  wd = str(tmp_path / "my run")
  out = dry(local.main, "--config", f"{PRETRAIN}:quick", "--workdir", wd, SPACED,
            "--config.optim.lr=3e-4", capsys=capsys)  # fmt: skip
  (line,) = out.splitlines()
  argv = shlex.split(line)
  assert os.path.basename(argv[0]) == "iomm-train"
  assert argv[1:] == [
    "--config",
    f"{PRETRAIN}:quick",
    "--workdir",
    wd,
    SPACED,
    "--config.optim.lr=3e-4",
  ]
  assert not os.path.exists(wd)


@pytest.mark.parametrize(
  "flag,match",
  [
    ("--config.optim.learning_rate=1e-3", "unknown config key 'optim.learning_rate'"),
    ("--config.optim.lr=fast", r"--config.optim.lr='fast' is not a float"),
    ("--config.diffusion.mask_ratio=1.0", r"mask_ratio=1.0 must be in \[0, 1\)"),
  ],
)
def test_bad_overrides_are_named_before_anything_runs(capsys, flag, match):
  args = ["--config", PRETRAIN, "--workdir", "/nonexistent/w", "--config.model.mllm_from=/m", flag]
  for main in (local.main, slurm.main):
    assert common.run_main(main, args) == 2
    err = capsys.readouterr()
    assert re.search(match, err.err) and not err.out


def test_a_flag_that_is_no_override_is_refused(capsys):
  with pytest.raises(SystemExit):
    local.main(
      ["--config", PRETRAIN, "--workdir", "/w", "--config.model.mllm_from=/m", "--nodes=2"]
    )
  assert "--config.KEY=VALUE" in capsys.readouterr().err


def test_slurm_dry_run_script(capsys):
  out = dry(slurm.main, "--config", PRETRAIN, "--workdir", "/shared/runs/p", "--nodes", "4",
            "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj", "--time", "12:00:00",
            "--grace", "240", "--sbatch", "qos=high", SPACED, capsys=capsys)  # fmt: skip
  directives = [line for line in out.splitlines() if line.startswith("#SBATCH ")]
  assert directives == [
    "#SBATCH --job-name=iomm",
    "#SBATCH --nodes=4",
    "#SBATCH --ntasks-per-node=1",
    "#SBATCH --gpus-per-node=8",
    "#SBATCH --time=12:00:00",
    "#SBATCH --partition=gpu",
    "#SBATCH --account=proj",
    "#SBATCH --output=/shared/runs/p/slurm-%j.out",
    "#SBATCH --open-mode=append",
    "#SBATCH --requeue",
    "#SBATCH --signal=B:TERM@240",
    "#SBATCH --qos=high",
  ]
  assert f"source {ROOT}/.venv/bin/activate" in out
  assert 'export IOMM_NUM_PROCESSES="$SLURM_NTASKS"' in out
  assert "CUDA_VISIBLE_DEVICES" not in out  # one process per node sees all its GPUs
  assert "scontrol requeue" in out and "trap requeue TERM" in out
  srun = out[out.index("srun ") : out.index(" &\n")].replace("\\\n", " ")
  assert shlex.split(srun)[-7:] == [
    "iomm-train", "--config", PRETRAIN, "--workdir", "$workdir", "${overrides[@]}", SPACED
  ]  # fmt: skip
  subprocess.run(["bash", "-n"], input=out, text=True, check=True)


STUB_SRUN = """#!/bin/bash
# srun stub: SLURM_NTASKS local tasks; SIGTERM is forwarded to them
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
for p in "${pids[@]}"; do wait "$p" || wait "$p"; done
"""
STUB_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then printf 'node7\\nnode8\\n'; else echo "scontrol $*" >> "$LOG/events"; fi
"""
STUB_TRAIN = """#!/bin/bash
# iomm-train stub: records its environment and arguments; SIGTERM -> "checkpoint", exit 75
printf '%s\\n' "$IOMM_COORDINATOR $IOMM_NUM_PROCESSES ${CUDA_VISIBLE_DEVICES:--}" "$@" \\
  > "$LOG/task.$IOMM_PROCESS_ID"
trap 'echo "checkpoint $IOMM_PROCESS_ID" >> "$LOG/events"; exit 75' TERM
touch "$LOG/started.$IOMM_PROCESS_ID"
if [ -n "${STUB_WAIT:-}" ]; then for _ in $(seq 300); do sleep 0.05; done; fi
"""


def _stubs(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("iomm-train", STUB_TRAIN)):
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  log = tmp_path / "log"
  log.mkdir()
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(log),
             SLURM_JOB_ID="123", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node[7-8]")  # fmt: skip
  return bin_dir, log, env


def test_slurm_script_runs_one_process_per_gpu_with_its_env(capsys, tmp_path):
  bin_dir, log, env = _stubs(tmp_path)
  wd = str(tmp_path / "w")
  out = dry(slurm.main, "--config", f"{PRETRAIN}:quick", "--workdir", wd, "--nodes", "1",
            "--gpus-per-node", "2", "--per", "gpu", "--setup", "true", SPACED,
            capsys=capsys)  # fmt: skip
  assert "#SBATCH --ntasks-per-node=2" in out
  script = tmp_path / "job.sbatch"
  script.write_text(out)
  subprocess.run(["bash", str(script)], env=env, check=True, timeout=60)
  for i in (0, 1):
    lines = (log / f"task.{i}").read_text().splitlines()
    assert lines[0] == f"node7:20123 2 {i}"  # coordinator, process count, this task's GPU
    assert lines[1:] == ["--config", f"{PRETRAIN}:quick", "--workdir", wd, SPACED]
  assert os.path.isdir(wd)


def test_slurm_script_checkpoints_and_requeues_on_sigterm(capsys, tmp_path):
  bin_dir, log, env = _stubs(tmp_path)
  out = dry(slurm.main, "--config", PRETRAIN, "--workdir", str(tmp_path / "w"), "--setup", "true",
            "--config.model.mllm_from=/m", capsys=capsys)  # fmt: skip
  script = tmp_path / "job.sbatch"
  script.write_text(out)
  proc = subprocess.Popen(["bash", str(script)], env=dict(env, STUB_WAIT="1"))
  deadline = time.time() + 30
  while not all((log / f"started.{i}").exists() for i in (0, 1)) and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.2)  # the script is in `wait`
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 0
  events = (log / "events").read_text().splitlines()
  assert sorted(events[:2]) == ["checkpoint 0", "checkpoint 1"]
  assert events[2:] == ["scontrol requeue 123"]


def test_tpu_dry_run_commands(capsys):
  out = dry(tpu.main, "--name", "pod-a", "--zone", "us-central2-b", "--project", "p",
            "--config", f"{ROOT}/{PRETRAIN}", "--workdir", "/mnt/shared/p", SPACED,
            capsys=capsys)  # fmt: skip
  tar, scp, install, run = (shlex.split(line) for line in out.splitlines())
  assert tar[:3] == ["tar", "-czf", "/tmp/pod-a-iomm_jax_src.tar.gz"] and tar[-3:] == [
    "-C",
    ROOT,
    ".",
  ]
  assert "--exclude=.venv" in tar and "--exclude=.git" in tar
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = ["--zone=us-central2-b", "--project=p", "--worker=all"]
  assert scp == [*gcloud, "scp", tar[2], "pod-a:iomm_jax_src.tar.gz", *where]
  assert install[:-1] == [*gcloud, "ssh", "pod-a", *where]
  assert "pip install -q -e . 'jax[tpu]==" in install[-1]
  assert run[:-1] == [*gcloud, "ssh", "pod-a", *where]
  assert run[-1].startswith("--command=")
  remote = shlex.split(run[-1][len("--command=") :])
  # the experiment path is relative to the copied repository; the override keeps its space
  assert remote[:3] == ["cd", "iomm_jax", "&&"]
  assert remote[3:] == [
    ".venv/bin/iomm-train",
    "--config",
    PRETRAIN,
    "--workdir",
    "/mnt/shared/p",
    SPACED,
  ]


def test_tpu_no_setup_runs_only_the_training(capsys):
  out = dry(tpu.main, "--name", "pod-a", "--zone", "z", "--no-setup", "--config", PRETRAIN,
            "--workdir", "/mnt/p", "--config.model.mllm_from=/m", capsys=capsys)  # fmt: skip
  (line,) = out.splitlines()
  assert " ssh pod-a --zone=z --worker=all '--command=cd iomm_jax && .venv/bin/iomm-train " in line


def test_sweep_slurm_array_and_tpu_dry_runs(capsys, tmp_path):
  root = str(tmp_path / "sweep")
  common_args = ["--config", "experiments/shapes/finetune.py", "--workdir", root, "--quick",
                 "--config.model.mllm_from=/m", "--config.train.init_from=/p"]  # fmt: skip
  out = dry(sweep.main, *common_args, "--mode", "slurm", "--max-parallel", "2", "--setup", "true",
            capsys=capsys)  # fmt: skip
  assert "#SBATCH --array=0-2%2" in out and f"#SBATCH --output={root}/slurm-%A_%a.out" in out
  assert (
    f"  1) workdir={root}/mask_ratio=0.85; overrides=(--config.diffusion.mask_ratio=0.85) ;;" in out
  )
  assert not os.path.exists(root)  # a dry run writes nothing
  # run array task 2 against the stubs: its workdir and override, then the common flags
  bin_dir, log, env = _stubs(tmp_path)
  script = tmp_path / "sweep.sbatch"
  script.write_text(out[out.index("#!/bin/bash") :])
  subprocess.run(["bash", str(script)], env=dict(env, SLURM_ARRAY_TASK_ID="2"), check=True)
  assert (log / "task.0").read_text().splitlines()[1:] == [
    "--config", "experiments/shapes/finetune.py:quick", "--workdir", f"{root}/mask_ratio=0.95",
    "--config.diffusion.mask_ratio=0.95", "--config.model.mllm_from=/m",
    "--config.train.init_from=/p",
  ]  # fmt: skip

  out = dry(sweep.main, *common_args, "--mode", "tpu", "--name", "a,b", "--zone", "z",
            "--no-setup", capsys=capsys)  # fmt: skip
  lines = out.splitlines()
  assert lines[1:] == [
    "# pod a",
    *[line for line in lines if " ssh a " in line],
    "# pod b",
    *[line for line in lines if " ssh b " in line],
  ]
  remote = [shlex.split(shlex.split(x)[-1]) for x in lines if x.startswith("gcloud")]
  workdirs = [r[r.index("--workdir") + 1] for r in remote]
  assert workdirs == [
    f"{root}/mask_ratio=0.75",
    f"{root}/mask_ratio=0.95",
    f"{root}/mask_ratio=0.85",
  ]


def test_array_spec():
  assert sweep.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
  assert sweep.array_spec([3], max_parallel=4) == "3%4"
