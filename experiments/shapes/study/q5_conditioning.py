"""Study question 5: the conditioning path. Input-independent learned queries (MetaQuery style)
vs the Residual Query Adapter, in both stages.

  python experiments/shapes/study/q5_conditioning.py [--scale small] [--seeds 0 1] [--write-docs]

Paper (GenEval): raw MLLM output 0.44, learned queries 0.82, RQA 0.88. The raw-output arm is not
built yet (the generator would need a condition padding mask).
"""

from iomm_jax.study import Arm, main

ARMS = [
  Arm("learned queries", both=(("model.condition", "queries"),)),
  Arm("RQA", both=(("model.condition", "rqa"),)),
]

if __name__ == "__main__":
  main("q5", "Q5: conditioning path", ARMS, "experiments/shapes/study/q5_conditioning.py")
