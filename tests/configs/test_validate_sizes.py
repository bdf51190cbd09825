"""Image sizes that cannot work are refused by ``loading.validate`` before anything compiles
(issue 16): ``model.image_size`` must split into whole codec cells and generator patches, and
the shapes world's ``data.canvas`` must equal it. Every shipped experiment passes."""

import glob
import importlib.util
import os
import time

import pytest

from iomm_jax.assembly import workdirs
from iomm_jax.configs import loading
from tests.cli.test_command_lines import QUICK, _run_all

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INPUTS = {"model.mllm_from": "/w/mllm"}  # validate checks that it is set, not that it exists
PAPER_PATHS = "mllm=/w/internvl3_2b,vae=/w/flux_vae,data=/d/shards"


def _quick(**over):
  return loading.load_config(QUICK, {**INPUTS, **over})


def _refused(config) -> str:
  with pytest.raises(loading.ConfigError) as e:
    loading.validate(config, num_devices=1)
  assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
  return str(e.value)


def test_image_size_30_names_the_keys_and_the_rule():
  msg = _refused(_quick(**{"model.image_size": 30, "data.canvas": 30}))
  assert msg == (
    "config.model.image_size=30 is not divisible by config.model.codec_factor (2) x the "
    "latent_patch of config.model.generator='shapes' (2) = 4: the latent (15x15) must split "
    "into whole 2x2 patches; use a multiple of 4 such as 28 or 32"
  )


@pytest.mark.parametrize(
  "over, words",
  [
    ({"model.image_size": 31}, ["image_size=31", "2x2 codec cells (31 / 2 = 15.5)", "28 or 32"]),
    (  # FLUX VAE: 8x down, 24 px -> a 3x3 latent
      {"model.codec": "vae", "model.vae": "flux"},
      ["image_size=24", "downsampling of config.model.vae='flux' (8)", "= 16", "16 or 32"],
    ),
    (
      {"model.generator_overrides": "latent_patch=5"},
      ["latent_patch of config.model.generator_overrides='latent_patch=5' (5)", "= 10", "(12x12)"],
    ),
    ({"model.codec_factor": 0}, ["config.model.codec_factor=0 must be a positive integer"]),
  ],
)
def test_other_codecs_and_patches_are_named(over, words):
  msg = _refused(_quick(**{"data.canvas": over.get("model.image_size", 24), **over}))
  for w in words:
    assert w in msg, (w, msg)


def test_canvas_mismatch_is_refused_naming_both_keys():
  """Was: the 24 px renders met 32 px noise in the first train step (a broadcasting TypeError
  after the workdir was written)."""
  msg = _refused(_quick(**{"model.image_size": 32}))  # data.canvas stays 24
  assert msg == (
    "config.data.canvas=24 differs from config.model.image_size=32: the shapes world "
    "(config.data.source='shapes') renders its images at data.canvas px and the generator "
    "trains on and samples model.image_size px, so they must be equal; set "
    "config.data.canvas=32 or config.model.image_size=24"
  )
  msg = _refused(_quick(**{"data.canvas": 30}))  # 30 is no size for the generator
  assert msg.endswith("set config.data.canvas=24")


def test_what_works_is_accepted():
  """Each accepted config beside the one setting that gets the same sizes refused."""
  assert loading.validate(_quick(**{"model.image_size": 32, "data.canvas": 32}), 1) is None
  # own data: data.canvas is the shapes world's and plays no part (on the shapes world the same
  # 32 px against the canvas of 24 is refused)
  assert (
    loading.validate(_quick(**{"model.image_size": 32, "data.source": "array_record"}), 1) is None
  )
  assert "config.data.canvas=24" in _refused(_quick(**{"model.image_size": 32}))
  # stage 0 trains no generator; its images reach only the ViT, which resizes them (a generator
  # stage refuses 30 px)
  mllm = os.path.join(ROOT, "experiments", "shapes", "mllm.py:quick")
  assert (
    loading.validate(loading.load_config(mllm, {"model.image_size": 30}), num_devices=1) is None
  )
  assert "config.model.image_size=30" in _refused(_quick(**{"model.image_size": 30}))


