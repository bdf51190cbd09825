#!/usr/bin/env bash
# Checks the package on a GPU machine (jax 0.11.2 + CUDA there): installs the carried wheels of
# what that image lacks (grain, array-record, ml-collections, clu, portpicker: see the device
# notes), runs the CPU-independent test modules, then the quick demo end to end.
#   usage (from the repo root): bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'orbax', o.__version__, jax.devices())" 2>&1 | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/versions.txt"
python3 -m pytest -q -p no:cacheprovider tests/diffusion tests/models tests/data tests/eval \
  tests/test_optim.py 2>&1 | tail -15 | tee "$out/pytest.txt"
{ time python3 -m iomm_jax.cli.demo --workdir /tmp/gpu_demo --quick ; } 2>&1 \
  | grep -v -i "warning\|absl" | tail -25 | tee "$out/demo_quick.txt"
cp /tmp/gpu_demo/samples.png "$out/" 2>/dev/null
