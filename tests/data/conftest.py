"""Fixtures shared by the data tests: a tiny tfds dataset written on disk by the test itself."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A tiny tfds dataset (ArrayRecord files) written by the test itself; nothing downloads."""
  import tensorflow_datasets as tfds

  root = str(tmp_path_factory.mktemp("tfds"))
  feats = tfds.features.FeaturesDict(
    {"image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}
  )
  data = [
    (str(i), {"image": np.full((20 + i, 30, 3), 40 * i, np.uint8), "caption": f"tfds {i}"})
    for i in range(5)
  ]
  builder = tfds.dataset_builders.store_as_tfds_dataset(
    name="iomm_tiny_pairs",
    version="1.0.0",
    features=feats,
    split_datasets={"train": data},
    data_dir=root,
    file_format="array_record",
  )
  return root, str(builder.data_dir)
