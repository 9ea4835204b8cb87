"""Input pipeline: preprocessing, sharding, padding, shuffling, resumption."""

import numpy as np
import pytest
from PIL import Image

from adjax import data
from adjax.data import images

N = 23  # prime-ish: nothing divides evenly


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
  root = tmp_path_factory.mktemp("raw")
  rng = np.random.default_rng(1)
  k = 0
  for cat, n_good, n_bad in (("alpha", 5, 6), ("beta", 4, 8)):
    for sub, n in (("good", n_good), ("dent", n_bad)):
      for i in range(n):
        d = root / cat / "test" / sub
        d.mkdir(parents=True, exist_ok=True)
        h, w = 30 + k % 5, 26 + k % 7  # non-square, varying sizes
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
        if sub != "good":
          m = np.zeros((h, w), np.uint8)
          m[5:5 + 3 + i % 4, 4:12] = 255
          g = root / cat / "ground_truth" / sub
          g.mkdir(parents=True, exist_ok=True)
          Image.fromarray(m).save(g / f"{i:03d}_mask.png")
        k += 1
  h = data.prepare("folder", manual_dir=root, data_dir=tmp_path_factory.mktemp("dd"))
  h.raw_root = root
  assert h.num_examples == N
  return h


def _indices(loader):
  return [b["index"] for b in loader]


