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
# Set to a path to keep the screenshot there too (docs/api.md's docs/serve.png).
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


# ---- what the page shows is what was scored --------------------------------
# Jet as the page draws it (index.html's jet), for reading the map back from
# the drawn overlay.
_JX = [0, 0.125, 0.375, 0.625, 0.875, 1]
_JC = np.array([[0, 0, .5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [.5, 0, 0]])
_JET = np.stack([255 * np.array([np.interp(v, _JX, _JC[:, k]) for k in range(3)])
                 for v in np.arange(256) / 255.0])


def _canvas(driver, name):
  """The card's drawn canvas as uint8 [H, W, 4] (PNG from toDataURL)."""
  url = driver.execute_script(
      "const c = [...document.querySelectorAll('#results .card')].find("
      "(c) => c.dataset.name === arguments[0]); return c.querySelector('canvas').toDataURL();",
      name)
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert(
      "RGBA"))


def _answer(driver, name):
  """The server's answer behind the card of `name` (the page's own copy)."""
  return driver.execute_script(
      "return results.find((r) => r.name === arguments[0]).answer;", name)


def _check_drawn(driver, name, rgb, amap, what):
  """The canvas holds the scored image on the left and, on the right, the map
  blended over it at the same pixels, coloured on the answer's stated scale
  (`heatmap_scale`): the image equals the scored one, and the map read back
  from the overlay equals the Detector's, pixel for pixel."""
  canvas, answer = _canvas(driver, name), _answer(driver, name)
  h, w = amap.shape
  assert canvas.shape[:2] == (h, 2 * w + 2), (what, canvas.shape, amap.shape)
  left = canvas[:, :w, :3].astype(int)
  right = canvas[:, w + 2:, :3].astype(int)
  assert int(np.abs(left - rgb.astype(int)).max()) <= 2, what
  heat = np.clip(2 * right - left, 0, 255)
  edge = (right == 255).all(-1)               # the mask outline, drawn white
  gray = np.argmin(((heat[..., None, :] - _JET) ** 2).sum(-1), axis=-1)
  lo, hi = answer["map_min"], answer["map_max"]
  sc = answer["heatmap_scale"]
  # The page colours the map as the server sent it (8-bit, min-max), on the
  # stated scale: unit = (value / divisor - scale lo) / (scale hi - scale lo).
  value = lo + np.rint((amap - lo) / (hi - lo) * 255) / 255 * (hi - lo)
  unit = np.clip((value / sc["divisor"] - sc["lo"]) / (sc["hi"] - sc["lo"]), 0, 1)
  want = np.rint(unit * 255)
  assert np.ptp(want) >= 32, (what, np.ptp(want))   # a map with structure to align
  err = np.abs(gray - want)[~edge]
  assert float(np.median(err)) <= 2 and float(np.mean(err)) <= 6, (what, err.mean())


def _exif_jpeg(path, base):
  """`base` (an upright image) stored turned, with EXIF orientation 6."""
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(base).transpose(Image.Transpose.ROTATE_90).save(
      path, format="JPEG", quality=95, exif=exif.tobytes())


