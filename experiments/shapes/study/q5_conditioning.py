"""Study question 5: the conditioning path, in both stages: the frozen MLLM's raw last hidden
states of the input tokens, input-independent learned queries (MetaQuery style), or the Residual
Query Adapter (``config.model.condition`` "raw" / "queries" / "rqa").

  python experiments/shapes/study/q5_conditioning.py [--scale small] [--seeds 0 1] [--write-docs]

Paper (GenEval): raw MLLM output 0.44, learned queries 0.82, RQA 0.88. Our "raw" zeroes the
padding positions of the context, but the MM-DiT (like FLUX) has no condition mask, so short
prompts still show the generator some zero tokens.
"""

from iomm_jax.cli.study import Arm, main

ARMS = [
  Arm("raw MLLM output", both=(("model.condition", "raw"),)),
  Arm("learned queries", both=(("model.condition", "queries"),)),
  Arm("RQA", both=(("model.condition", "rqa"),)),
]

if __name__ == "__main__":
  main("q5", "Q5: conditioning path", ARMS, "experiments/shapes/study/q5_conditioning.py")
