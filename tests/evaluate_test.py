"""adjax.evaluate's metric consumer: the per-category metrics an evaluation
reports, against scikit-learn and a brute-force AUPRO on the same rows.

The end-to-end runs (slow tier) check the files an evaluation writes; this
checks the numbers in them, in the fast tier.
"""

import numpy as np
import pytest

from adjax import evaluate
from adjax.config import defaults as config_defaults
from metrics_test import _sk, brute_aupro

CATEGORIES = ["bottle", "cable", "screw"]


def _rows(seed: int, n: int = 6, hw: int = 12):
  """One evaluation batch as the scorers yield it: three categories mixed, the
  last row padding, an anomalous image without a mask in every batch."""
  rng = np.random.default_rng(seed)
  label = rng.random(n) < 0.5
  label[:2] = [False, True]
  mask = np.zeros((n, hw, hw), np.float32)
  for i in np.flatnonzero(label):
    y, x = rng.integers(0, hw - 4, 2)
    mask[i, y:y + 4, x:x + 4] = 1
  amap = rng.random((n, hw, hw)).astype(np.float32) + 0.6 * mask
  score = (amap.reshape(n, -1).max(1) + 0.3 * rng.normal(size=n)).astype(np.float32)
  has_mask = np.ones(n, bool)
  has_mask[1] = False           # a defect image whose mask is unknown
  mask[1] = 0
  valid = np.ones(n, bool)
  valid[-1] = False             # padding of the last batch: garbage values
  score[-1], amap[-1] = 1e3, 1e3
  return {"score": score, "label": label.astype(np.int32), "map": amap, "mask": mask,
          "has_mask": has_mask, "valid": valid,
          "category_index": rng.integers(0, len(CATEGORIES), n).astype(np.int32),
          "index": np.arange(seed * n, (seed + 1) * n)}


def test_category_metrics_match_independent_computation():
  """Per category: image metrics over its valid images, pixel metrics over
  those with a mask; padding and other categories' rows left out.

  Fails if a metric is inverted (1 - AUROC, scores negated, labels flipped),
  if padding rows or images without a mask enter a metric, if rows of one
  category are counted in another, or if image and pixel results are swapped.
  """
  cfg = config_defaults.base_config()
  cfg.eval.fpr_limit = 0.3
  cfg.eval.report_panels = 2
  consumer = evaluate.MetricsConsumer(cfg, CATEGORIES)
  batches = [_rows(seed) for seed in range(8)]
  for rows in batches:
    consumer.consume(rows)
  results, details = consumer.result()
  assert sorted(results) == sorted(CATEGORIES)
  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  for ci, name in enumerate(CATEGORIES):
    sel = cat["valid"] & (cat["category_index"] == ci)
    px = sel & cat["has_mask"]
    img_ref = _sk(cat["label"][sel], cat["score"][sel])
    px_ref = _sk(cat["mask"][px] > 0, cat["map"][px])
    got = results[name]
    for k in ("auroc", "ap", "f1max"):
      assert got[f"image_{k}"] == pytest.approx(img_ref[k], abs=1e-6), (name, k)
      assert got[f"pixel_{k}"] == pytest.approx(px_ref[k], abs=1e-6), (name, k)
    aupro = brute_aupro(list(cat["map"][px]), list(cat["mask"][px] > 0), 0.3)
    assert got["pixel_aupro"] == pytest.approx(aupro, abs=1e-6), name
    # The report's panels: the highest- and lowest-scoring valid images.
    order = np.argsort(-cat["score"][sel], kind="stable")
    acc = consumer.accs[name]
    assert [i for _, i, _, _ in acc.high] == list(cat["index"][sel][order[:2]])
    assert [i for _, i, _, _ in acc.low] == list(cat["index"][sel][order[::-1][:2]])
    assert details[name]["image_threshold"] is not None
  scores = np.concatenate([s for s, _ in consumer.image_scores])
  np.testing.assert_array_equal(scores, cat["score"][cat["valid"]])
