"""Study question 1 (paper Table 9): pre-train on Image or Pair x fine-tune on Image, Pair or Mix.

  python experiments/shapes/study/q1_recipes.py [--scale small] [--seeds 0 1] [--write-docs]

"Image" pre-training is stage 1 (image-only, masked self-conditioning); "Pair" pre-training is
text-image pairs only for the same steps and batch. Fine-tune Image / Pair / Mix = stage 2 with
lambda = 1 / 0 / 0.5. Paper (GenEval, IOMM-B): Image->Mix is best.
"""

from iomm_jax.cli.study import Arm, Contrast, main

ARMS = [
  Arm(f"{pre.capitalize()}->{ft}", pretrain=pre, finetune_overrides=(("diffusion.mix_ratio", lam),))
  for pre in ("image", "pair")
  for ft, lam in (("Image", 1.0), ("Pair", 0.0), ("Mix", 0.5))
]

# the paper's two claims: the text pairs of stage 2 are what teach text following (Image->Mix
# over Image->Image), and image-only pre-training beats pre-training on the pairs (over Pair->Mix)
CONTRASTS = (
  Contrast("text following", "Image->Mix", "Image->Image"),
  Contrast("image pre-training", "Image->Mix", "Pair->Mix"),
  Contrast("mixing in stage 2", "Image->Mix", "Image->Pair"),
)

if __name__ == "__main__":
  main(
    "q1",
    "Q1: training recipes (Table 9)",
    ARMS,
    "experiments/shapes/study/q1_recipes.py",
    contrasts=CONTRASTS,
  )
