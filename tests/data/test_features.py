"""The cached-feature record format (``iomm_jax.data.features``): arrays round-trip bit-exactly in
bfloat16 and float32, undecodable records stay markers, sizes come from the shapes, and a folder
that is not a finished features folder is named in the error."""

from __future__ import annotations

import json

import ml_dtypes
import msgpack
import numpy as np
import pytest

from iomm_jax.data import features


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_records_round_trip_bit_exactly(dtype):
  specs = features.array_specs(4, 3, (2, 2, 5), True, dtype)
  assert [name for name, _, _ in specs] == ["vision", "latent_mean", "latent_std"]
  rng = np.random.default_rng(0)
  arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape, _ in specs}
  data = features.encode_record("k", "a caption", arrays, specs)
  rec = features.decode_record(data, specs)
  assert (rec["key"], rec["caption"]) == ("k", "a caption")
  for name, shape, _ in specs:
    want = arrays[name].astype(features.DTYPES[dtype])  # the cast is the only rounding
    assert rec[name].dtype == features.DTYPES[dtype] and rec[name].shape == shape
    assert rec[name].tobytes() == want.tobytes()
  # the stored bytes are the arrays plus a small msgpack frame
  assert 0 < len(data) - features.feature_bytes(specs) < 100


def test_sizes_come_from_the_shapes():
  # IOMM-B at 512 px: 256 tokens of 1536, 64 x 64 x 16 latents, mean and std, bf16 (docs/PERF.md)
  specs = features.array_specs(256, 1536, (64, 64, 16), True, "bfloat16")
  assert features.feature_bytes(specs) == 256 * 1536 * 2 + 2 * 64 * 64 * 16 * 2 == 2**20
  pixel = features.array_specs(36, 128, (12, 12, 12), False, "float32")
  assert features.feature_bytes(pixel) == (36 * 128 + 12 * 12 * 12) * 4
  assert features.specs_from_json(json.loads(json.dumps(features.specs_to_json(specs)))) == specs
  with pytest.raises(ValueError, match="float16"):
    features.array_specs(1, 1, (1, 1, 1), False, "float16")


def test_bad_and_malformed_records():
  specs = features.array_specs(2, 2, (1, 1, 1), False, "bfloat16")
  assert features.decode_record(features.encode_bad("k7", "corrupt"), specs) == {
    "key": "k7",
    "bad": "corrupt",
  }
  with pytest.raises(ValueError, match="not msgpack"):
    features.decode_record(b"\xc1", specs)
  short = msgpack.packb({"key": "k", "caption": None, "vision": b"12", "latent_mean": b"12"})
  with pytest.raises(ValueError, match="lacks 'vision'"):
    features.decode_record(short, specs)
  with pytest.raises(ValueError, match="has shape"):
    features.encode_record("k", None, {"vision": np.zeros((3, 2)), "latent_mean": 0}, specs)
  assert features.DTYPES["bfloat16"] == np.dtype(ml_dtypes.bfloat16)


def test_manifest_errors_name_the_key_and_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config.data.features='/nowhere'"):
    features.read_manifest("/nowhere")
  with pytest.raises(FileNotFoundError, match="has no manifest.json.*resume"):
    features.read_manifest(str(tmp_path))
  (tmp_path / "manifest.json").write_text(json.dumps({"format": "iomm-array-record"}))
  with pytest.raises(ValueError, match="has format 'iomm-array-record'"):
    features.read_manifest(str(tmp_path), what="--features")
