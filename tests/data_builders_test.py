"""Builders on tiny folders written in each data set's exact raw layout."""

import csv
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adjax import data
from adjax.data import builders

RNG = np.random.default_rng(0)


def _save(path: Path, a: np.ndarray, fmt: str | None = None) -> np.ndarray:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(a).save(path, format=fmt)
  return a


def _img(h=20, w=24, gray=False):
  shape = (h, w) if gray else (h, w, 3)
  return RNG.integers(0, 256, shape, dtype=np.uint8)


def _mask(h=20, w=24, value=255):
  m = np.zeros((h, w), np.uint8)
  y, x = RNG.integers(0, h - 6), RNG.integers(0, w - 6)
  m[y:y + 5, x:x + 6] = value
  return m


def _decode(b: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(b)))


def _by_path(handle):
  src = handle.source
  return {src[i]["path"].decode(): src[i] for i in range(len(src))}


def _no_prepared_data(data_dir: Path) -> bool:
  return not list(data_dir.rglob("dataset_info.json")) and not list(
      data_dir.rglob("incomplete*"))


def write_mvtec(root: Path, gray_category=True):
  """Two categories (one grayscale), good + one defect type each."""
  truth = {}
  for cat, gray in (("bottle", False), ("grid", gray_category)):
    for i in range(2):
      rel = f"{cat}/test/good/{i:03d}.png"
      truth[rel] = (_save(root / rel, _img(gray=gray)), None, 0, cat, "good")
    for i in range(2):
      rel = f"{cat}/test/broken/{i:03d}.png"
      m = _save(root / f"{cat}/ground_truth/broken/{i:03d}_mask.png", _mask())
      truth[rel] = (_save(root / rel, _img(gray=gray)), m, 1, cat, "broken")
  (root / "license.txt").write_text("not an image folder")
  return truth


def _check(handle, truth, compare_bytes=None):
  assert handle.num_examples == len(truth)
  assert handle.categories == sorted({t[3] for t in truth.values()})
  got = _by_path(handle)
  assert set(got) == set(truth)
  for rel, (img, mask, label, cat, defect) in truth.items():
    ex = got[rel]
    assert ex["label"] == label and ex["category"].decode() == cat
    assert ex["defect_type"].decode() == defect
    if compare_bytes is not None:
      assert ex["image"] == (compare_bytes / rel).read_bytes()
    else:
      np.testing.assert_array_equal(_decode(ex["image"]), img)
    m = _decode(ex["mask"])
    assert m.shape == img.shape[:2]
    np.testing.assert_array_equal(m, mask if mask is not None else 0)
  # metadata used by the pipeline agrees with the records
  for i in range(handle.num_examples):
    ex = handle.source[i]
    assert handle.categories[handle.example_category[i]] == ex["category"].decode()
    assert handle.example_label[i] == ex["label"]


@pytest.mark.parametrize("name", ["mvtec_ad", "mpdd"])
def test_mvtec_layout(tmp_path, name):
  truth = write_mvtec(tmp_path / "raw")
  h = data.prepare(name, manual_dir=tmp_path / "raw", data_dir=tmp_path / "dd")
  _check(h, truth)
  # sorted by path, so indices are stable
  assert [h.source[i]["path"].decode() for i in range(h.num_examples)] == sorted(truth)
  # second use reuses the prepared data even without the raw folder
  h2 = data.prepare(name, manual_dir=tmp_path / "gone", data_dir=tmp_path / "dd")
  assert h2.num_examples == h.num_examples and h2.data_dir == h.data_dir


