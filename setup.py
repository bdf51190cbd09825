"""iomm_jax: IOMM (image-only masked modeling for UMM visual generation) in JAX/Flax."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent


def _reqs(name):
  lines = (HERE / name).read_text().splitlines()
  return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
  name="iomm_jax",
  version="0.1.0",
  description="IOMM: masked modeling for efficient image-only pre-training of UMM generators",
  packages=find_packages(include=["iomm_jax", "iomm_jax.*"]),
  python_requires=">=3.11",
  install_requires=_reqs("requirements.txt"),
  extras_require={"test": _reqs("requirements-test.txt")},
  entry_points={
    "console_scripts": [
      "iomm-train=iomm_jax.cli.train:main",
      "iomm-sample=iomm_jax.cli.sample:main",
      "iomm-demo=iomm_jax.cli.demo:main",
      "iomm-eval=iomm_jax.cli.evaluate:main",
      "iomm-convert=iomm_jax.cli.convert:main",
      "iomm-prepare=iomm_jax.cli.prepare:main",
      "iomm-cache-features=iomm_jax.cli.cache_features:main",
      "iomm-plan=iomm_jax.cli.plan:main",
      "iomm-chat=iomm_jax.cli.chat:main",
      "iomm-edit=iomm_jax.cli.edit:main",
    ]
  },
)
