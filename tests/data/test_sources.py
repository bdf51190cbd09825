"""Training on prepared data (``config.data.source`` "array_record" / "tfds"): the batches match
the shapes pipeline's, a corrupt record is skipped and counted, stage 2 pairs only captioned
records, errors name the config keys and the manifest, and a short stage-1 run finishes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image

from iomm_jax import metrics
from iomm_jax.configs import specs
from iomm_jax.configs.loading import load_config
from iomm_jax.data import inputs, pipeline, prepare, records
from iomm_jax.data import shapes as S
from iomm_jax.data.tokenizer import Tokenizer
from iomm_jax.train import pretrain

EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "experiments")
AUX = "Generate an image that is identical to the reference image:"


def cfg(stage="pretrain", **overrides):
  return load_config(os.path.join(EXP, "shapes", f"{stage}.py:quick"), overrides)


def make_folder(root, n_captioned: int, n_plain: int) -> str:
  """Uniform 40x40 images: captioned ones red-ish, uncaptioned ones blue-ish."""
  os.makedirs(root)
  for i in range(n_captioned):
    Image.new("RGB", (40, 40), (200, 10 * i, 0)).save(os.path.join(root, f"c{i:02d}.png"))
    with open(os.path.join(root, f"c{i:02d}.txt"), "w") as f:
      f.write(f"a red square number {i}")
  for i in range(n_plain):
    Image.new("RGB", (40, 40), (0, 10 * i, 200)).save(os.path.join(root, f"p{i:02d}.png"))
  return root


def corrupt_record(out: str, index: int) -> None:
  """Truncates the JPEG inside record ``index`` of the first shard (counts stay as listed)."""
  with open(os.path.join(out, records.MANIFEST)) as f:
    path = os.path.join(out, json.load(f)["shards"][0]["file"])
  r = ArrayRecordReader(path)
  recs = r.read_all()
  r.close()
  rec = records.decode_record(recs[index])
  recs[index] = records.encode_record(rec["key"], rec["image"][: len(rec["image"]) // 3], None)
  w = ArrayRecordWriter(path, "group_size:1")
  for b in recs:
    w.write(b)
  w.close()


def prepared(tmp_path_factory, name, n_captioned, n_plain, corrupt=None) -> str:
  src = make_folder(str(tmp_path_factory.mktemp(name) / "src"), n_captioned, n_plain)
  out = str(tmp_path_factory.mktemp(name) / "out")
  opts = prepare.Options(resolution=32, min_size=16, records_per_shard=8)
  prepare.prepare(inputs.FolderSource(src), out, opts, progress=False)
  if corrupt is not None:
    corrupt_record(out, corrupt)
  return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return prepared(tmp_path_factory, "mixed", 11, 4, corrupt=2)


@pytest.fixture(scope="module")
def conditioner() -> pipeline.Conditioner:
  world = S.WorldConfig(canvas=24, grid=2)
  tok = Tokenizer.train(S.all_caption_corpus(world) + [AUX], 256, None)
  return pipeline.Conditioner(tok, num_image_tokens=16, aux_prompt=AUX, max_text_len=24)


def batches(config, conditioner, n):
  it = iter(pipeline.make_dataset(specs.from_config(config), conditioner))
  return [next(it) for _ in range(n)]


def test_batches_match_the_shapes_pipeline(data_dir, conditioner):
  real = batches(cfg(**{"data.source": "array_record", "data.path": data_dir}), conditioner, 2)[0]
  ref = batches(cfg(), conditioner, 1)[0]
  assert set(real) == set(ref) | {"data_skipped"}
  for k, v in ref.items():
    assert (real[k].shape, real[k].dtype) == (v.shape, v.dtype), k
  assert real["image"].shape == (4, 24, 24, 3)  # 32 px records resized to model.image_size
  assert real["is_image_only"].all()  # stage 1: every record image-only


def test_corrupt_record_is_skipped_and_counted(data_dir, conditioner):
  # 15 records, one corrupt: 8 batches of 4 = 32 good elements span more than two epochs.
  bs = batches(cfg(**{"data.source": "array_record", "data.path": data_dir}), conditioner, 8)
  skipped = sum(int(b["data_skipped"].sum()) for b in bs)
  assert 2 <= skipped <= 3
  assert all(b["data_skipped"].dtype == np.int32 for b in bs)
  # no element carries the corrupt record: every image is a uniform colour of the source set
  for b in bs:
    img = b["image"].astype(int)
    assert (np.abs(img - img[:, :1, :1]).max(axis=(1, 2, 3)) <= 4).all()


def test_stage2_pairs_only_captioned_records(data_dir, conditioner):
  c = cfg(
    "finetune",
    **{
      "data.source": "array_record",
      "data.path": data_dir,
      "diffusion.mix_ratio": 0.0,
      "train.init_from": "scratch",
    },
  )
  tok = conditioner.tokenizer
  for b in batches(c, conditioner, 6):
    for img, only, ids, valid in zip(
      b["image"], b["is_image_only"], b["cond_ids"], b["cond_valid"]
    ):
      blue = img[..., 2].mean() > 100  # the uncaptioned records are blue
      assert bool(only) == blue
      if not only:
        assert tok.decode([int(i) for i, v in zip(ids, valid) if v]).startswith("a red square")


def test_errors_name_the_config_keys_and_the_manifest(data_dir, tmp_path, conditioner):
  with pytest.raises(FileNotFoundError, match=r"config.data.path='/nowhere'"):
    pipeline.make_dataset(
      specs.from_config(cfg(**{"data.source": "array_record", "data.path": "/nowhere"})),
      conditioner,
    )
  with pytest.raises(FileNotFoundError, match="has no manifest.json"):
    pipeline.make_dataset(
      specs.from_config(cfg(**{"data.source": "array_record", "data.path": str(tmp_path)})),
      conditioner,
    )
  broken = tmp_path / "broken"
  broken.mkdir()
  for name in os.listdir(data_dir):
    (broken / name).write_bytes(open(os.path.join(data_dir, name), "rb").read())
  m = json.loads((broken / records.MANIFEST).read_text())
  m["num_records"] += 1
  (broken / records.MANIFEST).write_text(json.dumps(m))
  with pytest.raises(ValueError, match=r"config.data.path=.*broken.*manifest.json lists 16"):
    pipeline.make_dataset(
      specs.from_config(cfg(**{"data.source": "array_record", "data.path": str(broken)})),
      conditioner,
    )
  with pytest.raises(ValueError, match=r"config.data.source='parquet' unknown"):
    pipeline.make_dataset(specs.from_config(cfg(**{"data.source": "parquet"})), conditioner)
  # stage 0 reads captioned records (tests/data/test_own_data.py), but images, not features
  with pytest.raises(ValueError, match=r"config.data.features=.*stage 0 trains the MLLM's own"):
    c = load_config(os.path.join(EXP, "shapes", "mllm.py:quick"))
    with c.unlocked():
      c.data.source, c.data.path, c.data.features = "array_record", data_dir, str(tmp_path)
    pipeline.make_dataset(specs.from_config(c), conditioner, seq_len=64)
  with pytest.raises(ValueError, match="config.data.tfds_name='nope'"):
    pipeline.make_dataset(
      specs.from_config(
        cfg(**{"data.source": "tfds", "data.path": str(tmp_path), "data.tfds_name": "nope"})
      ),
      conditioner,
    )


def test_tfds_source(tfds_dir, conditioner):
  root, builder_dir = tfds_dir
  for over in (
    {"data.path": builder_dir},
    {"data.path": root, "data.tfds_name": "iomm_tiny_pairs"},
  ):
    b = batches(cfg(**{"data.source": "tfds", **over}), conditioner, 3)
    levels = {int(v) for bb in b for v in bb["image"][:, 0, 0, 0]}
    assert levels <= {0, 40, 80, 120, 160} and len(levels) >= 3
    assert sum(int(bb["data_skipped"].sum()) for bb in b) == 0


def test_worker_processes_read_the_same_stream(data_dir, conditioner):
  over = {"data.source": "array_record", "data.path": data_dir}
  a = batches(cfg(**over), conditioner, 3)
  b = batches(cfg(**over, **{"data.num_workers": 1}), conditioner, 3)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_stage1_trains_on_prepared_data_with_a_corrupt_record(tmp_path_factory):
  # 5 records, one corrupt: 3 steps of batch 4 take 12 good records, so it is met twice or more
  out = prepared(tmp_path_factory, "train", 3, 2, corrupt=1)
  wd = str(tmp_path_factory.mktemp("run") / "pretrain")
  c = cfg(
    **{
      "data.source": "array_record",
      "data.path": out,
      "model.mllm_init": "random",
      "train.num_steps": 3,
      "train.log_every": 1,
    }
  )
  pretrain.train_and_evaluate(c, wd)
  recs = metrics.read_metrics(wd)
  assert [r["step"] for r in recs] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) for r in recs)
  counts = [r["data_skipped"] for r in recs]
  assert counts == sorted(counts) and counts[-1] >= 2  # cumulative


def test_iterator_state_restores_the_stream(data_dir, conditioner):
  c = cfg(**{"data.source": "array_record", "data.path": data_dir})
  it = iter(pipeline.make_dataset(specs.from_config(c), conditioner))
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  again = iter(pipeline.make_dataset(specs.from_config(c), conditioner))
  again.set_state(state)
  for x, y in zip(want, [next(again) for _ in range(3)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
