"""Result tables: mean over categories, formats, round trips, atomic files."""

import csv
import json
import math

import pytest

from adjax.report import tables

RESULTS = {
    "bottle": {"image_auroc": 0.91234, "pixel_auroc": 0.8, "pixel_aupro": None,
               "pixel_aupro_zsad": 0.5},
    "cable": {"image_auroc": 0.7, "pixel_auroc": float("nan"),
              "pixel_aupro": None, "pixel_aupro_zsad": 0.25},
    "zipper": {"image_auroc": 1 / 3, "pixel_auroc": 0.6, "pixel_aupro": None,
               "pixel_aupro_zsad": 0.125},
}


def test_summary_mean_ignores_missing():
  s = tables.summarize(RESULTS)
  assert list(s["categories"]) == ["bottle", "cable", "zipper"]
  assert s["mean"]["image_auroc"] == pytest.approx((0.91234 + 0.7 + 1 / 3) / 3)
  assert s["mean"]["pixel_auroc"] == pytest.approx(0.7)  # NaN is missing
  assert s["categories"]["cable"]["pixel_auroc"] is None
  assert s["mean"]["pixel_aupro"] is None
  # Canonical metric order, the ZSAD variant after the standard ones.
  assert list(s["mean"]) == ["image_auroc", "pixel_auroc", "pixel_aupro",
                             "pixel_aupro_zsad"]


def test_console_table_is_aligned_percentages():
  table = tables.console_table(RESULTS)
  # The mean row says over how many categories it averages, and why.
  assert table.splitlines()[-1] == (
      "pixel metrics: mean over 2 of 3 categories (cable has no defect masks)")
  lines = [l for l in table.splitlines()[:-1] if not set(l) <= {"-"}]
  assert lines[0].split() == ["category", "I-AUROC", "P-AUROC", "AUPRO",
                              "AUPRO-zsad"]
  assert lines[1].split() == ["bottle", "91.2", "80.0", "n/a", "50.0"]
  assert lines[-1].split() == ["mean", "64.9", "70.0", "n/a", "29.2"]
  assert len({len(l) for l in lines}) == 1  # right-aligned columns line up


def test_markdown_table():
  md = tables.markdown_table(RESULTS).splitlines()
  assert md[0] == "| category | I-AUROC | P-AUROC | AUPRO | AUPRO-zsad |"
  assert md[1] == "|:---|---:|---:|---:|---:|"
  assert md[3] == "| cable | 70.0 | n/a | n/a | 25.0 |"
  assert md[-3] == "| **mean** | **64.9** | **70.0** | **n/a** | **29.2** |"
  assert md[-1] == "mean: pixel metrics: mean over 2 of 3 categories (cable has no defect masks)"
  full = {k: dict(v, pixel_auroc=0.5) for k, v in RESULTS.items()}
  assert "mean_note" not in tables.summarize(full)
  assert tables.markdown_table(full).splitlines()[-1].startswith("| **mean**")


def test_write_reports_round_trips(tmp_path):
  table = tables.write_reports(RESULTS, tmp_path / "out", "mvtec")
  assert table == tables.console_table(RESULTS)
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
      "mvtec.csv", "mvtec.json", "mvtec.md"]
  want = tables.summarize(RESULTS)
  assert tables.read_json(tmp_path / "out" / "mvtec.json") == want
  assert want["mean_note"].startswith("pixel metrics: mean over 2 of 3")
  del want["mean_note"]          # the CSV holds the numbers only
  assert tables.read_csv(tmp_path / "out" / "mvtec.csv") == want
  with open(tmp_path / "out" / "mvtec.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0][0] == "category" and rows[-1][0] == "mean"
  assert float(rows[1][1]) == 0.91234  # full precision, not percent
  raw = json.loads((tmp_path / "out" / "mvtec.json").read_text())
  assert raw["categories"]["bottle"]["pixel_aupro"] is None


def test_bad_input_writes_nothing(tmp_path):
  with pytest.raises(ValueError, match="'mean'"):
    tables.write_reports({"mean": {"image_auroc": 0.5}}, tmp_path, "r")
  with pytest.raises(ValueError, match="finite"):
    tables.write_reports({"a": {"image_auroc": math.inf}}, tmp_path, "r")
  with pytest.raises(ValueError, match="plain file name"):
    tables.write_reports(RESULTS, tmp_path, "../r")
  assert list(tmp_path.iterdir()) == []


def test_empty_results():
  s = tables.summarize({})
  assert s == {"categories": {}, "mean": {}}
  assert tables.console_table({}).splitlines()[-1].strip() == "mean"


def test_heatmap_panels_share_one_stated_scale():
  """Panels drawn with a mode's scale compare across images: a faint normal
  map stays cool beside a defect, whatever each map's own range; the
  colour bar is drawn beside them and 1.0 is the pixel threshold."""
  import numpy as np
  from adjax.report import heatmaps
  rgb = np.full((30, 40, 3), 128, np.uint8)
  normal = np.full((30, 40), 0.10, np.float32)
  normal[10:20, 10:20] = 0.2                       # its own hottest spot
  defect = np.full((30, 40), 0.10, np.float32)
  defect[10:20, 10:20] = 0.9
  scale = heatmaps.scale_for("zero_shot", 0.5)
  assert (scale.divisor, scale.lo, scale.hi, scale.boundary) == (0.5, 0.0, 2.0, 1.0)
  # The threshold itself is the middle of the scale (1.0 of 0 to 2).
  np.testing.assert_allclose(scale.unit(np.float32([0.5, 1.0])), [0.5, 1.0], rtol=1e-6)
  panels = [heatmaps.panel(rgb, m, scale=scale) for m in (normal, defect)]
  w = 40
  over = [p[:, w + 4:2 * w + 4] for p in panels]
  for p, m in zip(over, (normal, defect)):
    np.testing.assert_array_equal(p, heatmaps.overlay(rgb, scale.unit(m)))
  # The hottest spot's colour: a normal's 0.2 is drawn as 0.2 (not as the top).
  assert not np.array_equal(over[0][15, 15], over[1][15, 15])
  np.testing.assert_array_equal(over[0][15, 15], heatmaps.overlay(
      rgb[:1, :1], np.float32([[0.2 / 0.5 / 2]]))[0, 0])
  bar = panels[0][:, 2 * w + 8:]
  assert bar.shape == (30, 64, 3)
  np.testing.assert_array_equal(bar[0, 0], heatmaps.colormap(np.float32([[1.0]]))[0, 0])
  np.testing.assert_array_equal(bar[-1, 0], heatmaps.colormap(np.float32([[0.0]]))[0, 0])
  # Without a pixel threshold, the mode's fixed range.
  assert (heatmaps.scale_for("few_shot").lo, heatmaps.scale_for("few_shot").hi) == (0.0, 2.0)
  assert heatmaps.scale_for("zero_shot").divisor == 1.0
