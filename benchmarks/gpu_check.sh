#!/usr/bin/env bash
# One call on a GPU machine (jax 0.11.2 + CUDA there): installs the carried wheels of what that
# image lacks (grain, array-record, ml-collections, clu, portpicker, diffusers,
# importlib_metadata: see the device notes), then
#   1. the generator's train-step throughput at IOMM-B size (benchmarks/generator_throughput.py,
#      cuDNN and XLA attention) and the PyTorch baseline (../shared/bench/flux_torch_baseline.py,
#      copied to .bench/ before the call) on the same card, same batch;
#   2. the CPU-independent test modules on the GPU backend;
#   3. the quick demo end to end.
# Each part writes under OUTDIR as it goes, so a cut-off run still returns what finished.
#   usage (from the repo root): bash benchmarks/gpu_check.sh OUTDIR [BATCH]
set -uo pipefail
out=${1:-/tmp/gpu_check}
batch=${2:-8}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'orbax', o.__version__, jax.devices())" 2>&1 | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$out/versions.txt"
date -u | tee -a "$out/versions.txt"
python3 benchmarks/generator_throughput.py --size B --batch "$batch" --attention cudnn xla 2>&1 \
  | grep -v -i "warning" | tee "$out/throughput_jax.txt"
if [ -f .bench/flux_torch_baseline.py ]; then
  python3 .bench/flux_torch_baseline.py --batch "$batch" 2>&1 | tail -5 | tee "$out/throughput_torch.txt"
fi
# (2026-11-26 on an H100 the benchmarks took ~6 of a 9.5-minute call; this test set then ran
# in a second call: 114 s, docs/PERF.md)
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/models/test_mmdit.py tests/diffusion \
  tests/models/test_adapter.py tests/models/test_iomm.py 2>&1 | tail -15 | tee "$out/pytest.txt"
{ time timeout 150 python3 -m iomm_jax.cli.demo --workdir /tmp/gpu_demo --quick ; } 2>&1 \
  | grep -v -i "warning\|absl" | tail -25 | tee "$out/demo_quick.txt"
cp /tmp/gpu_demo/samples.png "$out/" 2>/dev/null
exit 0
