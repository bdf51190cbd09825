"""``iomm-prepare`` against hostile *file-system* inputs and caption fields (the byte-level
hostile set is tests/data/hostile.py): non-UTF-8 names, FIFOs and devices, oversized and
unreadable files and folders, bad caption fields, UTF-16 captions, lying PNG headers and settings
that can keep nothing. Anything that could block runs under ``no_hang`` (SIGALRM), so a
regression fails the test instead of hanging the run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tarfile

import numpy as np
import pytest
from PIL import Image

from iomm_jax.data import decode, inputs, prepare
from tests.data import hostile
from tests.data.test_prepare import read_all, run_cli, solid

OPTS = prepare.Options(resolution=32, min_size=16, records_per_shard=4)


@contextlib.contextmanager
def no_hang(seconds: int = 20):
  """Raises TimeoutError in the block after ``seconds`` (a blocking open() is interrupted)."""

  def expired(signum, frame):
    raise TimeoutError(f"blocked for more than {seconds} s")

  old = signal.signal(signal.SIGALRM, expired)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def run(src: str, out: str, opts=OPTS, **kw) -> dict:
  """Prepares folder ``src`` into ``out`` (guarded by ``no_hang``); returns the manifest."""
  with no_hang():
    return prepare.prepare(inputs.FolderSource(src, **kw), out, opts, progress=False)


def skipped(out: str) -> dict[str, tuple[str, str]]:
  """{key: (reason, detail)} of ``out/skipped.jsonl``."""
  with open(os.path.join(out, prepare.SKIPPED)) as f:
    return {s["key"]: (s["reason"], s["detail"]) for s in map(json.loads, f)}


def test_non_utf8_names_keep_their_bytes(tmp_path):
  src = tmp_path / "src"
  (src / "ok").mkdir(parents=True)
  broot = os.fsencode(src)
  with open(os.path.join(broot, b"caf\xe9.png"), "wb") as f:
    f.write(solid((255, 0, 0)))
  with open(os.path.join(broot, b"caf\xe9.txt"), "wb") as f:
    f.write(b"latin-1 name")
  os.mkdir(os.path.join(broot, b"d\xff"))
  with open(os.path.join(broot, b"d\xff", b"x.jpg"), "wb") as f:
    f.write(b"")  # a skip whose key and detail hold the escaped name
  (src / "ok" / "a.png").write_bytes(solid((0, 0, 255)))
  out = str(tmp_path / "o")
  m = run(str(src), out)
  assert m["num_records"] == 2 and m["skipped"] == {"empty": 1}
  caps = {r["key"]: r["caption"] for r in read_all(out)}
  assert caps == {"caf\\xe9": "latin-1 name", "ok/a": None}
  assert skipped(out)["d\\xff/x"] == ("empty", "d\\xff/x.jpg: zero bytes")
  assert not any(".tmp-" in n for n in os.listdir(out))


def test_fifo_named_png_is_skipped_without_opening(tmp_path):
  if not hasattr(os, "mkfifo"):
    pytest.skip("this OS cannot create a FIFO")
  src = tmp_path / "src"
  src.mkdir()
  os.mkfifo(src / "pipe.png")
  (src / "real.png").write_bytes(solid((0, 255, 0)))
  os.mkfifo(src / "real.txt")  # a FIFO sidecar: the image is kept without a caption
  out = str(tmp_path / "o")
  m = run(str(src), out)
  assert m["num_records"] == 1 and m["caption_fixes"] == {"caption_not_a_file": 1}
  assert m["skipped"] == {"not_a_file": 1}
  assert skipped(out)["pipe"] == ("not_a_file", "pipe.png is a FIFO")


def test_symlinks_to_endless_devices_are_skipped(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name, dev in (("zero.png", "/dev/zero"), ("random.jpg", "/dev/urandom")):
    if not os.path.exists(dev):
      pytest.skip(f"this OS has no {dev}")
    os.symlink(dev, src / name)
  (src / "real.png").write_bytes(solid((0, 255, 0)))
  out = str(tmp_path / "o")
  m = run(str(src), out)
  assert m["num_records"] == 1 and m["skipped"] == {"not_a_file": 2}
  assert skipped(out)["zero"] == ("not_a_file", "zero.png is a character device")


def test_files_over_the_size_cap_are_skipped_unread(tmp_path, capsys):
  src = tmp_path / "src"
  src.mkdir()
  big = solid((9, 9, 9), "BMP", (64, 64))  # 12 KiB
  (src / "big.bmp").write_bytes(big)
  (src / "small.png").write_bytes(solid((0, 255, 0)))
  (src / "small.txt").write_bytes(b"x" * (inputs.SIDECAR_BYTES + 1))
  out = str(tmp_path / "o")
  m = run(str(src), out, max_file_bytes=4096)
  assert m["skipped"] == {"too_large": 1} and m["source"]["max_file_bytes"] == 4096
  assert skipped(out)["big"] == ("too_large", f"big.bmp: {len(big)} bytes > --max-file-bytes 4096")
  assert m["caption_fixes"] == {"caption_too_large": 1}
  code, _, err = run_cli(["--images", str(src), "--out", out, "--max-file-bytes", "0"], capsys)
  assert code == 2 and "--max-file-bytes 0" in err
  code, text, _ = run_cli(
    [
      "--images",
      str(src),
      "--out",
      str(tmp_path / "c"),
      "--max-file-bytes",
      "4096",
      "--resolution",
      "32",
    ],
    capsys,
  )
  assert code == 0 and "too_large: 1" in text


def test_unreadable_files_are_counted_skips(tmp_path, monkeypatch):
  """A dangling symlink is unreadable for anyone; permission denied is simulated at ``os.open``
  (chmod cannot deny root, which this test may run as)."""
  src = tmp_path / "src"
  src.mkdir()
  os.symlink(src / "gone.png", src / "dangling.png")
  (src / "denied.png").write_bytes(solid((1, 2, 3)))
  (src / "fine.png").write_bytes(solid((0, 255, 0)))
  real_open = os.open

  def deny(path, *a, **kw):
    if os.fspath(path).endswith("denied.png"):
      raise PermissionError(13, "Permission denied", path)
    return real_open(path, *a, **kw)

  monkeypatch.setattr(os, "open", deny)
  out = str(tmp_path / "o")
  m = run(str(src), out)
  assert m["num_records"] == 1 and m["skipped"] == {"unreadable": 2}
  got = skipped(out)
  assert got["dangling"] == ("unreadable", "dangling.png: No such file or directory")
  assert got["denied"] == ("unreadable", "denied.png: Permission denied")


def deny_listing(monkeypatch, denied: str) -> None:
  """Makes listing folder ``denied`` fail as a folder without read permission does, through
  ``os.scandir`` (what ``os.walk`` lists with); chmod cannot deny root."""
  real_scandir = os.scandir

  def scandir(path="."):
    if os.path.normpath(os.fspath(path)) == os.path.normpath(denied):
      raise PermissionError(13, "Permission denied", path)
    return real_scandir(path)

  monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_folder_is_a_counted_skip(tmp_path, monkeypatch, capsys):
  src = tmp_path / "src"
  (src / "locked").mkdir(parents=True)
  (src / "locked" / "a.png").write_bytes(solid((1, 2, 3)))
  (src / "b.png").write_bytes(solid((0, 255, 0)))
  deny_listing(monkeypatch, str(src / "locked"))
  out = str(tmp_path / "o")
  m = run(str(src), out)
  assert m["num_items"] == 2 and m["num_records"] == 1 and m["skipped"] == {"unreadable": 1}
  assert skipped(out) == {"locked/": ("unreadable", "locked/: Permission denied")}
  args = ["--images", str(src), "--out", str(tmp_path / "c"), "--resolution", "32"]
  code, text, _ = run_cli(args, capsys)
  assert code == 0 and "unreadable: 1" in text and prepare.SKIPPED in text


def test_unreadable_root_is_one_clear_error(tmp_path, monkeypatch, capsys):
  src = tmp_path / "src"
  src.mkdir()
  (src / "a.png").write_bytes(solid((1, 2, 3)))
  deny_listing(monkeypatch, str(src))
  with pytest.raises(inputs.InputError, match="cannot be read: Permission denied"):
    inputs.FolderSource(str(src))
  code, _, err = run_cli(["--images", str(src), "--out", str(tmp_path / "o")], capsys)
  last = err.strip().splitlines()[-1]
  assert code == 2 and f"--images {str(src)!r} cannot be read" in last
  assert "Traceback" not in err and "holds no records" not in err


def test_bad_caption_fields_in_jsonl(tmp_path, capsys):
  src = tmp_path / "src"
  src.mkdir()
  for name in ("num", "list", "null", "nokey", "ok"):
    (src / f"{name}.png").write_bytes(solid((0, 255, 0)))
  jl = tmp_path / "caps.jsonl"
  lines = [
    {"file": "num.png", "caption": 5},
    {"file": "list.png", "caption": ["a", "b"]},
    {"file": "null.png", "caption": None},
    {"file": "nokey.png"},
    {"file": "ok.png", "caption": "fine"},
  ]
  jl.write_text("".join(json.dumps(x) + "\n" for x in lines))
  m = run(str(src), str(tmp_path / "o"), captions_jsonl=str(jl))
  assert m["num_records"] == 5 and m["num_captioned"] == 1
  assert m["caption_fixes"] == {"caption_not_a_string": 4}
  for bad in ({"file": 5, "caption": "x"}, ["file", "caption"], {"caption": "x"}):
    jl.write_text(json.dumps(lines[-1]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(inputs.InputError, match="caps.jsonl:2: expected a JSON object with a str"):
      inputs.FolderSource(str(src), str(jl))
  out = str(tmp_path / "o2")
  code, _, err = run_cli(["--images", str(src), "--out", out, "--captions-jsonl", str(jl)], capsys)
  assert code == 2 and "caps.jsonl:2" in err and "Traceback" not in err


def test_bad_json_sidecars_and_tar_and_parquet_captions(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  sidecars = {
    "list": json.dumps({"caption": ["a"]}),
    "num": json.dumps({"caption": 3}),
    "notjson": "{caption: oops",
    "array": json.dumps(["a caption"]),
    "ok": json.dumps({"caption": "fine"}),
  }
  for stem, text in sidecars.items():
    (src / f"{stem}.png").write_bytes(solid((0, 255, 0)))
    (src / f"{stem}.json").write_text(text)
  m = run(str(src), str(tmp_path / "o"))
  assert m["num_records"] == 5 and m["num_captioned"] == 1
  assert m["caption_fixes"] == {"caption_bad_json": 2, "caption_not_a_string": 2}
  with tarfile.open(tmp_path / "s.tar", "w") as tf:
    for name, data in [
      (b"k\xe9.png".decode("utf-8", "surrogateescape"), solid((0, 255, 0))),
      ("k\udce9.json", b'{"caption": null}'),
    ]:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  m = prepare.prepare(
    inputs.TarSource([str(tmp_path / "s.tar")]), str(tmp_path / "t"), OPTS, progress=False
  )
  assert [r["key"] for r in read_all(str(tmp_path / "t"))] == ["k\\xe9"]
  assert m["caption_fixes"] == {"caption_not_a_string": 1}
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"image": [solid((0, 255, 0))], "caption": [7]}), tmp_path / "p.parquet")
  src_pq = inputs.ParquetSource([str(tmp_path / "p.parquet")])
  m = prepare.prepare(src_pq, str(tmp_path / "p"), OPTS, progress=False)
  assert m["num_captioned"] == 0 and m["caption_fixes"] == {"caption_not_a_string": 1}


TEXT = {"le_bom": "a red dress", "be_bom": "a blue coat", "le": "grey sneaker", "be": "black boot"}
UTF16 = {
  "le_bom": b"\xff\xfe" + TEXT["le_bom"].encode("utf-16-le"),
  "be_bom": b"\xfe\xff" + TEXT["be_bom"].encode("utf-16-be"),
  "le": TEXT["le"].encode("utf-16-le"),  # no BOM: the NUL pattern
  "be": TEXT["be"].encode("utf-16-be"),
}


@pytest.mark.parametrize("name", sorted(UTF16))
def test_utf16_captions_are_decoded(name):
  fixes = {}
  assert decode.clean_caption(UTF16[name], fixes=fixes) == TEXT[name]
  assert fixes == {"caption_utf16": 1}


def test_utf16_sidecars_and_nul_free_text_untouched(tmp_path):
  fixes = {}
  assert decode.clean_caption("naïve café".encode(), fixes=fixes) == "naïve café"
  assert decode.clean_caption("bad \udce9 surrogate", fixes=fixes) == "bad ? surrogate"
  assert fixes == {"caption_not_utf8": 1}
  src = tmp_path / "src"
  src.mkdir()
  for stem, data in UTF16.items():
    (src / f"{stem}.png").write_bytes(solid((0, 255, 0)))
    (src / f"{stem}.txt").write_bytes(data)
  out = str(tmp_path / "o")
  m = run(str(src), out)
  assert m["caption_fixes"] == {"caption_utf16": 4}
  assert all("\0" not in r["caption"] for r in read_all(out))


def test_lying_png_header_refused_before_decoding(monkeypatch):
  from PIL import ImageFile

  loads = []  # ImageFile.load allocates the declared image, then decodes into it
  real_load = ImageFile.ImageFile.load

  def load(self):
    loads.append(self.size)
    return real_load(self)

  monkeypatch.setattr(ImageFile.ImageFile, "load", load)
  liar = hostile.png_header_only(8000, 8000)  # exactly max_pixels: the size check passes
  assert len(liar) < 100
  with pytest.raises(decode.BadRecord) as e:
    decode.load_image(liar, decode.ImagePolicy(resolution=32, min_size=0), "big/liar.png")
  assert e.value.reason == "corrupt" and loads == []
  assert e.value.detail.startswith("big/liar.png: declares 8000x8000")
  ok = solid((0, 255, 0), size=(800, 800))  # a uniform PNG really compresses that well
  assert decode.load_image(ok, decode.ImagePolicy(resolution=32)).shape == (32, 32, 3)
  assert set(loads) == {(800, 800)}  # decoded only once accepted


def test_not_an_image_detail_names_the_file(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "notes.png").write_bytes(b"just some text\n")
  (src / "liar.png").write_bytes(hostile.png_header_only(8000, 8000))
  out = str(tmp_path / "o")
  run(str(src), out, opts=prepare.Options(resolution=32, min_size=0))
  got = skipped(out)
  assert got["notes"][0] == "not_an_image" and got["notes"][1].startswith("notes.png: ")
  assert "BytesIO" not in got["notes"][1]
  assert got["liar"][0] == "corrupt" and got["liar"][1].startswith("liar.png: declares")


def test_settings_that_can_keep_nothing_are_refused(tmp_path, capsys):
  with pytest.raises(inputs.InputError, match="--max-pixels 5000 is below --min-size 100"):
    prepare.Options(resolution=32, min_size=100, max_pixels=5000).check()
  src = tmp_path / "src"
  src.mkdir()
  for i in range(3):  # Fashion-MNIST-sized
    (src / f"{i}.png").write_bytes(hostile.encode(Image.new("L", (28, 28), 9 * i), "PNG"))
  out = str(tmp_path / "o")
  code, _, err = run_cli(
    ["--images", str(src), "--out", out, "--resolution", "32", "--max-pixels", "1000"], capsys
  )
  assert code == 2 and "--max-pixels 1000 is below --min-size 32" in err
  assert not os.path.exists(out)
  code, text, err = run_cli(["--images", str(src), "--out", out, "--resolution", "32"], capsys)
  assert code == 2 and "wrote 0 records" in text
  last = err.strip().splitlines()[-1]
  assert "wrote no records" in last and "--min-size 32" in last and "--resolution 32" in last
  code, text, _ = run_cli(
    ["--images", str(src), "--out", str(tmp_path / "k"), "--resolution", "32", "--min-size", "0"],
    capsys,
  )
  assert code == 0 and "wrote 3 records" in text
  # the default --min-size follows a smaller --resolution: 40 px images are kept at 32 px
  (src / "big.png").write_bytes(solid((0, 255, 0)))
  code, text, _ = run_cli(
    ["--images", str(src), "--out", str(tmp_path / "d"), "--resolution", "32"], capsys
  )
  assert code == 0 and "wrote 1 records" in text
  assert np.asarray(read_all(str(tmp_path / "d"))[0]["pixels"]).shape == (32, 32, 3)