def test_refused_before_the_workdir_is_written(tmp_path):
  wd = str(tmp_path / "run")
  with pytest.raises(loading.ConfigError, match="config.model.image_size=30"):
    workdirs.prepare_workdir(_quick(**{"model.image_size": 30}), wd)
  assert not os.path.exists(wd)


# the config arguments each experiment folder's files are loaded with (what a run passes)
ARGS = {
  "shapes": lambda stage: ["", "quick"],
  "folder": lambda stage: ["data=/d/prepared", "data=/d/prepared,quick"],  # own data
  "flux_mixft": lambda stage: [f"{PAPER_PATHS},flux=/ckpt/flux", f"{PAPER_PATHS},flux=/f,lora=0"],
  **{
    name: lambda stage, name=name: [
      f"{PAPER_PATHS},res={res}" + (",init=/runs/pretrain" if stage == "finetune" else "")
      for res in ([512] if stage == "pretrain" else [512, 1024])
      if not (name == "iomm_xl" and res == 1024)  # the XL recipe has no 1024 px row
    ]
    for name in ("iomm_b", "iomm_l", "iomm_xl")
  },
}
RUN_INPUTS = {  # the paths a shapes-world run must be given (validate checks they are set)
  "pretrain": INPUTS,
  "finetune": {**INPUTS, "train.init_from": "/w/pretrain"},
}


def _shipped_specs() -> list[tuple[str, dict]]:
  """(spec, overrides) of every experiment file under experiments/ (a ``get_config``), with
  each of its folder's ``ARGS``."""
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*", "*.py"))):
    folder, stage = path.split(os.sep)[-2], os.path.basename(path)[:-3]
    assert folder in ARGS, f"{path}: add the arguments its configs load with to ARGS"
    over = {} if folder.startswith("iomm_") else RUN_INPUTS.get(stage, {})
    out += [(f"{path}:{arg}" if arg else path, over) for arg in ARGS[folder](stage)]
  return out


def _sweep(path: str) -> list[dict]:
  """The ``get_sweep`` points of an experiment file (launch/sweep.py), or none."""
  spec = importlib.util.spec_from_file_location("_sweep", path.partition(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_sweep() if hasattr(module, "get_sweep") else []


def test_every_shipped_experiment_passes():
  specs = _shipped_specs()
  names = {os.path.relpath(s.partition(":")[0], ROOT) for s, _ in specs}
  stages = ("pretrain", "finetune")
  shipped = {f"experiments/{n}/{s}.py" for n in ("iomm_b", "iomm_l", "iomm_xl") for s in stages}
  shipped |= {f"experiments/shapes/{s}.py" for s in ("mllm", *stages)}
  assert shipped <= names, shipped - names
  for spec, over in specs:
    for point in [{}, *_sweep(spec)]:
      config = loading.load_config(spec, {**over, **point})
      loading.validate(config, num_devices=8 if config.train.batch_size % 8 == 0 else 1)


def test_train_cli_refuses_in_one_line_before_compiling(tmp_path):
  """``iomm-train`` prints the line (no traceback), exits 2 and writes no workdir."""
  wds = [str(tmp_path / "a"), str(tmp_path / "b")]
  start = time.monotonic()
  runs = _run_all(
    [
      ["iomm-train", "--config", QUICK, "--config.model.image_size=30", "--workdir", wds[0]],
      ["iomm-train", "--config", QUICK, "--config.model.image_size=32", "--workdir", wds[1]],
    ]
  )
  assert time.monotonic() - start < 90  # JAX's import and a config load; nothing compiles
  wants = ["config.model.image_size=30 is not divisible by", "config.data.canvas=24 differs"]
  for proc, want, wd in zip(runs, wants, wds, strict=True):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"iomm-train: error: {want}"), proc.stderr
    assert not os.path.exists(wd)
