"""python -m adjax.serve on a tiny model (fast tier): what the page shows is
what was scored, only the page's own origin is served, files are confined by
real path, and every bad request answers a JSON 4xx/408 in bounded time with
one console line and no traceback.

The model: the demo's random ViT-S/16 at 32 px, head-free (few_shot against
two array references, and batch), built in a few seconds; the protocol under
test is the same for every scoring mode.
"""

import base64
import io
import json
import os
import socket
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
from adjax.data import images as data_images

sys.path.insert(0, str(Path(__file__).parent))
import demo_run  # noqa: E402

PAD = 3000          # bytes of the boundary test's body beyond its PNG


def _png(a: np.ndarray, **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG", **kw)
  return buf.getvalue()


def _noise(seed, h, w):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def _exif_jpeg(path: Path) -> np.ndarray:
  """A 30 x 20 (w x h) JPEG stored landscape with EXIF orientation 6 (turn 90
  degrees clockwise to view): upright it is 20 wide, 30 tall. Returns the
  stored pixels."""
  a = np.zeros((20, 30, 3), np.uint8)
  a[:, :10] = (230, 30, 30)           # a red band on the stored image's left
  a[:, 10:] = (30, 30, 200)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(a).save(path, format="JPEG", quality=95, exif=exif.tobytes())
  return a


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve_guard")
  work = root / "work"
  work.mkdir()
  c = demo_run.demo_config()
  c.image_size = 32
  c.predict.batch_size = 8      # the test process has 8 (fake) devices
  (work / "config.json").write_text(c.to_json_best_effort(indent=2))
  det = Detector.from_workdir(work, predict__scoring="few_shot", text__random_init=False,
                              text__checkpoint="/nonexistent/text")
  det.use_references([_noise(1, 40, 30), _noise(2, 40, 30)])
  # The allowed folder: two defect folders with the same file name, an
  # EXIF-rotated JPEG, a 16-bit PNG, a TIFF; links to files outside it.
  allowed, outside, sibling = root / "family_b", root / "outside", root / "family_b_copy"
  for d in (allowed / "hole", allowed / "scratch", outside, sibling):
    d.mkdir(parents=True)
  (allowed / "hole" / "001.png").write_bytes(_png(_noise(3, 24, 28)))
  (allowed / "scratch" / "001.png").write_bytes(_png(_noise(4, 24, 28)))
  _exif_jpeg(allowed / "turned.jpg")
  ramp = (np.arange(24 * 28, dtype=np.uint32).reshape(24, 28) * 90).astype(np.uint16)
  Image.fromarray(ramp).save(allowed / "deep16.png")
  Image.fromarray(_noise(5, 24, 28)).save(allowed / "multi.tif")
  (outside / "secret.png").write_bytes(_png(_noise(6, 24, 28)))
  (sibling / "copy.png").write_bytes(_png(_noise(7, 24, 28)))
  os.symlink(outside, allowed / "linked_folder")
  os.symlink(outside / "secret.png", allowed / "linked_file.png")
  return det, root


class Running:
  """A server on a free port in a thread of this process, its console lines kept."""

  def __init__(self, detector, **kwargs):
    self.lines = []
    self.server = serve.make_server(detector, "127.0.0.1", 0, log=self.lines.append,
                                    **kwargs)
    self.port = self.server.server_address[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture(scope="module")
def server(tiny):
  det, root = tiny
  ok = len(_png(_noise(8, 24, 28))) + PAD
  running = Running(det, allow_dirs=[str(root / "family_b")], max_bytes=ok,
                    timeout=0.5, max_connections=40)
  yield running
  running.close()


def call(url, data=None, headers=None, method=None):
  req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
  try:
    with urllib.request.urlopen(req, timeout=60) as res:
      return res.status, json.loads(res.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def raw(port, request: bytes, wait=10.0):
  """Sends bytes, reads one answer (to its Content-Length, or until the server
  closes): (status, headers, body, seconds)."""
  start = time.monotonic()
  with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
    s.sendall(request)
    data = b""
    while True:
      try:
        chunk = s.recv(65536)
      except ConnectionResetError:
        break
      if not chunk:
        break
      data += chunk
      head, sep, body = data.partition(b"\r\n\r\n")
      length = [int(x.split(b":")[1]) for x in head.lower().split(b"\r\n")
                if x.startswith(b"content-length:")]
      if sep and length and (len(body) >= length[0] or request.startswith(b"HEAD")):
        break
  head, _, body = data.partition(b"\r\n\r\n")
  lines = head.decode("latin-1").split("\r\n")
  status = int(lines[0].split()[1])
  headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
  return status, headers, body, time.monotonic() - start


def _multipart(fields):
  boundary = uuid.uuid4().hex
  out = b""
  for name, value in fields:
    extra = '; filename="x.png"' if isinstance(value, bytes) else ""
    value = value if isinstance(value, bytes) else value.encode()
    out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{extra}\r\n\r\n"
            ).encode() + value + b"\r\n"
  return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _decoded(b64):
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _heatmap(answer):
  gray = _decoded(answer["heatmap_png"]).astype(np.float64)
  return answer["map_min"] + gray / 255.0 * (answer["map_max"] - answer["map_min"])


# ------------------------------------------------------------ shown is scored


def test_every_entry_point_decodes_alike(tiny):
  """Paths, bytes and PIL images give the one upright 8-bit RGB image: EXIF
  turned, 16-bit rescaled (not clipped white)."""
  _, root = tiny
  jpeg, deep = root / "family_b" / "turned.jpg", root / "family_b" / "deep16.png"
  for path in (jpeg, deep):
    a = np.asarray(data_images.decode(path))
    np.testing.assert_array_equal(np.asarray(data_images.decode(path.read_bytes())), a)
    np.testing.assert_array_equal(np.asarray(data_images.decode(Image.open(path))), a)
    assert a.dtype == np.uint8 and a.ndim == 3
  assert np.asarray(data_images.decode(jpeg)).shape == (30, 20, 3)    # upright
  # The red band on the stored left is on the top after the turn (orientation 6).
  top = np.asarray(data_images.decode(jpeg))[:8].reshape(-1, 3).mean(0)
  assert top[0] > 150 and top[2] < 100, top
  gray = np.asarray(data_images.decode(deep))[..., 0].astype(int)
  stored = np.asarray(Image.open(deep)).astype(float)
  np.testing.assert_allclose(gray, np.rint(stored / 65535 * 255), atol=1)
  assert gray.max() > gray.min() + 100      # a ramp, not clipped to white


def test_upload_answers_the_image_it_scored(server, tiny):
  """An EXIF-rotated JPEG, a 16-bit PNG and a TIFF uploaded: the score and map
  equal Detector.predict(path) and Detector.predict(PIL image); `image_png`
  is the upright decode at the map's size, so a page drawing it is aligned."""
  det, root = tiny
  for name in ("turned.jpg", "deep16.png", "multi.tif"):
    path = root / "family_b" / name
    want = det.predict(str(path), scoring="few_shot")
    from_pil = det.predict(Image.open(path), scoring="few_shot")
    status, answer = call(f"{server.url}/predict?mode=few_shot", path.read_bytes(),
                          {"Content-Type": "application/octet-stream"})
    assert status == 200, answer
    shown = _decoded(answer["image_png"])
    assert shown.shape[:2] == want.maps[0].shape == from_pil.maps[0].shape, name
    assert (answer["height"], answer["width"]) == want.maps[0].shape
    np.testing.assert_array_equal(shown, np.asarray(data_images.decode(path)))
    assert abs(answer["score"] - float(want.scores[0])) <= 1e-6
    assert abs(float(from_pil.scores[0]) - float(want.scores[0])) <= 1e-6
    step = (answer["map_max"] - answer["map_min"]) / 255
    assert float(np.max(np.abs(_heatmap(answer) - want.maps[0]))) <= step / 2 + 1e-6
  assert _decoded(call(f"{server.url}/predict?mode=few_shot",
                       (root / "family_b" / "turned.jpg").read_bytes())[1]["image_png"]
                  ).shape == (30, 20, 3)


def test_max_bytes_is_inclusive(server, tiny):
  """A body of exactly --max-bytes is read; one byte more is a 413."""
  png = _png(_noise(8, 24, 28))
  body = png + b"\0" * PAD                  # PIL stops at IEND: trailing bytes are fine
  assert len(body) == server.server.app.max_bytes
  status, answer = call(f"{server.url}/predict?mode=few_shot", body)
  assert status == 200, answer
  status, answer = call(f"{server.url}/predict?mode=few_shot", body + b"\0")
  assert status == 413 and f"over the limit of {len(body)} bytes" in answer["error"]


def test_too_many_pixels_are_refused_before_decoding(server, monkeypatch):
  """An image over serve.MAX_PIXELS is a 413 from its header alone."""
  monkeypatch.setattr(serve, "MAX_PIXELS", 24 * 28 - 1)
  status, answer = call(f"{server.url}/predict?mode=few_shot", _png(_noise(8, 24, 28)))
  assert status == 413 and "28 x 24 pixels, over the limit" in answer["error"], answer
  monkeypatch.setattr(serve, "MAX_PIXELS", 24 * 28)
  assert call(f"{server.url}/predict?mode=few_shot", _png(_noise(8, 24, 28)))[0] == 200


def test_few_shot_without_references_is_refused(tiny):
  det, _ = tiny
  refs, paths = det.references, det.reference_paths
  det.references, det.reference_paths = None, []
  running = Running(det)
  try:
    status, answer = call(f"{running.url}/predict?mode=few_shot", _png(_noise(8, 24, 28)))
    assert status == 400 and "--references DIR" in answer["error"], answer
    assert call(f"{running.url}/info")[1]["references"] == 0
  finally:
    det.references, det.reference_paths = refs, paths
    running.close()


def test_several_images_on_predict_are_refused(server, tiny):
  png = _png(_noise(8, 24, 28))
  body, ctype = _multipart([("mode", "few_shot"), ("image", png), ("image", png)])
  status, answer = call(f"{server.url}/predict", body, {"Content-Type": ctype})
  assert status == 400 and "/predict_set" in answer["error"] and "2" in answer["error"]


# ------------------------------------------------------------ confinement


def _folder(server, folder, **extra):
  return call(f"{server.url}/predict_folder", json.dumps(
      {"folder": str(folder), "mode": "few_shot", **extra}).encode(),
      {"Content-Type": "application/json"})


def test_folder_confined_by_real_path(server, tiny):
  det, root = tiny
  allowed = root / "family_b"
  status, out = _folder(server, allowed)
  assert status == 200, out
  relative = sorted(a["relative"] for a in out["results"])
  assert relative == ["deep16.png", "hole/001.png", "multi.tif", "scratch/001.png",
                      "turned.jpg"]
  # Links to files outside are listed as refused, never scored or shown.
  assert sorted(r["relative"] for r in out["refused"]) == [
      "linked_file.png", "linked_folder/secret.png"]
  secret = np.asarray(data_images.decode(root / "outside" / "secret.png"))
  for a in out["results"]:
    shown = _decoded(a["image_png"])
    assert shown.shape != secret.shape or not np.array_equal(shown, secret)
    want = det.predict(a["path"], scoring="few_shot")
    assert abs(a["score"] - float(want.scores[0])) <= 1e-6
    np.testing.assert_array_equal(shown, np.asarray(data_images.decode(a["path"])))
  # Named directly: a link out, a sibling whose name extends the allowed one,
  # and `..`, all 403.
  for folder in (allowed / "linked_folder", root / "family_b_copy",
                 f"{allowed}/../outside", f"{allowed}/hole/../../family_b_copy"):
    status, out = _folder(server, folder)
    assert status == 403 and "outside the allowed folders" in out["error"], (folder, out)
  assert len(server.lines) >= 4


# ------------------------------------------------------------ bad requests


def _http(server, first_line, headers=(), body=b"", host=None):
  host = host or f"127.0.0.1:{server.port}"
  lines = [first_line, f"Host: {host}", *headers]
  return raw(server.port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


BAD = {
    # what: (request line, headers, body, status, words in the error)
    "negative Content-Length": ("POST /predict?mode=few_shot HTTP/1.1",
                                ["Content-Length: -5"], b"", 400, "not one non-negative"),
    "non-numeric Content-Length": ("POST /predict?mode=few_shot HTTP/1.1",
                                   ["Content-Length: ten"], b"", 400, "not one non-negative"),
    "two Content-Lengths": ("POST /predict?mode=few_shot HTTP/1.1",
                            ["Content-Length: 3", "Content-Length: 4"], b"abc", 400,
                            "not one non-negative"),
    "no Content-Length": ("POST /predict?mode=few_shot HTTP/1.1", [], b"", 411,
                          "Content-Length is missing"),
    "chunked": ("POST /predict?mode=few_shot HTTP/1.1", ["Transfer-Encoding: chunked"],
                b"5\r\nhello\r\n0\r\n\r\n", 411, "Transfer-Encoding"),
    "Content-Length over the body": ("POST /predict?mode=few_shot HTTP/1.1",
                                     ["Content-Length: 1000"], b"short", 408,
                                     "did not arrive"),
    "NUL in a folder": ("POST /predict_folder HTTP/1.1",
                        ["Content-Type: application/json", "Content-Length: 32"],
                        b'{"folder": "/tmp/a\\u0000b.png"}'.ljust(32), 400,
                        "control character"),
    "folder as a number": ("POST /predict_folder HTTP/1.1",
                           ["Content-Type: application/json", "Content-Length: 13"],
                           b'{"folder": 5}', 400, "folder is missing"),
    "text/plain to a JSON route": ("POST /predict_folder HTTP/1.1",
                                   ["Content-Type: text/plain", "Content-Length: 2"], b"{}",
                                   415, "application/json"),
    "text/plain image": ("POST /predict HTTP/1.1",
                         ["Content-Type: text/plain", "Content-Length: 2"], b"hi", 415,
                         "not 'text/plain'"),
    "HEAD": ("HEAD /info HTTP/1.1", [], b"", 200, None),
    "OPTIONS": ("OPTIONS /predict HTTP/1.1", [], b"", 405, "not served"),
    "PUT": ("PUT /predict HTTP/1.1", ["Content-Length: 0"], b"", 405, "not served"),
    "oversized header": ("GET /info HTTP/1.1", ["X-Big: " + "a" * 70000], b"", 431,
                         "header line is too long"),
    "too many headers": ("GET /info HTTP/1.1", [f"X-{i}: 1" for i in range(120)], b"",
                         431, "too many headers"),
    "request line too long": ("GET /" + "a" * 70000 + " HTTP/1.1", [], b"", 414,
                              "longer than 65536"),
    "bad request line": ("GARBAGE", [], b"", 400, "Bad request"),
    "dot-dot route": ("GET /../../etc/passwd HTTP/1.1", [], b"", 404, "unknown route"),
    "encoded dot-dot route": ("GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1", [], b"", 404,
                              "unknown route"),
    "unknown POST route": ("POST /score HTTP/1.1", ["Content-Length: 0"], b"", 404,
                           "unknown route"),
    "body not JSON": ("POST /predict_folder HTTP/1.1",
                      ["Content-Type: application/json", "Content-Length: 1"], b"{", 400,
                      "not JSON"),
    "body not UTF-8": ("POST /predict_folder HTTP/1.1",
                       ["Content-Type: application/json", "Content-Length: 2"],
                       b"\xff\xfe", 400, "not JSON"),
    "not an image": ("POST /predict?mode=few_shot HTTP/1.1", ["Content-Length: 5"],
                     b"hello", 400, "not an image"),
    "empty image": ("POST /predict?mode=few_shot HTTP/1.1", ["Content-Length: 0"], b"",
                    400, "is empty"),
    "batch of one": ("POST /predict?mode=batch HTTP/1.1", ["Content-Length: 5"],
                     b"hello", 400, "/predict_set"),
    "zero_shot without a head": ("POST /predict?mode=zero_shot HTTP/1.1",
                                 ["Content-Length: 5"], b"hello", 400, "expected one of"),
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_bad_request_answers_json_in_bounded_time_with_one_line(server, what, capfd):
  first, headers, body, want, words = BAD[what]
  before = len(server.lines)
  status, head, answer, seconds = _http(server, first, headers, body)
  assert status == want, (what, answer)
  assert seconds < 5, (what, seconds)
  if first.startswith("HEAD"):
    assert answer == b"" and head["content-type"] == "application/json"
    return
  assert head["content-type"] == "application/json", (what, head)
  error = json.loads(answer)["error"]
  assert words in error, (what, error)
  for _ in range(100):                     # the line is written after the answer
    if len(server.lines) > before:
      break
    time.sleep(0.01)
  assert len(server.lines) == before + 1, (what, server.lines[before:])
  assert str(want) in server.lines[-1]
  assert "Traceback" not in capfd.readouterr().err


def test_stalled_request_ends_408_and_frees_its_thread(server):
  """A request that never finishes its headers or body is answered 408 within
  the read timeout (0.5 s here) and its thread ends."""
  base = threading.active_count()
  socks = []
  for i in range(10):
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /predict?mode=few_shot HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
              b"Content-Length: 100\r\n\r\nabc" % server.port if i % 2 else b"GET /in")
    socks.append(s)
  start = time.monotonic()
  for s in socks:
    s.settimeout(5)
    data = s.recv(4096)
    s.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:40]   # a half-sent line too
  assert time.monotonic() - start < 4
  for _ in range(100):
    if threading.active_count() <= base:
      break
    time.sleep(0.05)
  assert threading.active_count() <= base


def test_slow_drip_cannot_hold_a_thread(tiny):
  """One byte every 0.15 s keeps each read under the 0.25 s timeout, but the
  whole request has 6 x 0.25 s: it ends 408 within about 1.5 s."""
  det, _ = tiny
  running = Running(det, timeout=0.25)
  try:
    s = socket.create_connection(("127.0.0.1", running.port), timeout=10)
    request = (b"POST /predict?mode=few_shot HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
               b"Content-Length: 100\r\n\r\n" % running.port) + b"x" * 100
    stop = threading.Event()

    def drip():
      for byte in request:
        if stop.wait(0.15):
          return
        try:
          s.sendall(bytes([byte]))
        except OSError:
          return

    sender = threading.Thread(target=drip, daemon=True)
    start = time.monotonic()
    sender.start()
    answer = s.recv(4096)
    seconds = time.monotonic() - start
    stop.set()
    sender.join()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:60]
    assert seconds < 3, seconds
    s.close()
  finally:
    running.close()


def test_connections_are_bounded(tiny):
  """Over --max-connections a connection is answered 503 at once; the
  thread count stays bounded, and the server answers again once they go."""
  det, _ = tiny
  running = Running(det, timeout=2.0, max_connections=4)
  try:
    base = threading.active_count()
    held = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(4)]
    for s in held:
      s.sendall(b"GET /info HTTP/1.1\r\n")          # headers never finished
    time.sleep(0.2)
    status, _, body, seconds = raw(running.port, b"GET /info HTTP/1.1\r\nHost: localhost:%d"
                                   b"\r\n\r\n" % running.port)
    assert status == 503 and "busy" in json.loads(body)["error"] and seconds < 2
    assert threading.active_count() <= base + 4
    for s in held:
      s.close()
    for _ in range(50):
      if threading.active_count() <= base:
        break
      time.sleep(0.05)
    assert call(f"{running.url}/info")[0] == 200
  finally:
    running.close()


