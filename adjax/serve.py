"""A local inspection page and JSON endpoint over a trained workdir.

    python -m adjax.serve --workdir runs/demo [--port 8080] [--host 127.0.0.1]
                          [--allow-dir DIR ...] [--max-bytes N] [--references DIR]

Python's standard `http.server` (threads) with one static page
(`adjax/serve_static/index.html`); every scoring request takes one lock, so
concurrent requests are queued, never interleaved on the device.

Routes:
  GET  /                 the page
  GET  /info             object names (from thresholds.json), scoring modes, limits,
                         and per mode its deployment thresholds (`thresholds`)
  POST /predict?object_name=NAME[&mode=zero_shot|few_shot]
                         body: the image's bytes, or multipart/form-data with the
                         fields `image` and `object_name`; answers
                         {"score", "decision", "threshold", "pixel_threshold",
                          "threshold_source", "decided", "mask_png",
                          "heatmap_png", "heatmap_scale", ...}: the map as a
                         grayscale PNG (base64) at the image's size, min-max
                         scaled; `map_min`/`map_max` give the values of 0 and 255
                         so a client can try another threshold; `heatmap_scale`
                         the mode's stated colour scale (`heatmaps.scale_for`);
                         `mask_png` the server's mask (map >= pixel threshold,
                         white) as drawn; without thresholds `decided` is false
                         and `decision`, `mask_png` are null (undecided)
  POST /predict_folder   JSON {"folder", "object_name"[, "mode"]}: every image of a
                         folder under an --allow-dir, each answer as above plus
                         `path` and the image itself (`image_b64`, `image_type`)
  POST /predict_set      multipart/form-data: several `image` fields, `object_name`,
                         `mode`: the images scored in one call ({"results": [...]},
                         each with its `name`): what mode=batch scores together
Scoring modes are the Detector's: zero_shot (the head), few_shot (against
the normal images of --references, read once at start; refused without
them) and batch (the images of one set or folder against each other, at
least 5; not for a single upload).
Refusals answer {"error": "..."}: 400 (not an image, no object name, bad mode or
request), 403 (folder outside --allow-dir), 404 (unknown route), 413 (too large).
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import io
import json
import mimetypes
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
_DRAIN_LIMIT = 256 * 1024 * 1024     # larger bodies are not read, the connection is closed


class Refusal(Exception):
  """A request answered with an HTTP error status and a one-line JSON message."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def heatmap_png(amap: np.ndarray) -> tuple[str, float, float]:
  """float [H, W] map -> (base64 grayscale PNG, min-max scaled; min; max)."""
  lo, hi = float(np.min(amap)), float(np.max(amap))
  scaled = (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)
  gray = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(gray, "L").save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode("ascii"), lo, hi


def decode_image(data: bytes, what: str = "the upload") -> Image.Image:
  if not data:
    raise Refusal(400, f"{what} is empty: send the image's bytes (or a multipart "
                  "field 'image')")
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Image.UnidentifiedImageError:
    raise Refusal(400, f"{what} is not an image (no image format recognised in its "
                  f"{len(data)} bytes)") from None
  except Exception as e:  # PIL raises many kinds; each means: not a usable image.
    raise Refusal(400, f"{what} is not an image that can be decoded "
                  f"({type(e).__name__}: {e})") from None
  return img


