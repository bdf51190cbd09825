#!/usr/bin/env bash
# The IOMM recipe on one host: stage 0 (shapes only) -> stage 1 (image-only) -> stage 2 (mix).
#
#   launch/recipe.sh runs/shapes                 # the embedded shapes world, full size
#   launch/recipe.sh /tmp/quick :quick           # seconds-long variant of every stage
#
# Each stage resumes if its workdir already has checkpoints; extra arguments after the
# variant are passed to every iomm-train call (e.g. --config.seed=1). A stage stopped by SIGTERM
# saves and exits 75, which ends the script here (set -e): rerun it to go on.
set -euo pipefail
root=${1:?usage: launch/recipe.sh WORKDIR [:variant] [iomm-train flags...]}
variant=${2:-}
shift $(( $# < 2 ? $# : 2 ))
exp=experiments/shapes
iomm-train --config "$exp/mllm.py$variant" --workdir "$root/mllm" "$@"
iomm-train --config "$exp/pretrain.py$variant" --workdir "$root/pretrain" \
  --config.model.mllm_from="$root/mllm" "$@"
iomm-train --config "$exp/finetune.py$variant" --workdir "$root/finetune" \
  --config.model.mllm_from="$root/mllm" --config.train.init_from="$root/pretrain" "$@"