def test_visa_csv_layout(tmp_path):
  root = tmp_path / "VisA_20220922"
  rows, truth = [], {}
  for cat in ("candle", "pcb1"):
    for i in range(3):
      rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
      truth[rel] = (_save(root / rel, _img(), "JPEG"), None, 0, cat, "good")
      rows.append([cat, "test" if i else "train", "normal", rel, ""])
    for i in range(2):
      rel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG"
      mrel = f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
      m = _save(root / mrel, _mask(value=1))  # VisA stores small label values
      truth[rel] = (_save(root / rel, _img(), "JPEG"), m, 1, cat, "anomaly")
      rows.append([cat, "test", "anomaly", rel, mrel])
  for cat in ("candle", "pcb1"):  # train rows are not part of the test split
    del truth[f"{cat}/Data/Images/Normal/0000.JPG"]
  (root / "split_csv").mkdir(parents=True)
  with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["object", "split", "label", "image", "mask"])
    w.writerows(rows)
  h = data.prepare("visa", manual_dir=root, data_dir=tmp_path / "dd")
  _check(h, truth, compare_bytes=root)  # JPEG bytes stored verbatim

  # A csv row pointing nowhere.
  with open(root / "split_csv" / "1cls.csv", "a", newline="") as f:
    csv.writer(f).writerow(["pcb1", "test", "anomaly", "pcb1/Data/Images/Anomaly/404.JPG",
                            "pcb1/Data/Masks/Anomaly/404.png"])
  with pytest.raises(data.DataError, match=r"1cls.csv line 12: image .*404.JPG does not exist"):
    data.prepare("visa", manual_dir=root, data_dir=tmp_path / "dd2")
  assert _no_prepared_data(tmp_path / "dd2")


def test_btad_bmp_layout(tmp_path):
  root = tmp_path / "BTech_Dataset_transformed"
  truth = {}
  for cat in ("01", "03"):
    ext = "bmp" if cat == "01" else "png"
    for i in range(2):
      rel = f"{cat}/test/ok/{i:04d}.{ext}"
      truth[rel] = (_save(root / rel, _img()), None, 0, cat, "ok")
      rel = f"{cat}/test/ko/{i:04d}.{ext}"
      m = _save(root / f"{cat}/ground_truth/ko/{i:04d}.png", _mask())
      truth[rel] = (_save(root / rel, _img()), m, 1, cat, "ko")
  h = data.prepare("btad", manual_dir=root, data_dir=tmp_path / "dd")
  _check(h, truth)  # .bmp re-encoded losslessly: pixels equal
  assert _decode(h.source[0]["image"]).shape == (20, 24, 3)


@pytest.mark.parametrize("name,category,nested", [
    ("isic", "skin", False), ("clinicdb", "colon", True),
    ("colondb", "colon", False), ("tn3k", "thyroid", True)])
def test_medical_single_category(tmp_path, name, category, nested):
  root = tmp_path / "raw"
  base = root / "ISIC" if nested else root
  truth = {}
  for i in range(2):
    rel = f"test/good/img_{i}.png"
    a = _save(base / rel, _img())
    truth[("ISIC/" if nested else "") + rel] = (a, None, 0, category, "good")
    rel = f"test/Ill/img_{i}.png"
    m = _save(base / f"ground_truth/Ill/img_{i}{'_mask' if i else ''}.png", _mask())
    truth[("ISIC/" if nested else "") + rel] = (_save(base / rel, _img()), m, 1, category, "Ill")
  h = data.prepare(name, manual_dir=root, data_dir=tmp_path / "dd")
  _check(h, truth)


def test_folder_optional_ground_truth_and_distinct_roots(tmp_path, caplog):
  t1 = write_mvtec(tmp_path / "one")
  # second root: one category without ground_truth -> has_mask False
  root2 = tmp_path / "two"
  _save(root2 / "screw/test/good/a.png", _img())
  _save(root2 / "screw/test/bent/b.png", _img())
  h1 = data.prepare("folder", manual_dir=tmp_path / "one", data_dir=tmp_path / "dd")
  with caplog.at_level(logging.WARNING):
    h2 = data.prepare("folder", manual_dir=root2, data_dir=tmp_path / "dd")
  assert "without ground_truth" in caplog.text
  _check(h1, t1)
  assert h1.data_dir != h2.data_dir
  got = _by_path(h2)
  assert not got["screw/test/bent/b.png"]["has_mask"]
  assert got["screw/test/good/a.png"]["has_mask"]
  assert all(_by_path(h1)[k]["has_mask"] for k in t1)
  # a changed folder is prepared again
  _save(root2 / "screw/test/good/c.png", _img())
  assert data.prepare("folder", manual_dir=root2, data_dir=tmp_path / "dd").num_examples == 3