def test_preprocessing_matches_pil(handle):
  b = next(iter(data.make_loader(handle, image_size=16, batch_size=4, train=False)))
  for j in range(4):
    p = handle.raw_root / b["path"][j]
    ref = np.asarray(Image.open(p).convert("RGB").resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(b["image"][j], ref)
    assert b["index"][j] == j and b["valid"][j]
    cat = b["path"][j].split("/")[0]
    assert handle.categories[b["category_index"][j]] == cat
    assert b["label"][j] == int("/dent/" in b["path"][j])
  assert b["image"].dtype == np.uint8 and b["image"].shape == (4, 16, 16, 3)
  assert b["mask"].shape == (4, 16, 16) and b["label"].dtype == np.int32


def test_mask_threshold_and_visa_quirk(handle):
  kw = dict(image_size=8, batch_size=N + 1, train=False)
  b = next(iter(data.make_loader(handle, **kw)))
  q = next(iter(data.make_loader(handle, mask_threshold_strict_zero=True, **kw)))
  for j in range(N):
    if not b["label"][j]:
      assert b["mask"][j].sum() == 0 and q["mask"][j].sum() == 0
      continue
    m = Image.open(handle.raw_root / b["path"][j].replace("/test/", "/ground_truth/")
                   .replace(".png", "_mask.png")).resize((8, 8), Image.BILINEAR)
    m = np.asarray(m, np.float32) / 255
    np.testing.assert_array_equal(b["mask"][j], (m > 0.5).astype(np.float32))
    np.testing.assert_array_equal(q["mask"][j], (m > 0).astype(np.float32))
    assert q["mask"][j].sum() > b["mask"][j].sum()
  assert set(np.unique(b["mask"])) <= {0.0, 1.0}


def test_mask_small_values_binarised():
  raw = np.zeros((20, 20), np.uint8)
  raw[4:14, 4:14] = 1  # VisA-style label value
  m = images.preprocess_mask(Image.fromarray(raw), 10)
  ref = np.asarray(Image.fromarray(raw * 255).resize((10, 10), Image.BILINEAR)) / 255 > 0.5
  assert ref.sum() >= 16
  np.testing.assert_array_equal(m, ref.astype(np.float32))
  # the quirk keeps raw values: a 1-valued mask survives only through `> 0`
  q = images.preprocess_mask(Image.fromarray(raw), 10, strict_zero=True)
  assert q.sum() >= m.sum() > 0


@pytest.mark.parametrize("procs", [1, 2, 3])
def test_eval_every_example_once_with_padding(handle, procs):
  per_proc = [_indices(data.make_loader(handle, image_size=8, batch_size=4, train=False,
                                        process_index=p, process_count=procs))
              for p in range(procs)]
  counts = {len(x) for x in per_proc}
  assert len(counts) == 1  # the same number of batches on every process
  allidx = np.concatenate([np.concatenate(x) for x in per_proc])
  real = allidx[allidx >= 0]
  assert sorted(real.tolist()) == list(range(N))  # each exactly once
  assert len(allidx) == counts.pop() * 4 * procs
  loader = data.make_loader(handle, image_size=8, batch_size=4, train=False,
                            process_count=procs)
  assert len(loader) == -(-N // (4 * procs))
  for b in loader:
    assert np.array_equal(b["valid"], b["index"] >= 0)
    assert not b["image"][~b["valid"]].any()


def test_train_sharding_disjoint_complete_and_reshuffled(handle):
  kw = dict(image_size=8, batch_size=3, train=True, seed=7, num_epochs=2)
  steps = data.steps_per_epoch(handle, batch_size=3, process_count=2)
  assert steps == N // 6
  shards = [_indices(data.make_loader(handle, process_index=p, process_count=2, **kw))
            for p in range(2)]
  assert all(len(s) == 2 * steps for s in shards)
  epochs = []
  for e in range(2):
    parts = [np.concatenate(s[e * steps:(e + 1) * steps]) for s in shards]
    assert not set(parts[0]) & set(parts[1])  # disjoint
    seen = np.concatenate(parts)
    assert len(set(seen)) == steps * 6 == len(seen)  # only the remainder dropped
    assert (seen >= 0).all()
    epochs.append(seen)
  assert not np.array_equal(epochs[0], epochs[1])  # a new permutation per epoch
  # without drop_remainder the whole epoch is covered, padded
  full = [np.concatenate(_indices(data.make_loader(
      handle, process_index=p, process_count=2, drop_remainder=False,
      **{**kw, "num_epochs": 1}))) for p in range(2)]
  seen = np.concatenate(full)
  assert sorted(seen[seen >= 0].tolist()) == list(range(N))
  # deterministic from the seed
  again = _indices(data.make_loader(handle, process_index=0, process_count=2, **kw))
  assert all(np.array_equal(a, b) for a, b in zip(again, shards[0]))
  other = _indices(data.make_loader(handle, process_index=0, process_count=2,
                                    **{**kw, "seed": 8}))
  assert not all(np.array_equal(a, b) for a, b in zip(other, shards[0]))


def test_iterator_state_resume(handle):
  kw = dict(image_size=8, batch_size=4, train=True, seed=3)  # infinite
  ref_it = iter(data.make_loader(handle, **kw))
  ref = [next(ref_it) for _ in range(9)]
  it = iter(data.make_loader(handle, **kw))
  for _ in range(4):
    next(it)
  state = it.get_state()
  resumed = iter(data.make_loader(handle, **kw))
  resumed.set_state(state)
  for want in ref[4:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_category_filter(handle):
  loader = data.make_loader(handle, image_size=8, batch_size=5, train=False,
                            categories=["beta"])
  idx = np.concatenate(_indices(loader))
  idx = idx[idx >= 0]
  assert loader.num_examples == 12 == len(idx)
  assert all(handle.categories[handle.example_category[i]] == "beta" for i in idx)
  with pytest.raises(ValueError, match=r"no categories \['gamma'\]"):
    data.make_loader(handle, image_size=8, batch_size=5, train=False,
                     categories=["gamma"])


def test_too_few_examples_for_a_global_batch(handle):
  with pytest.raises(ValueError, match="cannot fill one global batch"):
    data.make_loader(handle, image_size=8, batch_size=16, train=True, process_count=2)


def test_worker_process_gives_the_same_batches_and_resumes(handle):
  kw = dict(image_size=8, batch_size=4, train=True, seed=5)
  ref_it = iter(data.make_loader(handle, **kw))
  ref = [next(ref_it)["index"] for _ in range(8)]
  it = iter(data.make_loader(handle, worker_count=1, **kw))
  got = [next(it)["index"] for _ in range(5)]
  state = it.get_state()
  it.close()
  resumed = iter(data.make_loader(handle, worker_count=1, **kw))
  resumed.set_state(state)
  got += [next(resumed)["index"] for _ in range(3)]
  resumed.close()
  assert all(np.array_equal(a, b) for a, b in zip(got, ref))
