"""Typed, frozen run specs (configs/specs.py) and the one upgrade of old workdir configs."""

import dataclasses
import json
import os

import ml_collections
import pytest

from iomm_jax.configs import specs
from iomm_jax.configs.base import get_base_config
from iomm_jax.configs.loading import load_config
from tests.conftest import ROOT


def _json_roundtrip(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(c.to_json()))


def test_every_base_key_has_a_typed_field_and_back():
  """The specs mirror the base config: every key of each section is a field, and no more."""
  c = get_base_config()
  spec = specs.from_config(c)
  for name, cls in specs.SECTIONS.items():
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields == set(c[name].keys()), name
  assert {f.name for f in dataclasses.fields(specs.LoRASpec)} == set(c.model.lora.keys())
  assert spec.model.lora == specs.LoRASpec()
  assert spec.data.shapes == tuple(c.data.shapes) and isinstance(spec.optim.lr, float)


def test_specs_are_frozen():
  spec = specs.from_config(get_base_config())
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.model.num_queries = 3
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.sample = None


EXPERIMENTS = sorted(
  os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "experiments"))
  for d, _, files in os.walk(os.path.join(ROOT, "experiments"))
  for f in files
  if f.endswith(".py") and "study" not in d
)


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_a_saved_config_gives_the_same_specs(path):
  """Every experiment file's config gives complete specs, and its config.json (tuples stored as
  lists) gives the same ones."""
  arg = ":data=/prepared" if path.startswith("folder") else ""  # (not read here)
  c = load_config(os.path.join(ROOT, "experiments", path) + arg)
  assert specs.from_config(_json_roundtrip(c)) == specs.from_config(c)


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("model.num_queries", "many", r"config.model.num_queries='many' must be an integer"),
    ("optim.lr", "fast", r"config.optim.lr='fast' must be a number"),
    ("data.shapes", "circle", r"config.data.shapes='circle' must be a tuple"),
    ("sample.use_ema", 1, r"config.sample.use_ema=1 must be True or False"),
    ("model.codec", 3, r"config.model.codec=3 must be a string"),
  ],
)
def test_a_value_of_the_wrong_type_names_its_key(key, value, message):
  """A hand-edited config.json (a ConfigDict casts on assignment; JSON does not)."""
  c = json.loads(get_base_config().to_json())
  section, leaf = key.split(".")
  c[section][leaf] = value
  with pytest.raises(ValueError, match=message):
    specs.from_config(c)


def test_a_missing_key_is_named_until_upgraded():
  c = _json_roundtrip(get_base_config())
  del c.train["grad_accum"]
  with pytest.raises(KeyError, match="config.train.grad_accum is missing"):
    specs.from_config(c)
  assert specs.upgrade(c) == ["train.grad_accum"]
  assert specs.from_config(c).train.grad_accum == 1


def test_upgrade_gives_an_old_workdir_what_it_trained_with():
  """A config.json from before data.shapes / data.holdout / model.lora existed: the world it was
  trained in (three shapes, hold-out v1), LoRA off, and today's defaults elsewhere."""
  c = _json_roundtrip(get_base_config())
  for section, leaf in (("data", "shapes"), ("data", "holdout"), ("model", "lora"),
                        ("model", "prediction")):  # fmt: skip
    del c[section][leaf]
  added = specs.upgrade(c)
  assert sorted(added) == ["data.holdout", "data.shapes", "model.lora", "model.prediction"]
  spec = specs.from_config(c)
  assert spec.data.shapes == ("circle", "square", "triangle") and spec.data.holdout == "v1"
  assert spec.model.lora.rank == 0 and spec.model.prediction == "velocity"
  assert specs.upgrade(c) == []  # a second upgrade adds nothing
  # a current config is left as it is
  fresh = get_base_config()
  assert specs.upgrade(fresh) == [] and fresh.data.holdout == "v2"


def test_load_workdir_config_upgrades(tmp_path):
  from iomm_jax.assembly import workdirs

  record = json.loads(get_base_config().to_json())
  del record["data"]["holdout"], record["train"]["grad_accum"]
  (tmp_path / "config.json").write_text(json.dumps(record))
  config = workdirs.load_workdir_config(str(tmp_path))
  assert config.data.holdout == "v1" and config.train.grad_accum == 1
  specs.from_config(config)  # complete
