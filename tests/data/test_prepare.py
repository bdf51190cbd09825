"""``iomm-prepare`` end to end: every input format, hostile files, resume after an interruption,
multi-process disjointness, the skipped-record report and the CLI's exit codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from iomm_jax.cli import prepare as cli
from iomm_jax.data import decode, inputs, prepare, records
from tests.data import hostile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPTS = prepare.Options(resolution=32, min_size=16, records_per_shard=4)


def read_all(out: str) -> list[dict]:
  """Every record of a prepared folder, in shard order, images decoded."""
  from array_record.python.array_record_module import ArrayRecordReader

  with open(os.path.join(out, records.MANIFEST)) as f:
    manifest = json.load(f)
  recs = []
  for s in manifest["shards"]:
    r = ArrayRecordReader(os.path.join(out, s["file"]))
    for b in r.read_all():
      rec = records.decode_record(b)
      rec["pixels"] = np.asarray(Image.open(io.BytesIO(rec["image"])))
      recs.append(rec)
    r.close()
  return recs


def photo(seed: int, size=(48, 40)) -> bytes:
  a = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)
  return hostile.encode(Image.fromarray(a), "JPEG", quality=95)


def solid(rgb, fmt="PNG", size=(40, 40)) -> bytes:
  return hostile.encode(Image.new("RGB", size, rgb), fmt)


# ----------------------------------------------------------------------------- image folder


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
  src = str(tmp_path_factory.mktemp("hostile"))
  expect = hostile.make_hostile_folder(src)
  out = str(tmp_path_factory.mktemp("out"))
  manifest = prepare.prepare(inputs.FolderSource(src), out, OPTS, progress=False)
  return src, out, expect, manifest


def test_folder_with_hostile_files(hostile_run):
  src, out, expect, manifest = hostile_run
  want_skips = {}
  for e in expect.values():
    if e.reason:
      want_skips[e.reason] = want_skips.get(e.reason, 0) + 1
  assert manifest["skipped"] == want_skips  # every case with its reason, counted once
  assert manifest["num_items"] == len(expect)  # the symlink loop added nothing and ended
  kept = sorted(k.rsplit(".", 1)[0] for k, e in expect.items() if e.reason is None)
  recs = read_all(out)
  assert sorted(r["key"] for r in recs) == kept
  by_key = {r["key"]: r for r in recs}
  for rel, e in expect.items():
    key = rel.rsplit(".", 1)[0]
    if e.rgb is not None:  # stored as JPEG q95 4:4:4: within a few levels
      assert np.abs(by_key[key]["pixels"].astype(int) - e.rgb).max() <= 3, rel
  for stem, cap in hostile.CAPTIONS.items():
    assert by_key[stem]["caption"] == cap, stem
  assert manifest["caption_fixes"] == {
    "caption_empty": 1,
    "caption_not_utf8": 1,
    "caption_truncated": 1,
  }
  assert all(r["pixels"].shape == (32, 32, 3) for r in recs)
  assert manifest["resolution"] == 32 and manifest["captions"] == "keep"


def test_skipped_report_lists_every_skip(hostile_run):
  src, out, expect, manifest = hostile_run
  with open(os.path.join(out, prepare.SKIPPED)) as f:
    lines = [json.loads(line) for line in f]
  got = {line["key"]: line["reason"] for line in lines if line["reason"] != "duplicate_key"}
  want = {
    k.rsplit(".", 1)[0]: e.reason
    for k, e in expect.items()
    if e.reason and e.reason != "duplicate_key"
  }
  assert got == want
  assert [line["detail"] for line in lines if line["reason"] == "duplicate_key"] == ["ok.png"]
  text = cli.summary(manifest, out)
  assert f"skipped {len(lines)} of {len(expect)}" in text and "  corrupt: 3" in text


def test_folder_with_captions_jsonl_and_dropped_captions(tmp_path):
  src = tmp_path / "imgs"
  (src / "a").mkdir(parents=True)
  for i, name in enumerate(["a/x.jpg", "y.png", "z.webp"]):
    (src / name).write_bytes(solid((10 * i, 0, 0), name.rsplit(".", 1)[1].replace("jpg", "JPEG")))
  (src / "y.txt").write_text("the sidecar is ignored when a jsonl is given")
  jl = tmp_path / "caps.jsonl"
  jl.write_text(
    json.dumps({"file": "a/x.jpg", "caption": " first "})
    + "\n\n"
    + json.dumps({"file": "a/x.jpg", "caption": "second entry: ignored"})
    + "\n"
    + json.dumps({"file": "z.webp", "caption": "zed"})
    + "\n"
  )
  m = prepare.prepare(
    inputs.FolderSource(str(src), str(jl)), str(tmp_path / "o"), OPTS, progress=False
  )
  caps = {r["key"]: r["caption"] for r in read_all(str(tmp_path / "o"))}
  assert caps == {"a/x": "first", "y": None, "z": "zed"}
  assert m["num_captioned"] == 2 and m["source"]["kind"] == "images"
  drop = prepare.Options(resolution=32, min_size=16, captions="drop")
  m = prepare.prepare(
    inputs.FolderSource(str(src), str(jl)), str(tmp_path / "d"), drop, progress=False
  )
  assert m["num_captioned"] == 0 and m["captions"] == "drop"


# ----------------------------------------------------------------------------- tar / parquet


def write_tar(path, members):
  with tarfile.open(path, "w") as tf:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path):
  write_tar(
    tmp_path / "s0.tar",
    [
      ("k0.jpg", photo(0)),
      ("k0.txt", b"zero"),
      ("k1.png", solid((0, 255, 0))),
      ("k1.json", json.dumps({"caption": "one"}).encode()),
      ("k2.txt", b"a caption without an image"),
      ("k0.jpg", photo(1)),  # the key again: a duplicate
      ("d/k3.webp", solid((0, 0, 255), "WEBP")),
      ("k4.jpg", photo(4)[:300]),  # truncated
    ],
  )
  write_tar(tmp_path / "s1.tar", [("k1.jpg", photo(2)), ("k5.jpg", photo(3)), ("k5.txt", b"five")])
  m = prepare.prepare(inputs.TarSource([str(tmp_path)]), str(tmp_path / "o"), OPTS, progress=False)
  caps = {r["key"]: r["caption"] for r in read_all(str(tmp_path / "o"))}
  assert caps == {"k0": "zero", "k1": "one", "d/k3": None, "k5": "five"}
  assert m["skipped"] == {"corrupt": 1, "duplicate_key": 2, "no_image": 1}


def test_parquet_bytes_and_hf_struct_columns(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  t1 = pa.table({"image": [photo(0), None, b"junk"], "caption": ["p0", "p1", "p2"]})
  pq.write_table(t1, tmp_path / "a.parquet", row_group_size=2)
  hf = [{"bytes": solid((255, 0, 0)), "path": "r.png"}, {"bytes": photo(1), "path": None}]
  t2 = pa.table({"img": hf, "text": [b"caf\xc3\xa9", None]})
  pq.write_table(t2, tmp_path / "b.parquet")
  with pytest.raises(inputs.InputError, match="no image column 'image'"):
    inputs.ParquetSource([str(tmp_path / "b.parquet")])
  m = prepare.prepare(
    inputs.ParquetSource([str(tmp_path / "a.parquet")]), str(tmp_path / "o1"), OPTS, progress=False
  )
  assert [r["caption"] for r in read_all(str(tmp_path / "o1"))] == ["p0"]
  assert m["skipped"] == {"no_image": 1, "not_an_image": 1}
  src = inputs.ParquetSource([str(tmp_path / "b.parquet")], "img", "text")
  prepare.prepare(
    src, str(tmp_path / "o2"), prepare.Options(32, 16, records_per_shard=1), progress=False
  )
  recs = read_all(str(tmp_path / "o2"))
  assert [r["caption"] for r in recs] == ["café", None]
  assert np.abs(recs[0]["pixels"].astype(int) - (255, 0, 0)).max() <= 3


# ----------------------------------------------------------------------------- tfds


def test_tfds_dataset_on_disk(tfds_dir, tmp_path):
  root, builder_dir = tfds_dir
  m = prepare.prepare(inputs.TfdsSource(builder_dir), str(tmp_path / "a"), OPTS, progress=False)
  recs = read_all(str(tmp_path / "a"))
  assert m["num_records"] == 5 and sorted(r["caption"] for r in recs) == [
    f"tfds {i}" for i in range(5)
  ]
  for r in recs:  # each image is uniform 40 * i
    i = int(r["caption"].split()[1])
    assert np.abs(r["pixels"].astype(int) - 40 * i).max() <= 2
  by_name = inputs.TfdsSource(name="iomm_tiny_pairs", data_dir=root)
  assert len(by_name) == 5
  with pytest.raises(inputs.InputError, match="cannot be opened"):
    inputs.TfdsSource(name="iomm_no_such_dataset", data_dir=root)


# ----------------------------------------------------------------------------- resume, processes


def folder_of(tmp_path, n=10) -> str:
  src = tmp_path / "src"
  src.mkdir()
  for i in range(n):
    (src / f"{i:02d}.jpg").write_bytes(photo(i))
    (src / f"{i:02d}.txt").write_text(f"image {i}")
  (src / "01.jpg").write_bytes(b"")  # one bad record
  return str(src)


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
  src = folder_of(tmp_path)
  straight = prepare.prepare(inputs.FolderSource(src), str(tmp_path / "a"), OPTS, progress=False)
  out = str(tmp_path / "b")

  def stop(shard):
    raise KeyboardInterrupt(f"after shard {shard}")

  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(inputs.FolderSource(src), out, OPTS, progress=False, after_shard=stop)
  names = sorted(os.listdir(out))
  assert records.MANIFEST not in names and records.shard_name(0, 3) in names
  assert records.shard_name(1, 3) not in names
  first = os.stat(os.path.join(out, records.shard_name(0, 3)))
  written = []
  resumed = prepare.prepare(
    inputs.FolderSource(src), out, OPTS, progress=False, after_shard=written.append
  )
  assert written == [1, 2]  # shard 0 was not rewritten
  again = os.stat(os.path.join(out, records.shard_name(0, 3)))
  assert (again.st_mtime_ns, again.st_ino) == (first.st_mtime_ns, first.st_ino)
  assert resumed == straight
  a, b = read_all(str(tmp_path / "a")), read_all(out)
  assert [(r["key"], r["caption"], r["image"]) for r in a] == [
    (r["key"], r["caption"], r["image"]) for r in b
  ]


class _Dies:
  """A source that fails after ``n`` records (an interruption inside a shard)."""

  def __init__(self, inner, n):
    self.inner, self.n = inner, n

  def __len__(self):
    return len(self.inner)

  def describe(self):
    return self.inner.describe()

  def read(self, start, stop):
    for k, raw in enumerate(self.inner.read(start, stop)):
      if k == self.n:
        raise KeyboardInterrupt
      yield raw


def test_interruption_inside_a_shard_leaves_nothing_that_looks_finished(tmp_path):
  src, out = folder_of(tmp_path), str(tmp_path / "o")
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(_Dies(inputs.FolderSource(src), 2), out, OPTS, progress=False)
  names = os.listdir(out)
  assert not any(n.endswith(".array_record") for n in names) and records.MANIFEST not in names
  with pytest.raises(FileNotFoundError, match="has no manifest.json"):
    records.read_manifest(out)
  prepare.prepare(inputs.FolderSource(src), out, OPTS, progress=False)
  assert not any(".tmp-" in n for n in os.listdir(out))  # the stale temporary was removed
  assert records.read_manifest(out)["num_records"] == 9


def test_processes_write_disjoint_shards(tmp_path):
  src = folder_of(tmp_path)
  single = prepare.prepare(inputs.FolderSource(src), str(tmp_path / "one"), OPTS, progress=False)
  out = str(tmp_path / "two")
  assert prepare.prepare(inputs.FolderSource(src), out, OPTS, 2, 0, progress=False) is None
  assert sorted(n for n in os.listdir(out) if n.endswith(".array_record")) == [
    records.shard_name(0, 3),
    records.shard_name(2, 3),
  ]
  both = prepare.prepare(inputs.FolderSource(src), out, OPTS, 2, 1, progress=False)
  assert both == single  # the last process to finish wrote the same manifest
  keys = [r["key"] for r in read_all(out)]
  assert len(keys) == len(set(keys)) == 9


# ----------------------------------------------------------------------------- CLI


def run_cli(args, capsys):
  try:
    code = cli.main([*args, "--no-progress"])
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def test_cli_bad_input_exit_code_2_names_the_flag_or_file(tmp_path, capsys):
  src = folder_of(tmp_path, 2)
  out = str(tmp_path / "o")
  bad_jsonl = tmp_path / "bad.jsonl"
  bad_jsonl.write_text('{"file": "00.jpg", "caption": "ok"}\nnot json\n')
  (tmp_path / "t.parquet").write_bytes(b"PAR1 not really")
  for args, needle in [
    (["--images", str(tmp_path / "missing"), "--out", out], "--images"),
    (["--images", src, "--out", out, "--resolution", "0"], "--resolution"),
    (["--images", src, "--out", out, "--captions-jsonl", str(bad_jsonl)], "bad.jsonl:2"),
    (["--tar", str(tmp_path / "none.tar"), "--out", out], "--tar"),
    (["--parquet", str(tmp_path / "t.parquet"), "--out", out], "t.parquet"),
    (["--images", str(tmp_path / "bad.jsonl"), "--out", out], "--images"),
    (["--images", src], "--out"),
    (
      ["--images", src, "--out", out, "--num-processes", "2", "--process-index", "2"],
      "--process-index",
    ),
  ]:
    code, _, err = run_cli(args, capsys)
    assert code == 2 and needle in err, (args, err)
  assert not os.path.exists(out) or records.MANIFEST not in os.listdir(out)
  assert (
    run_cli(["--images", src, "--out", out, "--resolution", "32", "--min-size", "16"], capsys)[0]
    == 0
  )
  code, _, err = run_cli(["--images", src, "--out", out, "--resolution", "64"], capsys)
  assert code == 2 and "prepare.json" in err and "options" in err


def test_cli_as_a_command(tmp_path):
  src = folder_of(tmp_path, 3)
  cmd = [
    sys.executable,
    "-m",
    "iomm_jax.cli.prepare",
    "--images",
    src,
    "--out",
    str(tmp_path / "o"),
  ]
  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.run(
    [*cmd, "--resolution", "32", "--min-size", "16"],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr
  assert "wrote 2 records (2 captioned) in 1 shards at 32 px" in proc.stdout
  assert "empty: 1" in proc.stdout and "img" in proc.stderr  # the report and the progress bar
  bad = subprocess.run(
    [*cmd, "--captions", "maybe"], capture_output=True, text=True, env=env, cwd=ROOT
  )
  assert bad.returncode == 2 and "--captions" in bad.stderr


def test_decode_policy_matches_options():
  assert OPTS.policy() == decode.ImagePolicy(32, 16, 4.0, 64_000_000)
