"""Study question 2: the stage-1 mask ratio r (then the same stage 2, r = 0.85, lambda = 0.5).

  python experiments/shapes/study/q2_mask_ratio.py [--scale small] [--seeds 0 1] [--write-docs]

Paper: r = 0.85 for IOMM-B/L (0.45 for XL); r = 0 lets stage 1 copy its condition. Two tables:
the stage-2 models' shapes GenEval, and the stage-1 models' reconstruction control (each stage-1
model given a scene as its own condition, unmasked and masked): does a low r teach the generator
to copy its vision tokens, and a high one to read them at all?
"""

from iomm_jax.cli.study import Arm, Contrast, main

ARMS = [
  Arm(f"r={r}", pretrain_overrides=(("diffusion.mask_ratio", r),)) for r in (0.0, 0.45, 0.85, 0.95)
]
CONTRASTS = (
  Contrast("masking vs copying", "r=0.85", "r=0.0"),
  Contrast("0.85 vs 0.45 (the paper's XL setting)", "r=0.85", "r=0.45"),
  Contrast("0.85 vs 0.95", "r=0.85", "r=0.95"),
)
SCRIPT = "experiments/shapes/study/q2_mask_ratio.py"

if __name__ == "__main__":
  main("q2", "Q2: stage-1 mask ratio", ARMS, SCRIPT, contrasts=CONTRASTS)
  main("q2r", "Q2: stage-1 reconstruction per mask ratio", ARMS, SCRIPT, metric="reconstruction")
