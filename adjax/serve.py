"""A local inspection page and JSON endpoint over a trained workdir.

    python -m adjax.serve --workdir runs/demo [--port 8080] [--host 127.0.0.1]
                          [--allow-dir DIR ...] [--max-bytes N] [--references DIR]
                          [--timeout S] [--max-connections N] [--allow-remote]

Python's standard `http.server` (a thread per connection, at most
--max-connections of them) with one static page (`adjax/serve_static/`);
every scoring request takes one lock, so concurrent requests are queued,
never interleaved on the device.

Routes:
  GET  /                 the page (and /favicon.svg, /favicon.ico)
  GET  /info             object names (from thresholds.json), scoring modes (and the
                         default one, predict.scoring), limits,
                         and per mode its deployment thresholds (`thresholds`)
  POST /predict?object_name=NAME[&mode=zero_shot|few_shot]
                         body: one image's bytes, or multipart/form-data with one
                         field `image` and `object_name`; answers
                         {"score", "decision", "threshold", "pixel_threshold",
                          "threshold_source", "decided", "mask_png",
                          "heatmap_png", "heatmap_scale", "image_png", ...}: the
                         map as a grayscale PNG (base64) at the image's size,
                         min-max scaled; `map_min`/`map_max` give the values of 0
                         and 255 so a client can try another threshold;
                         `heatmap_scale` the mode's stated colour scale
                         (`heatmaps.scale_for`); `mask_png` the server's mask (map
                         >= pixel threshold, white) as drawn; `image_png` the image
                         that was scored (upright 8-bit RGB PNG, the map's size);
                         without thresholds `decided` is false and `decision`,
                         `mask_png` are null (undecided)
  POST /predict_folder   JSON {"folder", "object_name"[, "mode"]}: every image of a
                         folder under an --allow-dir, each answer as above plus
                         `path` and `relative` (below the folder); files whose
                         real path is outside every --allow-dir are in `refused`,
                         undecodable ones in `unreadable`
  POST /predict_set      multipart/form-data: several `image` fields, `object_name`,
                         `mode`: the images scored in one call ({"results": [...]},
                         each with its `name`): what mode=batch scores together
Scoring modes are the Detector's: zero_shot (the head), few_shot (against
the normal images of --references, read once at start; refused without
them) and batch (the images of one set or folder against each other, at
least 5; not for a single upload).

Only the page's own origin is served: a request whose Host is not this
server's address (or a loopback name), or whose Origin / Referer /
Sec-Fetch-Site says another site sent it, answers 403. Every answer that is
not a 200 is JSON {"error": "..."} and one line on the console.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
import io
import ipaddress
import json
import os
from pathlib import Path
import re
import socket
import sys
import threading
import time
from typing import Callable, Sequence
from urllib.parse import parse_qs, urlsplit

from PIL import Image
import numpy as np

from adjax.common import errors, quiet
from adjax.report import heatmaps
from adjax.workdir import thresholds

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_TIMEOUT = 10.0            # seconds one read may wait
DEFAULT_MAX_CONNECTIONS = 128     # connections served at once (one thread each)
DEFAULT_MAX_IMAGES = 200          # images of one folder or set
_DRAIN_LIMIT = 64 * 1024 * 1024   # a larger refused body is not read: the connection closes
_MAX_PATH = 4096
MAX_PIXELS = 40_000_000           # an image over this is refused before it is decoded
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ROUTES = "GET /, GET /info, POST /predict, POST /predict_folder, POST /predict_set"


class Refusal(Exception):
  """A request answered with an HTTP error status and a one-line JSON message."""

  def __init__(self, status: int, message: str, close: bool = False):
    super().__init__(message)
    self.status = status
    self.close = close


def _png_b64(a: np.ndarray, mode: str) -> str:
  buf = io.BytesIO()
  Image.fromarray(a, mode).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode("ascii")


def heatmap_png(amap: np.ndarray) -> tuple[str, float, float]:
  """float [H, W] map -> (base64 grayscale PNG, min-max scaled; min; max)."""
  lo, hi = float(np.min(amap)), float(np.max(amap))
  scaled = (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)
  gray = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
  return _png_b64(gray, "L"), lo, hi


def decode_image(data: bytes, what: str = "the upload") -> Image.Image:
  """Bytes -> the upright 8-bit RGB image the Detector scores (`data.images.decode`,
  the decode every entry point shares), or a 400 naming `what`."""
  from adjax.data import images as data_images  # deferred: JAX, after the flags are checked
  if not data:
    raise Refusal(400, f"{what} is empty: send the image's bytes (or a multipart "
                  "field 'image')")
  try:
    with Image.open(io.BytesIO(data)) as probe:     # the header only
      w, h = probe.size
    if w * h > MAX_PIXELS:
      raise Refusal(413, f"{what} is {w} x {h} pixels, over the limit of {MAX_PIXELS} "
                    "pixels: scale it down first")
    return data_images.decode(data)
  except Refusal:
    raise
  except Image.UnidentifiedImageError:
    raise Refusal(400, f"{what} is not an image (no image format recognised in its "
                  f"{len(data)} bytes)") from None
  except Exception as e:  # PIL raises many kinds; each means: not a usable image.
    raise Refusal(400, f"{what} is not an image that can be decoded "
                  f"({data_images.describe_error(e)})") from None


def inside(path: str, roots: Sequence[str]) -> bool:
  """Whether the real path `path` is one of `roots` or below one (by path
  components: /data/a_copy is not below /data/a)."""
  for root in roots:
    try:
      if os.path.commonpath([path, root]) == root:
        return True
    except ValueError:            # different drives, or relative against absolute
      continue
  return False


def object_from_references(path: str) -> str:
  """The object a folder of normal references shows, from its name:
  data/bottle/train/good -> bottle (generic split and label names skipped)."""
  generic = {"good", "normal", "ok", "train", "test", "val", "validation", "references",
             "reference", "refs", "images", "img", "imgs", "data", ""}
  for part in reversed(Path(os.path.abspath(path)).parts[1:]):
    if any(c in part for c in "*?["):
      continue
    if part.lower() not in generic:
      return part
  return ""


def check_path_text(value, what: str) -> str:
  """A path typed on the page: a string without NUL or control characters."""
  if not isinstance(value, str) or not value.strip():
    raise Refusal(400, f"{what} is missing: give a folder on the server machine")
  if len(value) > _MAX_PATH:
    raise Refusal(400, f"{what} is {len(value)} characters long (at most {_MAX_PATH})")
  bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
  if bad is not None:
    raise Refusal(400, f"{what} holds the control character {bad!r}: not a path")
  return value.strip()


class App:
  """The Detector behind one lock, the allowed folders and the limits."""

  def __init__(self, detector, *, allow_dirs: Sequence[str | os.PathLike] = (),
               max_bytes: int = DEFAULT_MAX_BYTES, max_images: int = DEFAULT_MAX_IMAGES,
               default_object_name: str = ""):
    self.detector = detector
    self.allow_dirs = [os.path.realpath(os.path.expanduser(os.fspath(d)))
                       for d in allow_dirs]
    self.max_bytes = int(max_bytes)
    self.max_images = int(max_images)
    self.default_object_name = default_object_name
    self.lock = threading.Lock()

  def info(self) -> dict:
    det = self.detector
    names = det.object_names
    default = (self.default_object_name or det.cfg.predict.object_name
               or (names[0] if names else ""))
    return {"object_names": names, "default_object_name": default,
            "modes": list(det.scoring_modes), "default_mode": det.default_scoring,
            "max_bytes": self.max_bytes,
            "max_images": self.max_images,
            "references": len(det.reference_paths),
            "folders_allowed": bool(self.allow_dirs), "image_size": det.image_size,
            "thresholds": self.mode_thresholds()}

  # ---- the decisions the page is given: thresholds per mode ---------------
  def mode_thresholds(self) -> dict:
    """Per scoring mode, its deployment record as the Detector decides with it
    (`Detector.record_for`): the file, its method and top-level thresholds,
    its categories; or None (undecided), or the one-line refusal."""
    out = {}
    for mode in self.detector.scoring_modes:
      try:
        record = self.detector.record_for(mode)
      except thresholds.ThresholdError as e:
        out[mode] = {"error": str(e)}
        continue
      if record is None:
        out[mode] = None
        continue
      path = self.detector.record_paths.get(mode)
      out[mode] = {
          "file": None if path is None else Path(path).name, "method": record["method"],
          "image_threshold": record["image_threshold"],
          "pixel_threshold": record["pixel_threshold"],
          "categories": sorted({n for cats in (record.get("details") or {}).get(
              "per_category", {}).values() for n in cats})}
    return out

  @staticmethod
  def _decision_fields(pred, i: int, mode: str) -> dict:
    """What the page draws as the decision: the server's mask (map >= pixel
    threshold) as a PNG, the colour scale of the mode, and whether it decided."""
    image_t, pixel_t = pred.thresholds[i]
    mask_png = None
    if pred.masks is not None and pred.masks[i] is not None:
      buf = io.BytesIO()
      Image.fromarray(np.asarray(pred.masks[i], np.uint8) * 255, "L").save(buf, format="PNG")
      mask_png = base64.b64encode(buf.getvalue()).decode("ascii")
    return {"decided": image_t is not None, "mask_png": mask_png,
            "mask_pixels": None if mask_png is None else int(np.sum(pred.masks[i])),
            "heatmap_scale": heatmaps.scale_for(mode, pixel_t).as_dict(), "mode": mode}

  def _check(self, object_name, mode) -> tuple[str, str]:
    if mode is not None and not isinstance(mode, str):
      raise Refusal(400, f"mode={mode!r}: expected a string")
    if object_name is not None and not isinstance(object_name, str):
      raise Refusal(400, f"object_name={object_name!r}: expected a string")
    mode = mode or self.detector.default_scoring
    if mode not in self.detector.scoring_modes:
      raise Refusal(400, f"mode={mode!r}: expected one of "
                    f"{', '.join(self.detector.scoring_modes)}")
    if mode == "zero_shot" and (object_name is None or not object_name.strip()):
      raise Refusal(400, "object_name is missing: name the object in the image "
                    "(?object_name=bottle, or the multipart field object_name)")
    if mode == "few_shot" and self.detector.references is None:
      raise Refusal(400, "mode=few_shot needs normal reference images: start the server "
                    "with --references DIR")
    return (object_name or "").strip(), mode

  def _predict(self, images, object_name, mode) -> tuple[object, list[np.ndarray]]:
    """(Prediction, the scored upright RGB of each image, from the same decode)."""
    from adjax.detector import DetectorError  # deferred: JAX, after the flags are checked
    shown: list[np.ndarray] = []
    with self.lock:                    # one request at a time on the device
      try:
        pred = self.detector.predict(images, object_name=object_name, scoring=mode,
                                     each=lambda r: shown.append(r.rgb))
      except (FileNotFoundError, ValueError, DetectorError) as e:
        raise Refusal(400, str(e)) from None
    return pred, shown

  def _answers(self, pred, shown, mode: str = "zero_shot") -> list[dict]:
    out = []
    for i in range(len(pred)):
      png, lo, hi = heatmap_png(pred.maps[i])
      image_t, pixel_t = pred.thresholds[i]
      if shown[i].shape[:2] != pred.maps[i].shape:    # never draw a map on another image
        raise RuntimeError(f"the scored image is {shown[i].shape[:2]}, its map "
                           f"{pred.maps[i].shape}")
      out.append({
          "score": float(pred.scores[i]),
          "decision": None if pred.decisions is None else bool(pred.decisions[i]),
          "threshold": image_t, "pixel_threshold": pixel_t,
          "threshold_source": pred.threshold_source[i],
          "object_name": pred.object_names[i],
          "heatmap_png": png, "map_min": lo, "map_max": hi,
          "image_png": _png_b64(shown[i], "RGB"),
          "height": int(pred.maps[i].shape[0]), "width": int(pred.maps[i].shape[1]),
          **self._decision_fields(pred, i, mode)})
    return out

  def predict_bytes(self, data: bytes, object_name, mode=None) -> dict:
    object_name, mode = self._check(object_name, mode)
    if mode == "batch":
      raise Refusal(400, "mode=batch scores a set of images against each other: send "
                    "at least 5 to /predict_set or score a folder")
    img = decode_image(data)
    start = time.perf_counter()
    pred, shown = self._predict(img, object_name, mode)
    answer = self._answers(pred, shown, mode)[0]
    answer["seconds"] = time.perf_counter() - start
    return answer

  def allowed_folder(self, folder) -> str:
    """The real path of a folder typed on the page, under an --allow-dir."""
    folder = check_path_text(folder, "folder")
    if not self.allow_dirs:
      raise Refusal(403, "folder paths are disabled: start the server with "
                    "--allow-dir DIR to allow folders under DIR")
    try:
      real = os.path.realpath(os.path.expanduser(folder))
    except (OSError, ValueError, RuntimeError) as e:
      raise Refusal(400, f"folder {folder!r} cannot be resolved ({e})") from None
    if not inside(real, self.allow_dirs):
      raise Refusal(403, f"folder {folder!r} is outside the allowed folders "
                    f"({', '.join(self.allow_dirs)}; --allow-dir)")
    if not os.path.isdir(real):
      raise Refusal(400, f"folder {folder!r} does not exist or is not a folder")
    return real

  def predict_folder(self, folder, object_name, mode=None) -> dict:
    from adjax.data import images as data_images  # deferred: JAX, after the flags are checked
    root = self.allowed_folder(folder)
    object_name, mode = self._check(object_name, mode)
    start = time.perf_counter()
    # Every listed file is checked by its real path (a link inside the folder
    # to a file or folder outside is refused, not read), then read by it.
    listed = sorted(data_images._walk_images(root))
    keep, refused = [], []
    for p in listed:
      real = os.path.realpath(p)
      if inside(real, self.allow_dirs):
        keep.append((p, real))
      else:
        refused.append({"path": p, "relative": os.path.relpath(p, root),
                        "reason": "its real path is outside the allowed folders "
                                  "(--allow-dir)"})
    if len(keep) > self.max_images:
      raise Refusal(413, f"folder {folder!r} holds {len(keep)} images; one request "
                    f"scores at most {self.max_images}: choose a folder below it")
    unreadable, readable = [], []
    for p, real in keep:
      try:
        with Image.open(real) as img:
          if img.size[0] * img.size[1] > MAX_PIXELS:
            raise ValueError(f"{img.size[0]} x {img.size[1]} pixels, over the limit of "
                             f"{MAX_PIXELS} pixels")
          img.load()
        readable.append((p, real))
      except Exception as e:  # PIL raises many kinds; every one means unusable.
        unreadable.append({"path": p, "relative": os.path.relpath(p, root),
                           "reason": data_images.describe_error(e)})
    if not readable:
      raise Refusal(400, f"folder {folder!r} holds no image that can be scored "
                    f"({len(refused)} refused, {len(unreadable)} unreadable; images: "
                    f"{', '.join(data_images.IMAGE_EXTENSIONS)})")
    pred, shown = self._predict([real for _, real in readable], object_name, mode)
    answers = self._answers(pred, shown, mode)
    j = 0                                # answers keep the input's order
    for answer, real in zip(answers, pred.paths):
      while readable[j][1] != real:
        j += 1
      answer["path"] = readable[j][0]
      answer["relative"] = os.path.relpath(readable[j][0], root)
      j += 1
    by_real = {real: p for p, real in readable}
    for real, reason in pred.unreadable:   # changed since it was listed
      p = by_real.get(real, real)
      unreadable.append({"path": p, "relative": os.path.relpath(p, root),
                         "reason": reason})
    return {"folder": root, "results": answers, "refused": refused,
            "unreadable": unreadable, "seconds": time.perf_counter() - start}

  def predict_set(self, files: list[tuple[str, bytes]], object_name, mode=None) -> dict:
    """Uploaded (name, bytes) scored in one call (mode=batch: against each other)."""
    object_name, mode = self._check(object_name, mode)
    if not files:
      raise Refusal(400, "no images: send them as multipart fields named 'image'")
    if len(files) > self.max_images:
      raise Refusal(413, f"{len(files)} images in one set; at most {self.max_images}")
    images = [decode_image(data, f"upload {name!r}") for name, data in files]
    start = time.perf_counter()
    pred, shown = self._predict(images, object_name, mode)
    answers = self._answers(pred, shown, mode)
    for answer, (name, _) in zip(answers, files):
      answer["name"] = name
    return {"results": answers, "seconds": time.perf_counter() - start}


def _static(name: str) -> bytes:
  return resources.files("adjax").joinpath("serve_static", name).read_bytes()


# ---------------------------------------------------------------- the connection


class _DeadlineIO(io.RawIOBase):
  """A socket's reads with two bounds: each read waits at most `timeout`
  seconds, and a request must arrive whole before its deadline (a client
  sending one byte now and then cannot hold a thread for long)."""

  def __init__(self, sock: socket.socket, timeout: float, request_time: float):
    self.sock, self.timeout, self.request_time = sock, timeout, request_time
    self.deadline = None
    self.received = 0

  def start_request(self) -> None:
    self.deadline, self.received = None, 0

  def readable(self) -> bool:
    return True

  def readinto(self, buf) -> int:
    now = time.monotonic()
    if self.deadline is None:     # waiting for a request: the read timeout only
      wait = self.timeout
    else:
      wait = min(self.timeout, self.deadline - now)
      if wait <= 0:
        raise TimeoutError("the request took longer than its time limit")
    self.sock.settimeout(wait)
    n = self.sock.recv_into(buf)
    if n and self.deadline is None:
      self.deadline = time.monotonic() + self.request_time
    self.received += n
    return n


class _Writer:
  """Whole writes (sendall), each allowed `timeout` seconds plus one per MB."""

  def __init__(self, sock: socket.socket, timeout: float):
    self.sock, self.timeout = sock, timeout

  def write(self, data: bytes) -> int:
    self.sock.settimeout(self.timeout + len(data) / 1e6)
    self.sock.sendall(data)
    return len(data)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _host_port(value: str) -> tuple[str, int | None] | None:
  """'name:port', '[v6]:port', 'name' -> (lower-case name, port or None)."""
  m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d{1,5}))?|([^:\[\]/@\s]+)(?::(\d{1,5}))?",
                   value.strip())
  if not m:
    return None
  name = (m.group(1) or m.group(3)).lower().rstrip(".")
  port = m.group(2) or m.group(4)
  return name, int(port) if port else None


def make_handler(app: App, *, timeout: float, request_time: float,
                 allowed_hosts: Callable[[], set[str]], log: Callable[[str], None]):

  class Handler(BaseHTTPRequestHandler):
    server_version = "adjax-serve"
    protocol_version = "HTTP/1.1"
    error_content_type = "application/json"

    def setup(self):
      self.connection = self.request
      self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
      self.rio = _DeadlineIO(self.connection, timeout, request_time)
      self.rfile = io.BufferedReader(self.rio, 64 * 1024)
      self.wfile = _Writer(self.connection, timeout)
      self.command, self.path = "", ""

    def finish(self):
      try:
        self.wfile.close()
      except OSError:
        pass
      self.rfile.close()

    # -- logging: one line per refused or failed request, nothing per success
    def log_message(self, fmt, *args):
      if os.environ.get("ADJAX_SERVE_LOG"):
        log(f"{self.client_address[0]} {fmt % args}")

    def log_error(self, fmt, *args):
      pass                                  # every error answer logs itself below

    def _log_refusal(self, status: int, message: str) -> None:
      what = f"{self.command} {self.path[:200]}" if self.command else "(no request line)"
      log(f"{self.client_address[0]} {what} -> {status}: {message}")

    # -- answers
    def _send(self, status: int, body: bytes, content_type: str,
              extra: Sequence[tuple[str, str]] = ()) -> None:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("Cache-Control", "no-store")
      self.send_header("X-Content-Type-Options", "nosniff")
      self.send_header("X-Frame-Options", "DENY")
      self.send_header("Referrer-Policy", "same-origin")
      for key, value in extra:
        self.send_header(key, value)
      if self.close_connection:
        self.send_header("Connection", "close")
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(body)

    def _json(self, status: int, obj, extra=()) -> None:
      self._send(status, json.dumps(obj).encode(), "application/json", extra)

    def _refuse(self, status: int, message: str, close: bool = False, extra=()) -> None:
      if close or status >= 500 or status in (408, 411, 413, 431):
        self.close_connection = True
      self._log_refusal(status, message)
      try:
        self._json(status, {"error": message}, extra)
      except OSError:
        pass                                # the client has gone: logged above

    def send_error(self, code, message=None, explain=None):
      # The standard library's own refusals (bad request line, 414, 431, 501,
      # 505) answer JSON too, never its HTML page.
      self.close_connection = True
      if not str(self.request_version).startswith("HTTP/1"):
        self.request_version = "HTTP/1.1"     # an unparsed line still gets a status line
      text = {414: "the request line is longer than 65536 bytes",
              431: "a header line is too long or there are too many headers"}.get(
                  code, message or explain or "bad request")
      self._refuse(code, text, close=True)

    # -- one request
    def handle_one_request(self):
      self.rio.start_request()
      # What an answer needs before the request line is parsed (a stalled or
      # over-long line is still answered with a status line).
      self.command, self.path, self.requestline = "", "", ""
      self.request_version = "HTTP/1.1"
      try:
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
          self.send_error(414)
          return
        if not self.raw_requestline:
          self.close_connection = True
          return
        if not self.parse_request():        # answers its own (JSON) error
          return
        self._dispatch()
        self.wfile.flush()
      except TimeoutError:
        self.close_connection = True
        if self.rio.received:               # a request began and stalled
          self._refuse(408, f"the request did not arrive within its time limit "
                       f"({timeout:g} s per read, {request_time:g} s in all)", close=True)
      except (ConnectionError, BrokenPipeError) as e:
        self.close_connection = True
        log(f"{self.client_address[0]} {self.command} {self.path[:200]}: the client "
            f"disconnected ({type(e).__name__})")

    def _dispatch(self):
      url = urlsplit(self.path)
      try:
        self._check_origin()
        if self.command in ("GET", "HEAD"):
          self._get(url)
        elif self.command == "POST":
          self._post(url)
        else:
          self.close_connection = True
          raise Refusal(405, f"method {self.command} is not served; the routes are {ROUTES}")
      except Refusal as e:
        extra = [("Allow", "GET, HEAD, POST")] if e.status == 405 else []
        self._refuse(e.status, str(e), close=e.close, extra=extra)
      except TimeoutError:
        raise
      except (ConnectionError, BrokenPipeError):
        raise
      except Exception as e:  # a bug: say so in one line and keep serving
        where = ""
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
          tb = tb.tb_next
        if tb is not None:
          where = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
        self._refuse(500, f"internal error: {type(e).__name__}: {e}{where}", close=True)

    def _check_origin(self):
      """403 unless the request names this server (Host) and, when a browser
      says where it comes from (Origin, Referer, Sec-Fetch-Site), comes from
      this server's own page."""
      hosts = allowed_hosts()
      port = self.server.server_address[1]
      host = self.headers.get("Host")
      if host is None:
        raise Refusal(400, "the Host header is missing", close=True)
      parsed = _host_port(host)
      if parsed is None or parsed[0] not in hosts or (parsed[1] or 80) != port:
        raise Refusal(403, f"Host {host[:100]!r} is not this server's address (it answers "
                      f"{', '.join(sorted(hosts))} on port {port}); a page of another "
                      "site cannot use it", close=True)
      site = self.headers.get("Sec-Fetch-Site")
      if site is not None and site not in ("same-origin", "none"):
        raise Refusal(403, f"Sec-Fetch-Site {site[:40]!r}: requests from another site's "
                      "page are refused", close=True)
      for header in ("Origin", "Referer"):
        value = self.headers.get(header)
        if value is None:
          continue
        u = urlsplit(value)
        parsed = _host_port(u.netloc) if u.scheme == "http" else None
        if (parsed is None or parsed[0] not in hosts or (parsed[1] or 80) != port):
          raise Refusal(403, f"{header} {value[:100]!r} is another origin: only this "
                        "server's own page may send requests", close=True)
        break                             # Origin, when given, decides

    def _get(self, url):
      if url.path in ("/", "/index.html"):
        self._send(200, _static("index.html"), "text/html; charset=utf-8",
                   [("Content-Security-Policy",
                     "default-src 'self'; img-src 'self' data: blob:; "
                     "script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                     "connect-src 'self'; frame-ancestors 'none'")])
      elif url.path in ("/favicon.svg", "/favicon.ico"):
        self._send(200, _static("favicon.svg"), "image/svg+xml")
      elif url.path == "/info":
        self._json(200, app.info())
      else:
        raise Refusal(404, f"unknown route {self.command} {url.path[:200]}; the routes "
                      f"are {ROUTES}")

    def _body(self) -> bytes:
      if self.headers.get("Transfer-Encoding") is not None:
        raise Refusal(411, "Transfer-Encoding is not accepted: send the body with a "
                      "Content-Length", close=True)
      lengths = self.headers.get_all("Content-Length") or []
      if not lengths:
        raise Refusal(411, "Content-Length is missing: send the image as the request "
                      "body, with its length", close=True)
      length = lengths[0]
      if len(lengths) > 1 or not re.fullmatch(r"[0-9]{1,19}", length.strip()):
        raise Refusal(400, f"Content-Length {', '.join(lengths)[:60]!r} is not one "
                      "non-negative number", close=True)
      n = int(length)
      if n > app.max_bytes:                 # exactly max_bytes is accepted
        if n <= _DRAIN_LIMIT:               # read it, so the client sees the answer
          self._read(n, keep=False)
        raise Refusal(413, f"the upload is {n} bytes, over the limit of {app.max_bytes} "
                      "bytes (--max-bytes)", close=True)
      return self._read(n)

    def _read(self, n: int, keep: bool = True) -> bytes:
      chunks, left = [], n
      while left > 0:
        chunk = self.rfile.read(min(left, 1 << 20))
        if not chunk:
          raise Refusal(400, f"the body ended after {n - left} of the {n} bytes its "
                        "Content-Length announced", close=True)
        left -= len(chunk)
        if keep:
          chunks.append(chunk)
      return b"".join(chunks)

    def _post(self, url):
      query = {k: v[-1] for k, v in parse_qs(url.query).items()}
      if url.path not in ("/predict", "/predict_folder", "/predict_set"):
        raise Refusal(404, f"unknown route POST {url.path[:200]}; the routes are {ROUTES}",
                      close=True)           # its body is not read
      ctype = self.headers.get("Content-Type", "")
      kind = ctype.split(";")[0].strip().lower()
      if url.path == "/predict_folder" and kind != "application/json":
        raise Refusal(415, f"/predict_folder takes a JSON body (Content-Type: "
                      f"application/json), not {ctype[:60]!r}", close=True)
      if url.path == "/predict_set" and kind != "multipart/form-data":
        raise Refusal(415, "/predict_set takes multipart/form-data with several "
                      "'image' fields", close=True)
      if url.path == "/predict" and kind.startswith("text/"):
        raise Refusal(415, f"/predict takes an image's bytes or multipart/form-data, "
                      f"not {ctype[:60]!r}", close=True)
      body = self._body()
      if url.path == "/predict":
        data, name, mode = body, query.get("object_name"), query.get("mode")
        if kind == "multipart/form-data":
          parts = _multipart_parts(ctype, body)
          images = [d for n, _, d in parts if n == "image"]
          if len(images) > 1:
            raise Refusal(400, f"/predict scores one image; this body holds {len(images)} "
                          "'image' fields: send them to /predict_set (scored together "
                          "in one call) or one per request")
          fields = {n: d for n, _, d in parts}
          data = images[0] if images else b""
          name = fields.get("object_name", b"").decode("utf-8", "replace") or name
          mode = fields.get("mode", b"").decode("utf-8", "replace") or mode
        self._json(200, app.predict_bytes(data, name, mode))
      elif url.path == "/predict_set":
        parts = _multipart_parts(ctype, body)
        fields = {n: d for n, _, d in parts}
        files = [(f or f"image {i}", d) for i, (n, f, d) in enumerate(parts) if n == "image"]
        self._json(200, app.predict_set(
            files, fields.get("object_name", b"").decode("utf-8", "replace")
            or query.get("object_name"),
            fields.get("mode", b"").decode("utf-8", "replace") or query.get("mode")))
      else:
        try:
          req = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          raise Refusal(400, f"the body is not JSON ({e}); send "
                        '{"folder": ..., "object_name": ...}') from None
        if not isinstance(req, dict):
          raise Refusal(400, 'expected a JSON object {"folder": ..., "object_name": ...}')
        self._json(200, app.predict_folder(req.get("folder"), req.get("object_name"),
                                           req.get("mode")))

  return Handler


def _multipart_parts(content_type: str, body: bytes) -> list[tuple[str, str, bytes]]:
  """multipart/form-data -> [(field name, file name or "", bytes)] in order (the
  standard library's email parser)."""
  try:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
  except Exception as e:  # the parser's many kinds: each means a broken body
    raise Refusal(400, f"multipart body could not be parsed ({type(e).__name__})") from None
  if not msg.is_multipart():
    raise Refusal(400, "multipart body could not be parsed (missing boundary?)")
  out = []
  for part in msg.iter_parts():
    name = part.get_param("name", header="content-disposition")
    if name:
      out.append((str(name), part.get_filename() or "", part.get_payload(decode=True) or b""))
  return out


# ---------------------------------------------------------------- the server


class Server(ThreadingHTTPServer):
  """Threads bounded by a semaphore: with `max_connections` open, a new one
  waits up to a second for a free slot (the rest wait in the listen backlog),
  then is answered 503 and closed, so stalled clients cannot exhaust threads."""

  daemon_threads = True
  request_queue_size = 128

  def __init__(self, address, handler_factory, *, max_connections: int,
               log: Callable[[str], None], bind: bool = True):
    self.slots = threading.BoundedSemaphore(max_connections)
    self.max_connections = max_connections
    self.log = log
    self.app: App | None = None
    super().__init__(address, handler_factory, bind_and_activate=bind)

  def process_request(self, request, client_address):
    if not self.slots.acquire(timeout=1.0):
      body = json.dumps({"error": f"the server is busy ({self.max_connections} "
                         "connections open; --max-connections): try again"}).encode()
      try:
        request.settimeout(1.0)
        request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                        b"application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        request.shutdown(socket.SHUT_WR)
        request.setblocking(False)      # what the client sent already: read, so
        request.recv(1 << 16)           # closing does not reset the answer away
      except OSError:
        pass
      self.log(f"{client_address[0]} -> 503: {self.max_connections} connections open")
      self.shutdown_request(request)
      return
    try:
      super().process_request(request, client_address)
    except BaseException:
      self.slots.release()
      raise

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self.slots.release()

  def handle_error(self, request, client_address):
    e = sys.exc_info()[1]
    self.log(f"{client_address[0]}: connection ended by {type(e).__name__}: {e}")


def _stderr_line(line: str) -> None:
  print(time.strftime("%H:%M:%S ") + line, file=sys.stderr, flush=True)


def is_loopback(host: str) -> bool:
  """Whether every address `host` resolves to is a loopback address."""
  try:
    infos = socket.getaddrinfo(host, None)
  except (socket.gaierror, UnicodeError):
    return False
  return bool(infos) and all(
      ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def host_names(host: str, extra: Sequence[str] = ()) -> set[str]:
  """Host header names this server answers: loopback names, the bound
  address, and for a wildcard address this machine's names and addresses."""
  names = set(LOOPBACK_NAMES) | {h.lower().strip("[]") for h in extra}
  names.add(host.lower().strip("[]"))
  if host in ("", "0.0.0.0", "::"):
    for name in {socket.gethostname(), socket.getfqdn()}:
      names.add(name.lower())
      try:
        names |= {info[4][0].split("%")[0] for info in socket.getaddrinfo(name, None)}
      except (socket.gaierror, UnicodeError):
        pass
  names.discard("")
  return names


def make_server(detector, host: str = "127.0.0.1", port: int = 8080, *,
                allow_dirs: Sequence[str] = (), max_bytes: int = DEFAULT_MAX_BYTES,
                timeout: float = DEFAULT_TIMEOUT, request_time: float | None = None,
                max_connections: int = DEFAULT_MAX_CONNECTIONS,
                max_images: int = DEFAULT_MAX_IMAGES, allow_hosts: Sequence[str] = (),
                default_object_name: str = "",
                log: Callable[[str], None] = _stderr_line) -> Server:
  """The server, bound (not started: call serve_forever); port 0 picks a free
  port. `detector` may be set later (`server.app.detector`), so the address is
  checked before a model loads."""
  app = App(detector, allow_dirs=allow_dirs, max_bytes=max_bytes, max_images=max_images,
            default_object_name=default_object_name)
  hosts: set[str] = set()
  handler = make_handler(app, timeout=timeout,
                         request_time=request_time or 6 * timeout,
                         allowed_hosts=lambda: hosts, log=log)
  family = socket.AF_INET6 if ":" in host else socket.AF_INET

  class Bound(Server):
    address_family = family

  server = Bound((host, port), handler, max_connections=max_connections, log=log)
  server.app = app
  hosts |= host_names(host, allow_hosts)
  return server


# ---------------------------------------------------------------- the command


def _port(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
  if not 0 <= value <= 65535:
    raise argparse.ArgumentTypeError(f"{value} is not a port number (0 to 65535; 0 "
                                     "picks a free one)")
  return value


def _positive(kind):
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value:
      raise argparse.ArgumentTypeError(f"{text}: expected a positive number")
    return value
  return parse


class _Parser(argparse.ArgumentParser):
  def error(self, message):             # one line, exit 2, no usage block
    self.exit(2, f"error: {message}\n")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m adjax.serve", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a trained or imported workdir")
  p.add_argument("--port", type=_port, default=8080, help="0 to 65535 (0: a free port)")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to bind (default 127.0.0.1: this machine only; any other "
                      "needs --allow-remote)")
  p.add_argument("--allow-remote", action="store_true",
                 help="allow a --host that other machines can reach: anyone who reaches "
                      "it can score images and read every image under --allow-dir")
  p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                 help="another name the page is reached by (a Host header to accept; "
                      "repeatable)")
  p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                 help="allow scoring folders under DIR typed on the page (repeatable; "
                      "default: none)")
  p.add_argument("--max-bytes", type=_positive(int), default=DEFAULT_MAX_BYTES,
                 help=f"largest request body accepted (default {DEFAULT_MAX_BYTES})")
  p.add_argument("--max-images", type=_positive(int), default=DEFAULT_MAX_IMAGES,
                 help=f"most images of one folder or set (default {DEFAULT_MAX_IMAGES})")
  p.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT,
                 help=f"seconds one read of a request may wait (default {DEFAULT_TIMEOUT:g}; "
                      "a whole request gets 6 times this)")
  p.add_argument("--max-connections", type=_positive(int), default=DEFAULT_MAX_CONNECTIONS,
                 help="connections served at once, one thread each (default "
                      f"{DEFAULT_MAX_CONNECTIONS}); more are answered 503")
  p.add_argument("--references", metavar="DIR", default="",
                 help="normal images of the object for mode few_shot (read once at start)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set predict.batch_size=1")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)

  def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return errors.EXIT_USER_ERROR

  # Everything known up front is checked before the model loads.
  for d in args.allow_dir:
    if "\0" in d or not Path(d).expanduser().is_dir():
      return fail(f"--allow-dir {d}: no such folder")
  if args.references and not any(c in args.references for c in "*?[") and not (
      "\0" not in args.references and Path(args.references).expanduser().exists()):
    return fail(f"--references {args.references}: no such file or folder")
  if not os.path.isdir(args.workdir):
    return fail(f"--workdir {args.workdir}: no such folder")
  overrides = {}
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      return fail(f"--set {item!r}: expected key=value")
    overrides[key] = value
  try:
    socket.getaddrinfo(args.host, None)
  except (socket.gaierror, UnicodeError) as e:
    return fail(f"--host {args.host}: not an address of this machine ({e})")
  loopback = is_loopback(args.host)
  if not loopback and not args.allow_remote:
    return fail(f"--host {args.host} is reachable from other machines: anyone who can "
                "reach it could score images and read every image under --allow-dir; "
                "add --allow-remote to bind it anyway (default 127.0.0.1)")
  try:
    server = make_server(None, args.host, args.port, allow_dirs=args.allow_dir,
                         max_bytes=args.max_bytes, timeout=args.timeout,
                         max_connections=args.max_connections, max_images=args.max_images,
                         allow_hosts=args.allow_host,
                         default_object_name=(object_from_references(args.references)
                                              if args.references else ""))
  except OSError as e:              # the port is taken, the host cannot be bound
    return fail(f"--host {args.host} --port {args.port}: {e.strerror or e}")
  if not loopback:
    print(f"warning: --host {args.host} --allow-remote: anyone who can reach port "
          f"{server.server_address[1]} of this machine can score images"
          + (f" and read every image under {', '.join(args.allow_dir)}"
             if args.allow_dir else "") + "; there is no login and no TLS",
          file=sys.stderr, flush=True)

  def serve():
    from adjax.detector import Detector, DetectorError  # deferred: JAX, after the flags are checked
    with quiet.announce_if_slow(f"loading {args.workdir} (towers and head; the page "
                                "answers once they are in memory)"):
      detector = Detector.from_workdir(args.workdir, **overrides)
    if args.references:
      try:
        with quiet.announce_if_slow(
            f"few_shot: building the memory bank from {args.references}"):
          count = detector.references_from(args.references)
      except (FileNotFoundError, DetectorError) as e:
        raise DetectorError(f"--references {args.references}: {e}") from None
      print(f"few_shot: {count} reference images from {args.references}", flush=True)
    server.app.detector = detector
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {args.workdir} on http://{shown}:{port}/ (Ctrl-C stops)", flush=True)
    try:
      server.serve_forever()
    except KeyboardInterrupt:
      pass

  try:
    code, _ = errors.run_command(serve)
  finally:
    server.server_close()
  return code


if __name__ == "__main__":
  sys.exit(main())
