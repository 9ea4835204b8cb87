"""python -m adjax.serve: the JSON answers equal Detector.predict, every refusal
answers its status with a clear message, requests are queued on one lock, and
the command reports bad flags in one line."""

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adjax import Detector, serve
import doc_blocks

# The server scores with a trained demo workdir (an end-to-end run): the slow tier.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 50_000


class Running:
  """A server on a free port in a thread of this process."""

  def __init__(self, detector, **kwargs):
    self.server = serve.make_server(detector, "127.0.0.1", 0, **kwargs)
    self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture(scope="module")
def detector(demo_workdir):
  return Detector.from_workdir(demo_workdir[1])


@pytest.fixture(scope="module")
def server(detector, demo_workdir):
  running = Running(detector, allow_dirs=[str(demo_workdir[2] / "family_b")],
                    max_bytes=MAX_BYTES)
  yield running
  running.close()


def call(url, data=None, headers=None, method=None):
  """(status, JSON answer) of one request."""
  req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
  try:
    with urllib.request.urlopen(req, timeout=120) as res:
      return res.status, json.loads(res.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _png(path) -> bytes:
  return Path(path).read_bytes()


def _multipart(fields) -> tuple[bytes, str]:
  """dict or [(name, value)] (a name may repeat) -> (body, content type)."""
  boundary = uuid.uuid4().hex
  out = b""
  for name, value in (fields.items() if isinstance(fields, dict) else fields):
    extra = '; filename="x.png"' if isinstance(value, bytes) else ""
    value = value if isinstance(value, bytes) else value.encode()
    out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{extra}\r\n\r\n"
            ).encode() + value + b"\r\n"
  return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _image(demo_workdir, i=0):
  return sorted((demo_workdir[2] / "family_b" / "tile" / "test").rglob("*.png"))[i]


def _heatmap(answer):
  gray = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["heatmap_png"]))))
  return answer["map_min"] + gray / 255.0 * (answer["map_max"] - answer["map_min"])


def test_json_answer_equals_detector_predict(server, detector, demo_workdir):
  path = _image(demo_workdir, 1)
  want = detector.predict(str(path), object_name="tile")
  status, raw = call(f"{server.url}/predict?object_name=tile", _png(path),
                     {"Content-Type": "application/octet-stream"})
  assert status == 200, raw
  body, ctype = _multipart({"image": _png(path), "object_name": "tile"})
  status, multi = call(f"{server.url}/predict", body, {"Content-Type": ctype})
  assert status == 200, multi
  for answer in (raw, multi):
    assert {"score", "decision", "threshold", "threshold_source", "heatmap_png"} <= set(answer)
    assert abs(answer["score"] - float(want.scores[0])) <= 1e-6
    assert answer["decision"] == bool(want.decisions[0])
    assert answer["threshold"] == want.thresholds[0][0]
    assert answer["threshold_source"] == want.threshold_source[0]
    amap = _heatmap(answer)
    assert amap.shape == want.maps[0].shape
    # 8-bit, min-max scaled: within half a step of the map.
    step = (answer["map_max"] - answer["map_min"]) / 255
    assert float(np.max(np.abs(amap - want.maps[0]))) <= step / 2 + 1e-6


def test_folder_under_allow_dir(server, detector, demo_workdir):
  folder = demo_workdir[2] / "family_b" / "tile"
  status, out = call(f"{server.url}/predict_folder", json.dumps(
      {"folder": str(folder), "object_name": "tile"}).encode(),
      {"Content-Type": "application/json"})
  assert status == 200, out
  want = detector.predict(str(folder), object_name="tile")
  assert [a["path"] for a in out["results"]] == want.paths
  np.testing.assert_allclose([a["score"] for a in out["results"]], want.scores, atol=1e-6)
  # Each answer carries the image that was scored, at its map's size.
  for answer, p, amap in zip(out["results"], want.paths, want.maps):
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["image_png"]))))
    assert shown.shape[:2] == amap.shape
    np.testing.assert_array_equal(shown, np.asarray(Image.open(p).convert("RGB")))
    assert answer["relative"] == os.path.relpath(p, folder)
  assert out["refused"] == [] and out["unreadable"] == []


