"""Study question 4: data efficiency. Stage-2 pair budget with and without image-only
pre-training (the same stage-2 steps either way; "none" starts stage 2 from a random init).

  python experiments/shapes/study/q4_pair_budget.py [--scale small] [--seeds 0 1] [--write-docs]

Paper's central claim: the image-only stage cuts the number of pairs needed.
"""

from iomm_jax.cli.study import Arm, Contrast, main

BUDGETS = (100, 300, 1000, 3000)
ARMS = [
  Arm(
    f"{n} pairs, {'image pre-train' if pre else 'no pre-train'}",
    pretrain=pre,
    finetune_overrides=(("data.num_pairs", n),),
  )
  for pre in ("image", None)
  for n in BUDGETS
]
# the paper's central claim, per budget: image-only pre-training minus none
CONTRASTS = tuple(
  Contrast(f"{n} pairs", f"{n} pairs, image pre-train", f"{n} pairs, no pre-train") for n in BUDGETS
)

if __name__ == "__main__":
  main(
    "q4",
    "Q4: stage-2 pair budget",
    ARMS,
    "experiments/shapes/study/q4_pair_budget.py",
    contrasts=CONTRASTS,
  )
