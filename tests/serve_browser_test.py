"""The inspection page in headless Chromium: upload two images, read the scores
the page shows, move the threshold sliders, compare with Detector.predict.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and
the pinned selenium of the serve/test extras; skipped with a message otherwise.
"""

import base64
import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adjax import Detector

sys.path.insert(0, str(Path(__file__).parent))
from serve_test import Running  # noqa: E402

# The server scores with a trained demo workdir (an end-to-end run): the slow tier.
pytestmark = pytest.mark.slow

# ADJAX_CHROMIUM / ADJAX_CHROMEDRIVER point at another build (e.g. Chrome's).
CHROMIUM = os.environ.get("ADJAX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (os.environ.get("ADJAX_CHROMEDRIVER") or shutil.which("chromedriver")
                or "/usr/bin/chromedriver")
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900")
# Set to a path to keep the screenshot there too (the README's docs/serve.png).
SCREENSHOT_COPY = os.environ.get("ADJAX_SERVE_SCREENSHOT", "")


# Session scope: set up (or skipped) before the session's trained workdir.
@pytest.fixture(scope="session")
def browser():
  webdriver = pytest.importorskip(
      "selenium.webdriver", reason="selenium is not installed (pip install -e '.[serve]')")
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"headless Chromium is absent ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install -y chromium chromium-driver")
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in CHROMIUM_ARGS:
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  yield driver
  driver.quit()


@pytest.fixture(scope="module")
def detector(demo_workdir):
  return Detector.from_workdir(demo_workdir[1])


def _cards(driver):
  return driver.execute_script(
      "return [...document.querySelectorAll('#results .card')].map(c => ({name: "
      "c.dataset.name, score: parseFloat(c.dataset.score), decision: c.dataset.decision, "
      "mask: parseInt(c.dataset.maskPixels)}));")


def _wait(driver, condition, what, timeout=120):
  from selenium.webdriver.support.ui import WebDriverWait
  try:
    WebDriverWait(driver, timeout).until(lambda d: condition(d))
  except Exception:
    status = driver.find_element("id", "status").text
    raise AssertionError(f"timed out waiting for {what}; the page says: {status!r}") from None


def test_page_scores_sliders_and_screenshot(browser, detector, demo_workdir, tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  data = demo_workdir[2] / "family_b" / "tile" / "test"
  # Two uploads of different sizes: a demo test image and a larger copy.
  first = data / "hole" / "000.png"
  second = tmp_path / "big_scratch.png"
  Image.open(data / "scratch" / "000.png").resize((96, 80), Image.BILINEAR).save(second)
  want = detector.predict([str(first), str(second)], object_name="tile")
  by_name = {"000.png": 0, "big_scratch.png": 1}

  running = Running(detector, allow_dirs=[str(demo_workdir[2])])
  try:
    browser.get(running.url + "/")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(
        "data-ready") == "1", "the page to load")
    assert browser.find_element(By.ID, "object-name").get_attribute("value") == "chip"
    modes = [o.get_attribute("value") for o in
             browser.find_elements(By.CSS_SELECTOR, "#mode option")]
    assert modes == ["zero_shot", "few_shot", "batch"]
    # few_shot is offered only when the server was given --references.
    assert browser.find_element(By.CSS_SELECTOR, '#mode option[value="few_shot"]'
                                ).get_attribute("disabled") is not None
    name = browser.find_element(By.ID, "object-name")
    name.clear()
    name.send_keys("tile")
    browser.find_element(By.ID, "files").send_keys(f"{first}\n{second}")
    _wait(browser, lambda d: len(_cards(d)) == 2, "two scored images")
    cards = _cards(browser)
    # The page's scores are Detector.predict's, sorted by score.
    for card in cards:
      assert abs(card["score"] - float(want.scores[by_name[card["name"]]])) <= 1e-6, card
    assert [c["score"] for c in cards] == sorted((c["score"] for c in cards), reverse=True)
    # Sliders start at the object's thresholds; the decisions are the server's.
    image_t, pixel_t = want.thresholds[0]
    slider = browser.find_element(By.ID, "image-threshold")
    shown = browser.find_element(By.ID, "image-threshold-value").text
    assert float(shown.split()[0]) == pytest.approx(image_t, rel=1e-8), shown
    for card in cards:
      assert card["decision"] == str(int(want.decisions[by_name[card["name"]]]))
    # Move the image slider with the keyboard: to the far left everything is
    # anomalous, to the far right nothing is; in between, its value decides.
    slider.send_keys(Keys.HOME)
    assert [c["decision"] for c in _cards(browser)] == ["1", "1"]
    slider.send_keys(Keys.END)
    assert [c["decision"] for c in _cards(browser)] == ["0", "0"]
    mid = float(np.mean(want.scores))
    browser.execute_script("whatIf('image', arguments[0]);", mid)
    assert [c["decision"] for c in _cards(browser)] == [
        str(int(c["score"] >= mid)) for c in _cards(browser)]
    # The pixel slider redraws the masks from the returned map.
    pixel = browser.find_element(By.ID, "pixel-threshold")
    pixel.send_keys(Keys.HOME)
    assert [c["mask"] for c in _cards(browser)] == [
        want.maps[by_name[c["name"]]].size for c in _cards(browser)]
    t = float(np.median(np.concatenate([m.ravel() for m in want.maps])))
    browser.execute_script("whatIf('pixel', arguments[0]);", t)
    shown = t
    for card in _cards(browser):
      amap = want.maps[by_name[card["name"]]]
      # The page thresholds the 8-bit map; within one grey step of the exact count.
      step = (amap.max() - amap.min()) / 255
      assert (amap >= shown + step).sum() <= card["mask"] <= (amap >= shown - step).sum()
    csv_text = browser.execute_script("return csv();")
    assert csv_text.splitlines()[0] == "name,object_name,score,decision,threshold,what_if"
    assert len(csv_text.splitlines()) == 3
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
    if SCREENSHOT_COPY:
      shutil.copy(shot, SCREENSHOT_COPY)
  finally:
    running.close()


def test_folder_on_the_page_and_its_refusal(browser, detector, demo_workdir, tmp_path):
  from selenium.webdriver.common.by import By
  running = Running(detector, allow_dirs=[str(demo_workdir[2] / "family_b")])
  try:
    browser.get(running.url + "/")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(
        "data-ready") == "1", "the page to load")
    folder = browser.find_element(By.ID, "folder")
    folder.send_keys(str(tmp_path))
    browser.find_element(By.ID, "folder-go").click()
    _wait(browser, lambda d: "outside the allowed folders" in d.find_element(
        By.ID, "status").text, "the refusal")
    folder.clear()
    folder.send_keys(str(demo_workdir[2] / "family_b" / "nut"))
    browser.find_element(By.ID, "folder-go").click()
    want = detector.predict(str(demo_workdir[2] / "family_b" / "nut"), object_name="chip")
    _wait(browser, lambda d: len(_cards(d)) == len(want), "the folder's images")
    got = {c["name"]: c["score"] for c in _cards(browser)}
    for path, score in zip(want.paths, want.scores):
      assert abs(got[path] - float(score)) <= 1e-6
  finally:
    running.close()
