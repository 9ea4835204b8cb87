"""Generated data: layout, determinism, exact masks, loadable by `folder`."""

import numpy as np
from PIL import Image

from adjax import data
from adjax.data import synthetic


def test_generate_layout_determinism_and_loading(tmp_path):
  kw = dict(seed=3, image_size=48, per_category=10)
  out = synthetic.generate(tmp_path / "x", **kw)
  again = synthetic.generate(tmp_path / "y", families=["b"], **kw)
  for fam in ("a", "b"):
    root = out["roots"][fam]
    cats = sorted(p.name for p in root.iterdir())
    assert cats == out["categories"][fam] == sorted(synthetic.FAMILIES[fam])
  assert not set(out["categories"]["a"]) & set(out["categories"]["b"])
  # same seed -> byte-identical files
  for p in sorted(again["roots"]["b"].rglob("*.png")):
    q = out["roots"]["b"] / p.relative_to(again["roots"]["b"])
    assert p.read_bytes() == q.read_bytes()

  h = data.prepare("folder", manual_dir=out["roots"]["a"], data_dir=tmp_path / "dd")
  assert h.num_examples == 4 * 10
  assert h.categories == out["categories"]["a"]
  kinds = {h.source[i]["defect_type"].decode() for i in range(h.num_examples)}
  assert kinds == {"good", *synthetic.OBJECT_DEFECTS}
  assert (np.bincount(h.example_label) == [4 * 4, 4 * 6]).all()


def test_mask_is_exactly_the_changed_pixels():
  s = 64
  for fam_i, fam in enumerate(sorted(synthetic.FAMILIES)):
    for cat_i, (name, kind) in enumerate(sorted(synthetic.FAMILIES[fam].items())):
      good, none = synthetic._render_example(0, fam_i, cat_i, 5, name, kind, None, s)
      assert not none.any()
      kinds = synthetic.OBJECT_DEFECTS if kind == "object" else synthetic.TEXTURE_DEFECTS
      for defect in kinds:
        img, mask = synthetic._render_example(0, fam_i, cat_i, 5, name, kind, defect, s)
        changed = np.any(img != good, axis=-1)
        assert not (changed & ~mask).any(), (name, defect)  # nothing outside
        assert changed[mask].mean() > 0.9, (name, defect)  # the mask is visible
        assert mask.sum() >= 16


def test_written_masks_match_images(tmp_path):
  out = synthetic.generate(tmp_path, image_size=32, per_category=5, families=["a"])
  root = out["roots"]["a"]
  for m in root.rglob("*_mask.png"):
    rel = m.relative_to(root)
    img = root / rel.parts[0] / "test" / rel.parts[2] / m.name.replace("_mask", "")
    a = np.asarray(Image.open(m))
    assert Image.open(img).size == (32, 32) and a.shape == (32, 32)
    assert set(np.unique(a)) <= {0, 255} and a.any()


def test_train_split_is_normal_images_of_their_own_and_leaves_the_test_split(tmp_path):
  """train/good: normal images from their own generators; the test split is
  byte-identical with or without it, and the prepared data set holds the
  test split only. Fails if the training images draw from the test images'
  generators (they would repeat the test goods) or shift the test split."""
  kw = dict(seed=1, image_size=32, per_category=5, families=["b"])
  plain = synthetic.generate(tmp_path / "plain", **kw)["roots"]["b"]
  out = synthetic.generate(tmp_path / "train", train_per_category=3, **kw)
  root = out["roots"]["b"]
  assert out["counts"]["b"]["tile"] == {"good": 2, "anomalous": 3, "train_good": 3}
  tests = sorted(p.relative_to(plain) for p in plain.rglob("*.png"))
  assert tests == sorted(p.relative_to(root) for p in root.rglob("*.png")
                         if p.relative_to(root).parts[1] != "train")
  for rel in tests:
    assert (plain / rel).read_bytes() == (root / rel).read_bytes()
  for cat in out["categories"]["b"]:
    train = sorted((root / cat / "train" / "good").iterdir())
    assert [p.name for p in train] == ["000.png", "001.png", "002.png"]
    goods = [np.asarray(Image.open(p), np.float32)
             for p in sorted((root / cat / "test" / "good").iterdir())]
    for p in train:
      img = np.asarray(Image.open(p), np.float32)
      # Another scene, not the same one under other sensor noise (a mean
      # absolute difference of about 3 levels): 13.8 levels or more measured.
      assert min(float(np.abs(img - g).mean()) for g in goods) > 8.0, (cat, p.name)
  h = data.prepare("folder", manual_dir=root, data_dir=tmp_path / "dd")
  assert h.num_examples == 4 * 5