def test_refusals(server, demo_workdir, tmp_path):
  png = _png(_image(demo_workdir))
  as_json = {"Content-Type": "application/json"}
  cases = {
      "not an image": (f"{server.url}/predict?object_name=tile", b"hello, not an image", {},
                       "POST", 400, "not an image"),
      "empty body": (f"{server.url}/predict?object_name=tile", b"", {}, "POST", 400,
                     "is empty"),
      "too large": (f"{server.url}/predict?object_name=tile", b"\0" * (MAX_BYTES + 1), {},
                    "POST", 413, f"over the limit of {MAX_BYTES} bytes"),
      "no object name": (f"{server.url}/predict", png, {}, "POST", 400,
                         "object_name is missing"),
      "blank object name": (f"{server.url}/predict?object_name=%20", png, {}, "POST", 400,
                            "object_name is missing"),
      "unknown mode": (f"{server.url}/predict?object_name=tile&mode=fewshot", png, {}, "POST",
                       400, "mode='fewshot': expected one of zero_shot, few_shot, batch"),
      "few_shot without references": (f"{server.url}/predict?mode=few_shot", png, {},
                                      "POST", 400, "start the server with --references DIR"),
      "batch of one upload": (f"{server.url}/predict?mode=batch", png, {}, "POST", 400,
                              "at least 5 to /predict_set"),
      "folder outside": (f"{server.url}/predict_folder", json.dumps(
          {"folder": str(tmp_path), "object_name": "tile"}).encode(), as_json, "POST", 403,
          "outside the allowed folders"),
      "dot-dot escape": (f"{server.url}/predict_folder", json.dumps(
          {"folder": str(demo_workdir[2] / "family_b" / ".." / "family_a"),
           "object_name": "tile"}).encode(), as_json, "POST", 403,
          "outside the allowed folders"),
      "folder without name": (f"{server.url}/predict_folder", json.dumps(
          {"folder": str(demo_workdir[2] / "family_b")}).encode(), as_json, "POST", 400,
          "object_name is missing"),
      "folder not JSON": (f"{server.url}/predict_folder", b"{", as_json, "POST", 400,
                          "not JSON"),
      "folder as a form": (f"{server.url}/predict_folder", b"folder=x", {}, "POST", 415,
                           "application/json"),
      "unknown POST route": (f"{server.url}/score", png, {}, "POST", 404, "unknown route"),
      "unknown GET route": (f"{server.url}/nope", None, {}, "GET", 404, "unknown route"),
  }
  for what, (url, data, headers, method, want_status, message) in cases.items():
    status, answer = call(url, data, headers, method)
    assert status == want_status, (what, answer)
    assert message in answer["error"], (what, answer)
  # The server keeps answering after every refusal.
  assert call(f"{server.url}/predict?object_name=tile", png)[0] == 200


def test_folders_refused_without_allow_dir(detector, demo_workdir):
  running = Running(detector)
  try:
    status, answer = call(f"{running.url}/predict_folder", json.dumps(
        {"folder": str(demo_workdir[2]), "object_name": "tile"}).encode(),
        {"Content-Type": "application/json"})
    assert status == 403 and "--allow-dir" in answer["error"]
    status, info = call(f"{running.url}/info")
    assert status == 200 and info["folders_allowed"] is False
    assert info["modes"] == ["zero_shot", "few_shot", "batch"] and info["references"] == 0
    assert info["object_names"] == [
        "chip", "mesh", "nut", "tile"]
  finally:
    running.close()


def test_concurrent_requests_are_queued(server, detector, demo_workdir, monkeypatch):
  """Eight requests at once: all answered, with the sequential answers, and the
  device never sees two at a time."""
  active, peak = [0], [0]
  guard = threading.Lock()
  real = type(detector).predict

  def counting(self, *args, **kwargs):
    with guard:
      active[0] += 1
      peak[0] = max(peak[0], active[0])
    try:
      time.sleep(0.05)
      return real(self, *args, **kwargs)
    finally:
      with guard:
        active[0] -= 1

  monkeypatch.setattr(type(detector), "predict", counting)
  paths = [_image(demo_workdir, i % 3) for i in range(8)]
  answers = [None] * 8

  def one(i):
    answers[i] = call(f"{server.url}/predict?object_name=tile", _png(paths[i]))

  threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert peak[0] == 1
  assert all(status == 200 for status, _ in answers)
  for i in range(8):
    assert answers[i][1]["score"] == answers[i % 3][1]["score"]


def test_page_is_served(server):
  with urllib.request.urlopen(server.url + "/", timeout=30) as res:
    page = res.read().decode()
  assert res.headers["Content-Type"].startswith("text/html")
  for element in ('id="files"', 'id="object-name"', 'id="mode"', 'id="image-threshold"',
                  'id="pixel-threshold"', 'id="download-csv"', 'id="folder"'):
    assert element in page


