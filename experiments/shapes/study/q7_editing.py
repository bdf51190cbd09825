"""Study question 7: zero-shot editing. Question 1's six recipes, given a source image and an
instruction ("make the circle blue", "add a green square") they were never trained on
(``iomm_jax.eval.shapes_editing``): edit success and preservation of the rest of the scene.

  python experiments/shapes/study/q7_editing.py [--scale small] [--seeds 0 1] [--write-docs]

Trains nothing new: it reuses (or trains) question 1's runs under the same --root.
"""

from q1_recipes import ARMS

from iomm_jax.cli.study import main

if __name__ == "__main__":
  main(
    "q7",
    "Q7: zero-shot editing of the Table 9 recipes",
    ARMS,
    "experiments/shapes/study/q7_editing.py",
    metric="editing",
    runs="q1",
  )