class App:
  """The Detector behind one lock, the allowed folders and the size limit."""

  def __init__(self, detector, *, allow_dirs: Sequence[str | os.PathLike] = (),
               max_bytes: int = DEFAULT_MAX_BYTES):
    self.detector = detector
    self.allow_dirs = [Path(d).expanduser().resolve() for d in allow_dirs]
    self.max_bytes = int(max_bytes)
    self.lock = threading.Lock()

  def info(self) -> dict:
    det = self.detector
    return {"object_names": det.object_names,
            "default_object_name": det.cfg.predict.object_name,
            "modes": list(det.scoring_modes), "max_bytes": self.max_bytes,
            "references": len(det.reference_paths),
            "folders_allowed": bool(self.allow_dirs), "image_size": det.image_size,
            "thresholds": self.mode_thresholds()}

  # ---- the decisions the page is given: thresholds per mode ---------------
  def mode_thresholds(self) -> dict:
    """Per scoring mode, its deployment record as the Detector decides with it
    (`Detector.record_for`): the file, its method and top-level thresholds,
    its categories; or None (undecided), or the one-line refusal."""
    from adjax import thresholds
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
    from adjax.report import heatmaps
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
    mode = mode or self.detector.scoring_modes[0]
    if mode not in self.detector.scoring_modes:
      raise Refusal(400, f"mode={mode!r}: expected one of "
                    f"{', '.join(self.detector.scoring_modes)}")
    if mode == "zero_shot" and (object_name is None or not str(object_name).strip()):
      raise Refusal(400, "object_name is missing: name the object in the image "
                    "(?object_name=bottle, or the multipart field object_name)")
    if mode == "few_shot" and self.detector.references is None:
      raise Refusal(400, "mode=few_shot needs normal reference images: start the server "
                    "with --references DIR")
    return str(object_name or "").strip(), mode

  def _predict(self, images, object_name, mode):
    with self.lock:                    # one request at a time on the device
      try:
        return self.detector.predict(images, object_name=object_name, scoring=mode)
      except (FileNotFoundError, ValueError) as e:
        raise Refusal(400, str(e)) from None

  def _answers(self, pred, mode: str = "zero_shot") -> list[dict]:
    out = []
    for i in range(len(pred)):
      png, lo, hi = heatmap_png(pred.maps[i])
      image_t, pixel_t = pred.thresholds[i]
      out.append({
          "score": float(pred.scores[i]),
          "decision": None if pred.decisions is None else bool(pred.decisions[i]),
          "threshold": image_t, "pixel_threshold": pixel_t,
          "threshold_source": pred.threshold_source[i],
          "object_name": pred.object_names[i],
          "heatmap_png": png, "map_min": lo, "map_max": hi,
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
    pred = self._predict(img, object_name, mode)
    answer = self._answers(pred, mode)[0]
    answer["seconds"] = time.perf_counter() - start
    return answer

  def allowed_folder(self, folder) -> Path:
    if not folder or not str(folder).strip():
      raise Refusal(400, "folder is missing: give a folder on this machine")
    if not self.allow_dirs:
      raise Refusal(403, "folder paths are disabled: start the server with "
                    "--allow-dir DIR to allow folders under DIR")
    path = Path(str(folder)).expanduser().resolve()
    if not any(path == d or d in path.parents for d in self.allow_dirs):
      raise Refusal(403, f"folder {folder!r} is outside the allowed folders "
                    f"({', '.join(map(str, self.allow_dirs))}; --allow-dir)")
    if not path.is_dir():
      raise Refusal(400, f"folder {folder!r} does not exist or is not a folder")
    return path

  def predict_folder(self, folder, object_name, mode=None) -> dict:
    path = self.allowed_folder(folder)
    object_name, mode = self._check(object_name, mode)
    start = time.perf_counter()
    pred = self._predict(str(path), object_name, mode)
    answers = self._answers(pred, mode)
    for answer, p in zip(answers, pred.paths):
      answer["path"] = p
      answer["image_type"] = mimetypes.guess_type(p)[0] or "application/octet-stream"
      with Image.open(p) as img:     # browsers show PNG; any input format works here
        rgb = img.convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
      answer["image_type"] = "image/png"
      answer["image_b64"] = base64.b64encode(buf.getvalue()).decode("ascii")
    return {"results": answers, "unreadable": [list(u) for u in pred.unreadable],
            "seconds": time.perf_counter() - start}


  def predict_set(self, files: list[tuple[str, bytes]], object_name, mode=None) -> dict:
    """Uploaded (name, bytes) scored in one call (mode=batch: against each other)."""
    object_name, mode = self._check(object_name, mode)
    if not files:
      raise Refusal(400, "no images: send them as multipart fields named 'image'")
    images = [decode_image(data, f"upload {name!r}") for name, data in files]
    start = time.perf_counter()
    pred = self._predict(images, object_name, mode)
    answers = self._answers(pred, mode)
    for answer, (name, _) in zip(answers, files):
      answer["name"] = name
    return {"results": answers, "seconds": time.perf_counter() - start}


def _static(name: str) -> bytes:
  return resources.files("adjax").joinpath("serve_static", name).read_bytes()


def make_handler(app: App):

  class Handler(BaseHTTPRequestHandler):
    server_version = "adjax-serve"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):   # quiet: one line per request on stderr
      if os.environ.get("ADJAX_SERVE_LOG"):
        super().log_message(fmt, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("Cache-Control", "no-store")
      if self.close_connection:
        self.send_header("Connection", "close")
      self.end_headers()
      self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
      self._send(status, json.dumps(obj).encode(), "application/json")

    def _body(self) -> bytes:
      length = self.headers.get("Content-Length")
      if length is None:
        self.close_connection = True
        raise Refusal(411, "Content-Length is missing: send the image as the request body")
      try:
        n = int(length)
      except ValueError:
        self.close_connection = True
        raise Refusal(400, f"Content-Length {length!r} is not a number") from None
      if n > app.max_bytes:
        if n <= _DRAIN_LIMIT:            # read it, so the client sees the answer
          left = n
          while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
              break
            left -= len(chunk)
        else:
          self.close_connection = True
        raise Refusal(413, f"the upload is {n} bytes, over the limit of {app.max_bytes} "
                      "bytes (--max-bytes)")
      return self.rfile.read(n)

    def do_GET(self):
      url = urlsplit(self.path)
      try:
        if url.path in ("/", "/index.html"):
          self._send(200, _static("index.html"), "text/html; charset=utf-8")
        elif url.path == "/info":
          self._json(200, app.info())
        else:
          raise Refusal(404, f"unknown route GET {url.path}; the routes are GET /, "
                        "GET /info, POST /predict, POST /predict_folder")
      except Refusal as e:
        self._json(e.status, {"error": str(e)})

    def do_POST(self):
      url = urlsplit(self.path)
      query = {k: v[-1] for k, v in parse_qs(url.query).items()}
      try:
        if url.path not in ("/predict", "/predict_folder", "/predict_set"):
          self.close_connection = True     # its body is not read
          raise Refusal(404, f"unknown route POST {url.path}; the routes are "
                        "POST /predict, POST /predict_folder and POST /predict_set")
        body = self._body()
        ctype = self.headers.get("Content-Type", "")
        if url.path == "/predict":
          data, name, mode = body, query.get("object_name"), query.get("mode")
          if ctype.startswith("multipart/form-data"):
            fields = _multipart(ctype, body)
            data = fields.get("image", b"")
            name = fields.get("object_name", b"").decode("utf-8", "replace") or name
            mode = fields.get("mode", b"").decode("utf-8", "replace") or mode
          self._json(200, app.predict_bytes(data, name, mode))
        elif url.path == "/predict_set":
          if not ctype.startswith("multipart/form-data"):
            raise Refusal(400, "/predict_set takes multipart/form-data with several "
                          "'image' fields")
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
          except json.JSONDecodeError as e:
            raise Refusal(400, f"the body is not JSON ({e}); send "
                          '{"folder": ..., "object_name": ...}') from None
          if not isinstance(req, dict):
            raise Refusal(400, 'expected a JSON object {"folder": ..., "object_name": ...}')
          self._json(200, app.predict_folder(req.get("folder"), req.get("object_name"),
                                             req.get("mode")))
      except Refusal as e:
        self._json(e.status, {"error": str(e)})
      except Exception as e:  # a bug: say so in the answer and keep serving
        self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})
        raise

  return Handler