def test_command_line(demo_workdir, tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, "-m", "adjax.serve", "--workdir", str(tmp_path),
                         "--port", "0"],
                        capture_output=True, text=True, env=env, timeout=120)
  assert done.returncode == 2 and done.stderr.startswith("error: ")
  assert "config.json" in done.stderr and "Traceback" not in done.stderr
  done = subprocess.run([sys.executable, "-m", "adjax.serve", "--workdir",
                         str(demo_workdir[1]), "--allow-dir", str(tmp_path / "nope")],
                        capture_output=True, text=True, env=env, timeout=120)
  assert done.returncode == 2 and "--allow-dir" in done.stderr and "Traceback" not in done.stderr
  assert serve._parser().parse_args(["--workdir", "w"]).host == "127.0.0.1"
  # Started as documented: it answers on 127.0.0.1 at the port given.
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  refs = demo_workdir[2] / "family_b" / "tile" / "test"
  proc = subprocess.Popen([sys.executable, "-m", "adjax.serve", "--workdir", str(demo_workdir[1]),
                           "--port", str(port), "--references", str(refs)],
                          stdout=subprocess.PIPE, stderr=(tmp_path / "err").open("w"),
                          text=True, env=dict(env, ADJAX_ANNOUNCE_AFTER_S="0"))
  try:
    # Lines before it say which head was loaded; the address line follows.
    lines = [proc.stdout.readline()]
    while lines[-1] and "http://" not in lines[-1] and len(lines) < 20:
      lines.append(proc.stdout.readline())
    assert any(f"http://127.0.0.1:{port}/" in line for line in lines), lines
    status, info = call(f"http://127.0.0.1:{port}/info")
    assert status == 200 and info["image_size"] == 64
    assert info["references"] == len(list(refs.rglob("*.png"))) > 0
    # The page's object name starts at the references' object (…/tile/test).
    assert info["default_object_name"] == "tile"
    # Each wait before the address line is announced (here at once: the
    # variable's 0 s; by default after 3 s, so a quick refusal stays one line).
    assert (tmp_path / "err").read_text().splitlines() == [
        f"loading {demo_workdir[1]} (towers and head; the page answers once they are in "
        "memory)", f"few_shot: building the memory bank from {refs}"]
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def test_docs_curl_examples(server, detector, demo_workdir):
  """docs/api.md's curl commands, pointed at the test's server and image."""
  import re
  import shlex
  import shutil as sh
  if not sh.which("curl"):
    pytest.skip("curl is not installed")
  block = doc_blocks.block("docs/api.md", "curl -s")
  commands = [c for c in block.replace("\\\n", " ").splitlines() if c.startswith("curl")]
  assert len(commands) == 2
  image = _image(demo_workdir)
  want = detector.predict(str(image), object_name="tile")
  for command in commands:
    command = command.replace("http://127.0.0.1:8080", server.url).replace(
        "data/demo/family_b/tile/test/good/000.png", str(image))
    done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert abs(answer["score"] - float(want.scores[0])) <= 1e-6, command


def test_few_shot_and_batch_requests_equal_detector_predict(server, detector, demo_workdir):
  """few_shot against the references the server was given equals
  Detector.predict(scoring="few_shot"); a set of uploads in batch mode is
  scored together, as Detector.predict(scoring="batch") scores them."""
  pool = sorted((demo_workdir[2] / "family_b").rglob("*.png"))
  refs = pool[:2]
  detector.use_references([str(p) for p in refs])
  try:
    path = pool[5]
    want = detector.predict(str(path), scoring="few_shot")
    status, answer = call(f"{server.url}/predict?mode=few_shot", _png(path))
    assert status == 200, answer
    assert abs(answer["score"] - float(want.scores[0])) <= 1e-6
    assert answer["decision"] is None and answer["threshold_source"] == "none"
    step = (answer["map_max"] - answer["map_min"]) / 255
    assert float(np.max(np.abs(_heatmap(answer) - want.maps[0]))) <= step / 2 + 1e-6
    # A reference itself scores 0.
    status, answer = call(f"{server.url}/predict?mode=few_shot", _png(refs[0]))
    assert status == 200 and answer["score"] < 2e-3, answer
  finally:
    detector.references, detector.reference_paths = None, []
  paths = pool[2:8]
  want = detector.predict([str(p) for p in paths], scoring="batch")
  body, ctype = _multipart([("mode", "batch")] + [("image", _png(p)) for p in paths])
  status, out = call(f"{server.url}/predict_set", body, {"Content-Type": ctype})
  assert status == 200, out
  np.testing.assert_allclose([a["score"] for a in out["results"]], want.scores, atol=1e-6)
  body, ctype = _multipart([("mode", "batch")] + [("image", _png(p)) for p in paths[:4]])
  status, out = call(f"{server.url}/predict_set", body, {"Content-Type": ctype})
  assert status == 400 and "needs at least 5" in out["error"], out