def test_page_draws_what_was_scored(browser, detector, demo_workdir, tmp_path):
  """An EXIF-rotated JPEG, a 16-bit PNG and a TIFF, uploaded and from a folder:
  every card draws the server's decode, with the map over the same pixels as
  Detector.predict's; two defect folders with one file name get two labels;
  "clear" empties the page and the file input."""
  from selenium.webdriver.common.by import By
  data = demo_workdir[2] / "family_b" / "tile" / "test"
  folder = tmp_path / "inputs"
  for kind in ("hole", "scratch"):
    (folder / kind).mkdir(parents=True)
    (folder / kind / "000.png").write_bytes((data / kind / "000.png").read_bytes())
  base = np.asarray(Image.open(data / "hole" / "000.png").convert("RGB").resize((48, 72)))
  _exif_jpeg(folder / "turned.jpg", base)
  gray16 = (np.asarray(Image.open(data / "scratch" / "000.png").convert("L"),
                       np.uint16) * 257).astype(np.uint16)
  Image.fromarray(gray16).save(folder / "deep16.png")
  Image.open(data / "hole" / "000.png").convert("RGB").save(folder / "multi.tif")
  uploads = [folder / "turned.jpg", folder / "deep16.png", folder / "multi.tif"]
  want, rgb = {}, {}
  for path in [*uploads, folder / "hole" / "000.png", folder / "scratch" / "000.png"]:
    got = []
    pred = detector.predict(str(path), object_name="tile", each=got.append)
    want[path.name if path in uploads else str(path)] = pred.maps[0]
    rgb[path.name if path in uploads else str(path)] = got[0].rgb
  assert want["turned.jpg"].shape == (72, 48)       # upright
  running = Running(detector, allow_dirs=[str(folder)])
  try:
    browser.get(running.url + "/")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(
        "data-ready") == "1", "the page to load")
    name = browser.find_element(By.ID, "object-name")
    name.clear()
    name.send_keys("tile")
    browser.find_element(By.ID, "files").send_keys("\n".join(map(str, uploads)))
    _wait(browser, lambda d: len(_cards(d)) == 3, "three scored uploads (a TIFF too)")
    for path in uploads:
      _check_drawn(browser, path.name, rgb[path.name], want[path.name], path.name)
    browser.find_element(By.ID, "clear").click()
    assert _cards(browser) == []
    assert browser.execute_script("return document.getElementById('files').value") == ""
    box = browser.find_element(By.ID, "folder")
    box.send_keys(str(folder))
    browser.find_element(By.ID, "folder-go").click()
    _wait(browser, lambda d: len(_cards(d)) == 5, "the folder's five images")
    labels = browser.execute_script(
        "return [...document.querySelectorAll('#results .card')].map((c) => c.dataset.label);")
    assert sorted(labels) == ["deep16.png", "hole/000.png", "multi.tif", "scratch/000.png",
                              "turned.jpg"]
    shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .card .name:not(.source)")]
    assert "hole/000.png" in shown and "scratch/000.png" in shown
    for kind in ("hole", "scratch"):
      p = str(folder / kind / "000.png")
      _check_drawn(browser, p, rgb[p], want[p], p)
    for name in ("turned.jpg", "deep16.png", "multi.tif"):   # the folder's decode too
      p = str(folder / name)
      _check_drawn(browser, p, rgb[name], want[name], p)
  finally:
    running.close()


def test_refused_files_get_a_card(browser, detector, demo_workdir, tmp_path):
  """A file the server cannot decode gets a card with the reason, and the
  other files of the same drop are still scored."""
  from selenium.webdriver.common.by import By
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
  good = demo_workdir[2] / "family_b" / "tile" / "test" / "good" / "000.png"
  running = Running(detector)
  try:
    browser.get(running.url + "/")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(
        "data-ready") == "1", "the page to load")
    name = browser.find_element(By.ID, "object-name")
    name.clear()
    name.send_keys("tile")
    browser.find_element(By.ID, "files").send_keys(f"{bad}\n{good}")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == 2,
          "a card per file")
    errors = browser.execute_script(
        "return [...document.querySelectorAll('#results .card.failed')].map("
        "(c) => [c.dataset.label, c.dataset.error]);")
    assert len(errors) == 1 and errors[0][0] == "broken.png"
    assert "not an image" in errors[0][1]
    assert [c["name"] for c in _cards(browser) if c["score"] is not None] == ["000.png"]
    assert "1 not scored" in browser.find_element(By.ID, "status").text
  finally:
    running.close()


def test_page_preselects_the_configured_mode(browser, demo_workdir):
  """The page starts in the Detector's default mode (predict.scoring), not in
  the first one it offers: a head-free Detector configured for batch, given
  references, offers few_shot first and starts in batch."""
  from selenium.webdriver.common.by import By
  det = Detector.from_workdir(demo_workdir[1], predict__scoring="batch")
  assert det.scoring_modes == ("few_shot", "batch") and det.default_scoring == "batch"
  good = sorted((demo_workdir[2] / "family_b" / "tile" / "test" / "good").glob("*.png"))
  det.use_references([str(p) for p in good[:2]], store=False)
  running = Running(det)
  try:
    browser.get(running.url + "/")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(
        "data-ready") == "1", "the page to load")
    assert browser.find_element(By.ID, "mode").get_attribute("value") == "batch"
  finally:
    running.close()
