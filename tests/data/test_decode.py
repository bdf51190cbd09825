"""The decoder's outcome for every hostile input (tests/data/hostile.py) and the caption
policy: each case skipped with its reason or converted to known pixel values."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from iomm_jax.data import decode
from tests.data import hostile

CASES = hostile.cases()


# duplicate_key is a property of the folder, not of the bytes: tests/data/test_prepare.py
@pytest.mark.parametrize(
  "name", sorted(n for n, c in CASES.items() if c[1].reason != "duplicate_key")
)
def test_each_hostile_case_has_its_outcome(name):
  data, expect = CASES[name]
  if expect.reason is not None:
    with pytest.raises(decode.BadRecord) as e:
      decode.load_image(data, hostile.POLICY)
    assert e.value.reason == expect.reason
    return
  img = decode.load_image(data, hostile.POLICY)
  assert img.shape == (32, 32, 3) and img.dtype == np.uint8
  if expect.rgb is not None:
    np.testing.assert_allclose(img.reshape(-1, 3), np.tile(expect.rgb, (32 * 32, 1)), atol=1)


def test_exif_orientation_6_is_applied():
  # stored 80x40 red|blue; upright 40x80 red over blue: the centre square is red above blue
  img = decode.load_image(hostile.exif_rotated(), hostile.POLICY).astype(int)
  assert (np.abs(img[2, 16] - hostile.RED) < 8).all()
  assert (np.abs(img[29, 16] - hostile.BLUE) < 8).all()
  assert (np.abs(img[2, 2] - img[2, 29]) < 8).all()  # not red | blue side by side


def test_own_pixel_limit_checked_before_decoding_and_no_global_change():
  data = hostile.encode(Image.new("RGB", (40, 40)), "PNG")
  policy = decode.ImagePolicy(resolution=32, min_size=0, max_pixels=1000)
  with pytest.raises(decode.BadRecord, match="too_many_pixels"):
    decode.load_image(data, policy)
  limit = Image.MAX_IMAGE_PIXELS
  with pytest.raises(decode.BadRecord):
    decode.load_image(hostile.png_header_only(10000, 9000), hostile.POLICY)
  assert Image.MAX_IMAGE_PIXELS == limit
  with warnings.catch_warnings(record=True):  # the "error" filter was scoped to the call
    warnings.simplefilter("default")
    warnings.warn("x", Image.DecompressionBombWarning, stacklevel=1)


def test_small_images_upscale_when_min_size_allows():
  tiny = CASES["tiny.png"][0]
  img = decode.load_image(tiny, decode.ImagePolicy(resolution=32, min_size=0))
  assert (img == hostile.RED).all()


def test_arrays_are_accepted_as_tfds_yields_them():
  a = np.zeros((20, 30, 1), np.uint8) + 7
  assert (decode.load_image(a, decode.ImagePolicy(resolution=16, min_size=0)) == 7).all()
  with pytest.raises(decode.BadRecord, match="corrupt"):
    decode.load_image(np.zeros((4, 4, 2), np.float32), decode.ImagePolicy(16, min_size=0))


@pytest.mark.parametrize(
  "raw,clean,fix",
  [
    (b"  hello \n  world  ", "hello world", None),
    ("\ufeffbom", "\ufeffbom", None),
    (b"\xef\xbb\xbfbom", "bom", None),
    (" \t\n", None, "caption_empty"),
    ("", None, "caption_empty"),
    (None, None, None),
    (b"caf\xe9", "caf\ufffd", "caption_not_utf8"),
    ("word " * 10, "word word", "caption_truncated"),
  ],
)
def test_caption_policy(raw, clean, fix):
  fixes = {}
  assert decode.clean_caption(raw, max_chars=12, fixes=fixes) == clean
  assert fixes == ({fix: 1} if fix else {})
