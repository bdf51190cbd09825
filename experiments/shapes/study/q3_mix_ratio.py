"""Study question 3: the stage-2 mix ratio lambda (share of image-only samples).

  python experiments/shapes/study/q3_mix_ratio.py [--scale small] [--seeds 0 1] [--write-docs]

Paper: lambda = 0.5.
"""

from iomm_jax.cli.study import Arm, main

ARMS = [
  Arm(f"lambda={lam}", finetune_overrides=(("diffusion.mix_ratio", lam),))
  for lam in (0.1, 0.3, 0.5, 0.7, 0.9)
]

if __name__ == "__main__":
  main("q3", "Q3: stage-2 mix ratio", ARMS, "experiments/shapes/study/q3_mix_ratio.py")
