"""The inspection page's decisions (headless Chromium): badges and masks are
the server's for the mode's deployment record (an image threshold above 1, a
pixel threshold below 1e-6), the sliders start there, moving one is a marked
what-if with a way back, and a mode without a record is undecided.

A head-free few-shot Detector (random ViT-S/16 at 64 px, no training); needs
Debian's `chromium` and `chromium-driver` (skipped with a message otherwise).
"""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import demo_run  # noqa: E402
from serve_browser_test import _wait, browser  # noqa: E402,F401
from serve_test import Running  # noqa: E402

from adjax import Detector  # noqa: E402
from adjax.workdir import thresholds  # noqa: E402
from adjax.serve import App  # noqa: E402

pytestmark = pytest.mark.slow


def _cards(driver):
  return driver.execute_script(
      "return [...document.querySelectorAll('#results .card')].map(c => ({name: "
      "c.dataset.name, decision: c.dataset.decision, mask: c.dataset.maskPixels, "
      "whatIf: c.dataset.whatIf, badge: c.querySelector('.badge').textContent}));")


def test_page_shows_the_servers_decisions(browser, tmp_path):  # noqa: F811
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select
  rng = np.random.default_rng(4)
  refs, imgs = tmp_path / "refs", tmp_path / "imgs"
  refs.mkdir()
  imgs.mkdir()
  base = rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)
  for i in range(3):
    noise = rng.integers(-10, 10, base.shape)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(refs / f"r{i}.png")
  files = [refs / "r0.png"]              # a reference itself: a map of about 0
  for i in range(5):
    im = base.copy()
    im[8 * i:8 * i + 12, 10:30] = rng.integers(0, 255, (12, 20, 3))
    files.append(imgs / f"x{i}.png")
    Image.fromarray(im).save(files[-1])
  c = demo_run.demo_config()
  c.data.demo.root = ""
  c.image_size = 64
  c.text.random_init = False
  c.text.checkpoint = "/nonexistent/text"
  c.predict.scoring = "few_shot"
  det = Detector.from_config(c, tmp_path / "work")
  det.use_references(str(refs))
  scores = det.predict([str(f) for f in files], scoring="few_shot").scores
  # An image threshold above 1 between two scores when they reach past 1, and
  # a pixel threshold below 1e-6: every pixel but a reference's is in its mask.
  above = np.sort(scores[scores > 1.0])
  image_t = float((above[0] + above[1]) / 2) if above.size > 1 else 1.5
  assert image_t > 1.0
  pixel_t = 5e-7
  (tmp_path / "work").mkdir(exist_ok=True)
  thresholds.write(tmp_path / "work", dataset="unit", scoring="few_shot",
                   image_score="few_shot:max", checkpoint_step=-1,
                   model=det.threshold_model("few_shot"), image=image_t, pixel=pixel_t,
                   bank=det.bank, method="unit")
  det.records.pop("few_shot", None)            # read the record as a server start would
  app = App(det)
  want = {f.name: app.predict_bytes(f.read_bytes(), "", "few_shot") for f in files}
  assert all(a["threshold"] == image_t and a["pixel_threshold"] == pixel_t
             and a["decided"] and a["heatmap_scale"]["divisor"] == pixel_t
             for a in want.values())
  listed = app.info()["thresholds"]
  assert listed["few_shot"]["image_threshold"] == image_t and listed["batch"] is None
  running = Running(det)
  try:
    browser.get(running.url + "/")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(
        "data-ready") == "1", "the page to load")
    Select(browser.find_element(By.ID, "mode")).select_by_value("few_shot")
    browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    _wait(browser, lambda d: len(_cards(d)) == len(files), "the scored images")
    cards = {card["name"]: card for card in _cards(browser)}
    for name, answer in want.items():
      card = cards[name]
      assert card["decision"] == str(int(answer["decision"])), (card, answer)
      assert card["badge"] == ("anomalous" if answer["decision"] else "normal")
      assert int(card["mask"]) == answer["mask_pixels"], (card, answer["mask_pixels"])
      assert card["whatIf"] == "0"
    masks = [answer["mask_pixels"] for answer in want.values()]
    assert max(masks) == 64 * 64 and min(masks) < 64 * 64      # a reference's map ~ 0
    # The sliders start at the deployment thresholds, shown in full.
    for kind, value in (("image", image_t), ("pixel", pixel_t)):
      assert browser.find_element(By.ID, f"{kind}-threshold-box").get_attribute(
          "data-empty") == "0"
      text = browser.find_element(By.ID, f"{kind}-threshold-value").text
      assert text.endswith("(deployment)") and float(text.split()[0]) == pytest.approx(
          value, rel=1e-8)
    # A what-if is marked on every card and undone by the button.
    browser.execute_script("whatIf('image', arguments[0]);", float(scores.min()) - 1.0)
    assert all(c["decision"] == "1" and c["whatIf"] == "1" for c in _cards(browser))
    assert browser.find_element(By.ID, "what-if").is_displayed()
    browser.execute_script("whatIf('pixel', 10.0);")
    assert all(c["mask"] == "0" for c in _cards(browser))
    browser.find_element(By.ID, "what-if-return").click()
    back = {card["name"]: card for card in _cards(browser)}
    assert {n: c["decision"] for n, c in back.items()} == {
        n: str(int(a["decision"])) for n, a in want.items()}
    assert {n: int(c["mask"]) for n, c in back.items()} == {
        n: a["mask_pixels"] for n, a in want.items()}
    assert not browser.find_element(By.ID, "what-if").is_displayed()
    # A pixel threshold amid one image's map values: the page draws the
    # server's mask, not one rebuilt from the 8-bit heatmap.
    maps = det.predict([str(f) for f in files], scoring="few_shot").maps
    middle = float(np.median(maps[1]))
    thresholds.write(tmp_path / "work", dataset="unit", scoring="few_shot",
                     image_score="few_shot:max", checkpoint_step=-1,
                     model=det.threshold_model("few_shot"), image=image_t, pixel=middle,
                     bank=det.bank, method="unit")
    det.records.pop("few_shot", None)
    mid_want = {f.name: app.predict_bytes(f.read_bytes(), "", "few_shot")["mask_pixels"]
                for f in files}
    assert 0 < mid_want[files[1].name] < 64 * 64
    browser.find_element(By.ID, "clear").click()
    browser.execute_script("document.getElementById('files').value = '';")
    browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    _wait(browser, lambda d: len(_cards(d)) == len(files), "the images again")
    assert {c["name"]: int(c["mask"]) for c in _cards(browser)} == mid_want
    # batch has no record here: undecided, no masks, empty sliders.
    browser.find_element(By.ID, "clear").click()
    browser.execute_script("document.getElementById('files').value = '';")
    Select(browser.find_element(By.ID, "mode")).select_by_value("batch")
    browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    _wait(browser, lambda d: len(_cards(d)) == len(files), "the batch")
    for card in _cards(browser):
      assert card["decision"] == "undecided" and card["badge"] == "undecided"
      assert card["mask"] == ""
    for kind in ("image", "pixel"):
      assert browser.find_element(By.ID, f"{kind}-threshold-box").get_attribute(
          "data-empty") == "1"
      assert browser.find_element(By.ID, f"{kind}-threshold-value").text == "undecided"
    csv_lines = browser.execute_script("return csv();").splitlines()
    assert all(",undecided," in line for line in csv_lines[1:])
  finally:
    running.close()
