"""Prediction reader: odd image modes, unreadable files, padding, sizes."""

import numpy as np
import pytest
from PIL import Image

from adjax import data


def _ref(rgb_uint8: np.ndarray, size: int) -> np.ndarray:
  return np.asarray(Image.fromarray(rgb_uint8, "RGB").resize((size, size), Image.BILINEAR))


@pytest.fixture
def folder(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (25, 35), dtype=np.uint8)
  g16 = (gray.astype(np.uint16) * 257)  # full 16-bit range, same picture
  Image.fromarray(rgb).save(tmp_path / "a_rgb.jpg", quality=95)
  Image.fromarray(gray, "L").save(tmp_path / "b_gray.png")
  rgba = np.concatenate([rgb, np.full((40, 30, 1), 128, np.uint8)], -1)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "c_rgba.png")
  Image.fromarray(g16).save(tmp_path / "d_16bit.png")
  (tmp_path / "sub").mkdir()
  Image.fromarray(rgb).save(tmp_path / "sub" / "e.bmp")
  (tmp_path / "f_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  (tmp_path / "notes.txt").write_text("not an image")
  return tmp_path, rgb, gray


def test_read_folder_reports_unreadable(folder):
  root, _, _ = folder
  paths, bad = data.read_image_folder(root)
  assert [p.split("/")[-1] for p in paths] == [
      "a_rgb.jpg", "b_gray.png", "c_rgba.png", "d_16bit.png", "e.bmp"]
  assert len(bad) == 1 and bad[0][0].endswith("f_broken.png") and bad[0][1]
  g, gbad = data.read_image_folder(str(root / "*.png"))
  assert len(g) == 3 and len(gbad) == 1
  with pytest.raises(FileNotFoundError, match="no images found"):
    data.read_image_folder(str(root / "*.tiff"))


def test_modes_converted_to_rgb(folder):
  root, rgb, gray = folder
  paths, _ = data.read_image_folder(root)
  batches = list(data.prediction_batches(paths, image_size=16, batch_size=3))
  assert len(batches) == 2
  b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
  assert b["valid"].tolist() == [True] * 5 + [False]
  assert b["orig_size"][:5].tolist() == [[40, 30], [25, 35], [40, 30], [25, 35], [40, 30]]
  gray_rgb = np.repeat(gray[..., None], 3, -1)
  np.testing.assert_array_equal(b["image"][1], _ref(gray_rgb, 16))
  np.testing.assert_array_equal(b["image"][2], _ref(rgb, 16))  # alpha dropped
  np.testing.assert_array_equal(b["image"][3], _ref(gray_rgb, 16))  # 16-bit scaled
  np.testing.assert_array_equal(b["image"][4], _ref(rgb, 16))
  jpeg = np.asarray(Image.open(root / "a_rgb.jpg").convert("RGB"))
  np.testing.assert_array_equal(b["image"][0], _ref(jpeg, 16))
  assert b["path"][5] == "" and not b["image"][5].any()


def test_file_breaking_after_listing_is_reported(folder):
  root, _, _ = folder
  paths, _ = data.read_image_folder(root)
  (root / "b_gray.png").write_bytes(b"now broken")
  b = next(iter(data.prediction_batches(paths, image_size=8, batch_size=8)))
  assert b["valid"].tolist() == [True, False, True, True, True, False, False, False]
  assert "b_gray.png" in b["path"][1] and b["error"][1]