def _multipart_parts(content_type: str, body: bytes) -> list[tuple[str, str, bytes]]:
  """multipart/form-data -> [(field name, file name or "", bytes)] in order (the
  standard library's email parser)."""
  msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
      b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
  if not msg.is_multipart():
    raise Refusal(400, "multipart body could not be parsed (missing boundary?)")
  out = []
  for part in msg.iter_parts():
    name = part.get_param("name", header="content-disposition")
    if name:
      out.append((name, part.get_filename() or "", part.get_payload(decode=True) or b""))
  return out


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
  """multipart/form-data -> {field name: bytes} (the last of a repeated field)."""
  return {name: data for name, _, data in _multipart_parts(content_type, body)}


def make_server(detector, host: str = "127.0.0.1", port: int = 8080, *,
                allow_dirs: Sequence[str] = (), max_bytes: int = DEFAULT_MAX_BYTES
                ) -> ThreadingHTTPServer:
  """The server (not started: call serve_forever); port 0 picks a free port."""
  server = ThreadingHTTPServer((host, port), make_handler(
      App(detector, allow_dirs=allow_dirs, max_bytes=max_bytes)))
  server.daemon_threads = True
  return server


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m adjax.serve", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a trained or imported workdir")
  p.add_argument("--port", type=int, default=8080)
  p.add_argument("--host", default="127.0.0.1",
                 help="address to bind (default 127.0.0.1: this machine only)")
  p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                 help="allow scoring folders under DIR typed on the page (repeatable; "
                      "default: none)")
  p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                 help=f"largest upload accepted (default {DEFAULT_MAX_BYTES})")
  p.add_argument("--references", metavar="DIR", default="",
                 help="normal images of the object for mode few_shot (read once at start)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set predict.batch_size=1")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from adjax.common import errors

  def serve():
    from adjax.config.load import RunConfigError
    from adjax.detector import Detector, DetectorError
    for d in args.allow_dir:
      if not Path(d).expanduser().is_dir():
        raise DetectorError(f"--allow-dir {d}: no such folder")
    if args.max_bytes < 1:
      raise DetectorError(f"--max-bytes {args.max_bytes}: expected a positive number")
    overrides = {}
    for item in args.set:
      key, sep, value = item.partition("=")
      if not sep:
        raise RunConfigError(f"--set {item!r}: expected key=value")
      overrides[key] = value
    detector = Detector.from_workdir(args.workdir, **overrides)
    if args.references:
      try:
        count = detector.use_references(args.references)
      except FileNotFoundError as e:
        raise DetectorError(f"--references {args.references}: {e}") from None
      except DetectorError as e:
        raise DetectorError(f"--references {args.references}: {e}") from None
      print(f"few_shot: {count} reference images from {args.references}", flush=True)
    server = make_server(detector, args.host, args.port, allow_dirs=args.allow_dir,
                         max_bytes=args.max_bytes)
    host, port = server.server_address[:2]
    print(f"serving {args.workdir} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
      server.serve_forever()
    except KeyboardInterrupt:
      pass
    finally:
      server.server_close()

  try:
    code, _ = errors.run_command(serve)
  except OSError as e:              # the port is taken, the host cannot be bound
    print(f"error: --host {args.host} --port {args.port}: {e.strerror or e}",
          file=sys.stderr, flush=True)
    code = errors.EXIT_USER_ERROR
  return code


if __name__ == "__main__":
  sys.exit(main())