def test_client_disconnects_are_one_line(server, tiny, capfd):
  _, root = tiny
  png = (root / "family_b" / "hole" / "001.png").read_bytes()
  before = len(server.lines)
  for _ in range(5):
    s = socket.create_connection(("127.0.0.1", server.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    s.sendall(b"POST /predict?mode=few_shot HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
              b"Content-Length: %d\r\n\r\n" % (server.port, len(png)) + png)
    s.close()                                 # gone before the answer (reset)
  time.sleep(1.0)
  assert call(f"{server.url}/info")[0] == 200
  new = server.lines[before:]
  assert len(new) <= 5 and all("disconnected" in line for line in new), new
  assert "Traceback" not in capfd.readouterr().err


@pytest.mark.slow
def test_sixteen_concurrent_uploads(server, tiny):
  _, root = tiny
  paths = [root / "family_b" / "hole" / "001.png", root / "family_b" / "scratch" / "001.png"]
  answers = [None] * 16

  def one(i):
    answers[i] = call(f"{server.url}/predict?mode=few_shot", paths[i % 2].read_bytes())

  threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert all(status == 200 for status, _ in answers), answers
  for i in range(16):
    assert answers[i][1]["score"] == answers[i % 2][1]["score"]


# ------------------------------------------------------------ origin


def test_foreign_host_or_origin_is_refused_on_every_route(server, tiny):
  _, root = tiny
  png = (root / "family_b" / "hole" / "001.png").read_bytes()
  folder = json.dumps({"folder": str(root / "family_b"), "mode": "few_shot"}).encode()
  routes = [("GET", "/", None, {}), ("GET", "/info", None, {}),
            ("GET", "/favicon.svg", None, {}),
            ("POST", "/predict?mode=few_shot", png, {}),
            ("POST", "/predict_folder", folder, {"Content-Type": "application/json"}),
            ("POST", "/predict_set", png, {"Content-Type": "multipart/form-data"})]
  port = server.port
  foreign = [{"Host": "evil.example:%d" % port},               # DNS rebinding
             {"Host": "127.0.0.1:1"},
             {"Origin": "http://evil.example"},                  # CSRF
             {"Origin": "null"},
             {"Origin": "http://127.0.0.1:%d" % (port + 1)},
             {"Referer": "http://evil.example/page.html"},
             {"Sec-Fetch-Site": "cross-site"}]
  for method, route, data, headers in routes:
    for bad in foreign:
      status, answer = call(server.url + route, data, {**headers, **bad}, method)
      assert status == 403, (route, bad, answer)
  # The page's own origin, each loopback name, and no Origin (curl) are served.
  for good in ({"Origin": server.url}, {"Host": f"localhost:{port}"},
               {"Referer": server.url + "/"}, {"Sec-Fetch-Site": "same-origin"}, {}):
    assert call(server.url + "/info", None, good)[0] == 200, good
  status, answer = call(f"{server.url}/predict?mode=few_shot", png,
                        {"Origin": server.url, "Sec-Fetch-Site": "same-origin"})
  assert status == 200, answer


# ------------------------------------------------------------ the command


def test_command_checks_arguments_before_the_model(tmp_path, capsys):
  """Each bad argument: exit 2 and one `error:` line, before any model loads
  (the workdir here holds no model at all)."""
  work = tmp_path / "work"
  work.mkdir()
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    cases = [
        (["--port", "99999"], "--port: 99999 is not a port number"),
        (["--port", "http"], "--port: 'http' is not a port number"),
        (["--max-bytes", "-5"], "--max-bytes: -5: expected a positive number"),
        (["--timeout", "nan"], "--timeout: nan: expected a positive number"),
        (["--host", "0.0.0.0"], "add --allow-remote"),
        (["--host", "no-such-host.invalid"], "--host no-such-host.invalid"),
        (["--port", str(busy)], f"--port {busy}: "),
        (["--allow-dir", str(tmp_path / "nope")], "--allow-dir"),
        (["--references", str(tmp_path / "nope")], "--references"),
    ]
    for args, words in cases:
      start = time.monotonic()
      try:
        code = serve.main(["--workdir", str(work), *args])
      except SystemExit as e:
        code = e.code
      err = capsys.readouterr().err
      assert code == 2, (args, err)
      assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
      assert words in err, (args, err)
      assert time.monotonic() - start < 5, args
  # --allow-remote binds with a warning that says what it exposes.
  code = serve.main(["--workdir", str(work), "--host", "0.0.0.0", "--allow-remote",
                     "--port", "0", "--allow-dir", str(tmp_path)])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("warning: --host 0.0.0.0 --allow-remote")
  assert str(tmp_path) in err.splitlines()[0] and "config.json" in err.splitlines()[1]


def test_object_name_default_from_references():
  assert serve.object_from_references("data/demo/family_b/tile/test/good") == "tile"
  assert serve.object_from_references("/refs/bottle") == "bottle"
  assert serve.object_from_references("/data/screw/train/good/*.png") == "screw"


def test_page_and_favicon(server):
  with urllib.request.urlopen(server.url + "/", timeout=30) as res:
    page = res.read().decode()
    assert "frame-ancestors 'none'" in res.headers["Content-Security-Policy"]
  assert '<link rel="icon" href="/favicon.svg"' in page
  for route in ("/favicon.svg", "/favicon.ico"):
    with urllib.request.urlopen(server.url + route, timeout=30) as res:
      assert res.headers["Content-Type"] == "image/svg+xml"
      assert res.read().startswith(b"<svg")


@pytest.mark.slow
def test_load_with_stalled_connections(tiny):
  """python -m adjax.bench serve's load, smaller: 200 uploads 16 at a time
  beside 50 stalled connections: every upload answered 200, the server's
  threads within its bound, every stalled connection ended with a 408."""
  from adjax.bench import serve as bench
  det, _ = tiny
  r = bench.run(det, requests=200, concurrency=16, stalled=50, timeout=1.0,
                max_connections=80)
  assert r["statuses"] == {200: 200}, r
  assert r["peak_server_threads"] <= 80 + 1 + 4, r     # the loop, the decode pool
  assert r["stalled_ended"] == {"HTTP/1.1 408 Request Timeout": 50}, r