def test_manual_dir_missing(tmp_path):
  with pytest.raises(data.DataError) as e:
    data.prepare("mvtec_ad", manual_dir=tmp_path / "nowhere", data_dir=tmp_path / "dd")
  msg = str(e.value)
  assert str(tmp_path / "nowhere") in msg
  assert "ground_truth/<defect type>/000_mask.png" in msg
  assert builders.MvtecAd.HOMEPAGE in msg
  assert _no_prepared_data(tmp_path / "dd")


def test_defect_image_without_mask(tmp_path):
  write_mvtec(tmp_path / "raw")
  (tmp_path / "raw/grid/ground_truth/broken/001_mask.png").unlink()
  with pytest.raises(data.DataError, match=r"defect image .*grid/test/broken/001.png has no mask"):
    data.prepare("mvtec_ad", manual_dir=tmp_path / "raw", data_dir=tmp_path / "dd")
  assert _no_prepared_data(tmp_path / "dd")


def test_mask_without_image(tmp_path):
  write_mvtec(tmp_path / "raw")
  _save(tmp_path / "raw/bottle/ground_truth/broken/007_mask.png", _mask())
  with pytest.raises(data.DataError, match=r"mask .*007_mask.png has no image"):
    data.prepare("mvtec_ad", manual_dir=tmp_path / "raw", data_dir=tmp_path / "dd")
  assert _no_prepared_data(tmp_path / "dd")


def test_mask_size_mismatch(tmp_path):
  write_mvtec(tmp_path / "raw")
  _save(tmp_path / "raw/bottle/ground_truth/broken/000_mask.png", _mask(10, 10))
  with pytest.raises(data.DataError, match=r"000_mask.png is 10x10 but its image"):
    data.prepare("mvtec_ad", manual_dir=tmp_path / "raw", data_dir=tmp_path / "dd")
  assert _no_prepared_data(tmp_path / "dd")


def test_unreadable_image_error_then_skip(tmp_path, caplog):
  truth = write_mvtec(tmp_path / "raw")
  bad = tmp_path / "raw/grid/test/good/001.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
  bad2 = tmp_path / "raw/grid/test/good/000.png"
  original = bad2.read_bytes()
  bad2.write_bytes(b"junk")
  # fails while writing (after tfds started): nothing trusted is left; every
  # unreadable file is named (not only the first), with no object reprs.
  with pytest.raises(data.DataError, match=r"2 unreadable files") as e:
    data.prepare("mvtec_ad", manual_dir=tmp_path / "raw", data_dir=tmp_path / "dd")
  assert "grid/test/good/001.png" in str(e.value) and "grid/test/good/000.png" in str(e.value)
  assert "object at 0x" not in str(e.value)
  assert _no_prepared_data(tmp_path / "dd")
  bad2.write_bytes(original)
  with caplog.at_level(logging.WARNING):
    h = data.prepare("mvtec_ad", manual_dir=tmp_path / "raw", data_dir=tmp_path / "dd",
                     skip_bad_files=True)
  assert "skipped 1 unreadable file(s) of 8" in caplog.text
  assert h.num_examples == len(truth) - 1
  assert [p for p, _ in h.skipped] == ["grid/test/good/001.png"]
  del truth["grid/test/good/001.png"]
  _check(h, truth)


def test_unknown_name(tmp_path):
  with pytest.raises(ValueError, match="unknown data set 'kitti'"):
    data.prepare("kitti", manual_dir=tmp_path, data_dir=tmp_path)
  assert set(data.DATASETS) == set(builders.BUILDERS)
