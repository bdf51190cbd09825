#!/usr/bin/env bash
# One call on a GPU machine (jax 0.11.2 + CUDA there): installs the carried wheels of what that
# image lacks (grain, array-record, ml-collections, clu, portpicker, diffusers,
# importlib_metadata: see the device notes), then, each part under its own timeout so that a
# call stays within the device's 10 minutes per command and returns everything that finished.
# PART "bench" (default, ~10 min): 1-3; PART "rest" (a second call, if device time is left): 4-6.
#   1. the whole stage-1 step at IOMM-B size with online and with cached features
#      (benchmarks/train_step.py: samples/s, TFLOP/s, MFU, peak memory; the largest batch that
#      fits with cached features);
#   2. the generator's train step at IOMM-B size (benchmarks/generator_throughput.py, cuDNN and
#      XLA attention) beside the PyTorch baseline (../shared/bench/flux_torch_baseline.py, copied
#      to .bench/ before the call), same card, same batch;
#   3. sampling images/s at 512 px, 28 Euler steps with CFG, ours against diffusers'
#      FluxTransformer2DModel forward (benchmarks/sample_throughput.py);
#   4. the largest stage-1 batch that fits with cached features;
#   5. the CPU-independent test modules on the GPU backend;
#   6. the quick demo end to end.
# Each part writes under OUTDIR as it goes, so a cut-off run still returns what finished.
#   usage (from the repo root): bash benchmarks/gpu_check.sh OUTDIR [BATCH] [PART] [MAX_BATCH]
set -uo pipefail
out=${1:-/tmp/gpu_check}
batch=${2:-8}
part=${3:-bench}
max_batch=${4:-64}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'orbax', o.__version__, jax.devices())" 2>&1 | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$out/versions.txt"
date -u | tee -a "$out/versions.txt"
if [ "$part" = bench ]; then
  timeout 240 python3 benchmarks/train_step.py --size B --batch "$batch" --stages pretrain \
    --features online cached --set model.attention=cudnn model.remat=block 2>&1 \
    | grep -v -i "warning" | tee "$out/train_step_B.txt"
  # the XLA-attention arm was measured on 2026-11-26 (docs/PERF.md): cuDNN only, to fit the call
  timeout 120 python3 benchmarks/generator_throughput.py --size B --batch "$batch" \
    --attention cudnn 2>&1 | grep -v -i "warning" | tee "$out/throughput_jax.txt"
  if [ -f .bench/flux_torch_baseline.py ]; then
    timeout 90 python3 .bench/flux_torch_baseline.py --batch "$batch" 2>&1 | tail -5 \
      | tee "$out/throughput_torch.txt"
  fi
  timeout 140 python3 benchmarks/sample_throughput.py --size B --batch "$batch" --steps 28 \
    --attention cudnn --backend jax torch 2>&1 | grep -v -i "warning" \
    | tee "$out/sampling_B.txt"
else
  timeout 240 python3 benchmarks/train_step.py --size B --batch "$batch" --stages pretrain \
    --features cached --steps 3 --warmup 1 --max-batch "$max_batch" \
    --set model.attention=cudnn model.remat=block 2>&1 | grep -v -i "warning" \
    | tee "$out/largest_batch_B.txt"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/models/test_mmdit.py tests/diffusion \
    tests/models/test_adapter.py tests/models/test_iomm.py 2>&1 | tail -15 | tee "$out/pytest.txt"
  { time timeout 150 python3 -m iomm_jax.cli.demo --workdir /tmp/gpu_demo --quick ; } 2>&1 \
    | grep -v -i "warning\|absl" | tail -25 | tee "$out/demo_quick.txt"
  cp /tmp/gpu_demo/samples.png "$out/" 2>/dev/null
fi
exit 0
