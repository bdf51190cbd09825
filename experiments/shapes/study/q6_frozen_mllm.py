"""Study question 6: the frozen MLLM, understanding-pre-trained (stage 0) vs random.

python experiments/shapes/study/q6_frozen_mllm.py [--scale small] [--seeds 0 1] [--write-docs]
"""

from iomm_jax.cli.study import Arm, main

ARMS = [
  Arm("stage-0 MLLM", both=(("model.mllm_init", "checkpoint"),)),
  Arm("random MLLM", both=(("model.mllm_init", "random"),)),
]

if __name__ == "__main__":
  main("q6", "Q6: frozen MLLM", ARMS, "experiments/shapes/study/q6_frozen_mllm.py")
