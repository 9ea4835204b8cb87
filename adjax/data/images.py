"""Image decoding and preprocessing, and the reader for a folder of images.

Preprocessing follows the release exactly: PIL decode, RGB, PIL bilinear
resize to S x S (PIL antialiases when shrinking), kept as uint8 RGB; the
model scales to [0, 1] and applies its backbone's mean/std. Masks get the
same PIL bilinear resize, scaled to [0, 1], then a
threshold. Everything here works on encoded bytes or files, with PIL only, so
it runs inside grain worker processes without JAX.

The prediction reader accepts what users actually have: any size, grayscale,
palette, RGBA, 16-bit; files that cannot be decoded are reported, never
silently dropped.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import glob
import io
import os
import re
from typing import Iterator, Sequence

from PIL import Image, ImageOps
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: str | os.PathLike) -> bool:
  name = os.path.basename(os.fspath(path))
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def open_image(data: bytes | str | os.PathLike) -> Image.Image:
  """Opens and fully decodes an image (raises on truncated or unknown data)."""
  f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
  img = Image.open(f)
  img.load()
  return img


def upright(img: Image.Image) -> Image.Image:
  """The image as it is meant to be seen: its EXIF orientation applied (a
  portrait photo stored landscape with an orientation tag comes out
  portrait). Returns `img` itself when there is nothing to turn."""
  try:
    orientation = img.getexif().get(0x0112, 1)
  except Exception:   # a broken EXIF block: the pixels as stored
    return img
  if orientation in (None, 1):
    return img
  turned = ImageOps.exif_transpose(img)
  return img if turned is None else turned


def pixel_problem(img: Image.Image) -> str:
  """Why a decoded image cannot be scored ("" when it can): no pixels
  (0 x 0), or float pixels that are NaN or infinite (a mode-F TIFF or
  array), which no conversion to 8 bits can rank. Checked on every entry
  point's decode, after it and before any scoring."""
  w, h = img.size
  if w < 1 or h < 1:
    return f"the image has no pixels ({w} x {h})"
  if img.mode == "F":
    a = np.asarray(img)
    bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    if bad:
      return (f"{bad} of its {a.size} pixels are NaN or infinite (float image); "
              "expected finite values")
  return ""


def decode(src: "bytes | str | os.PathLike | Image.Image") -> Image.Image:
  """The one decode every entry point shares: a file's path, its bytes or an
  opened PIL image -> the upright 8-bit RGB image that is scored and shown.

  Fully decoded (truncated or unknown data raises), EXIF orientation applied
  (`upright`), 16-bit and float images rescaled from their range (`to_rgb`);
  an image without pixels or with NaN/infinite float pixels raises ValueError
  (`pixel_problem`).
  The prediction reader, `Detector.predict` (paths and PIL images alike) and
  the inspection server all call it, so what a page draws is the image the
  map belongs to.
  """
  if isinstance(src, Image.Image):
    src.load()
    _refuse_pixel_problem(src)
    return to_rgb(upright(src))
  with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as img:
    img.load()
    _refuse_pixel_problem(img)
    out = to_rgb(upright(img))
    return img.copy() if out is img else out   # nothing tied to the closed file


def _refuse_pixel_problem(img: Image.Image) -> None:
  problem = pixel_problem(img)
  if problem:
    raise ValueError(problem)


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts any PIL mode to 8-bit RGB.

  PIL's own `convert("RGB")` clips 16-bit and 32-bit integer images at 255
  (a 16-bit photo comes out nearly white), so those are rescaled from their
  full range first. RGBA and LA drop alpha, as the release's `convert("RGB")`.
  """
  if img.mode == "RGB":
    return img
  if img.mode.startswith("I;16") or img.mode in ("I", "F"):
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
      hi = 1.0 if a.size and a.max() <= 1.0 else 255.0
    elif img.mode.startswith("I;16"):
      hi = 65535.0
    else:  # 32-bit "I": 16-bit PNGs open as "I" in some PIL versions.
      hi = 65535.0 if a.size and a.max() > 255 else 255.0
    a = np.clip(np.rint(a / hi * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(a, "L")
  return img.convert("RGB")


def preprocess_image(img: Image.Image, size: int) -> np.ndarray:
  """RGB, PIL bilinear resize to size x size: uint8 [size, size, 3].

  Scaling to [0, 1] and the backbone's mean/std are applied on the device by
  the model (`ADModel.normalize`), with the backbone's own statistics; the
  pipeline moves a quarter of the bytes a float32 image would take.
  """
  img = to_rgb(img)
  if img.size != (size, size):
    img = img.resize((size, size), Image.BILINEAR)
  return np.asarray(img, np.uint8)


def mask_to_l(img: Image.Image) -> Image.Image:
  """A mask as a single 8-bit channel, values kept as the release reads them.

  `convert("L")` is what the release does for 8-bit masks (0/255 MVTec masks,
  VisA's small label values, palette masks); wide integer or float masks are
  mapped to non-zero -> 255, since clipping their raw values would be
  meaningless.
  """
  if img.mode == "L":
    return img
  if img.mode.startswith("I;16") or img.mode in ("I", "F"):
    a = np.asarray(img)
    return Image.fromarray(np.where(a != 0, 255, 0).astype(np.uint8), "L")
  return img.convert("L")


def preprocess_mask(img: Image.Image, size: int, *, threshold: float = 0.5,
                    strict_zero: bool = False) -> np.ndarray:
  """Binary mask float32 [size, size] in {0, 1}.

  Default: non-zero pixels become 255 (so data sets storing small label
  values, like VisA, behave like 0/255 masks), PIL bilinear resize, /255,
  `> threshold`. `strict_zero` is the release's VisA quirk: the raw mask is
  resized and thresholded at `> 0`, which grows a region by the resize
  kernel's footprint where the resized raw values stay above 0 (with VisA's
  label value 1, PIL's 8-bit rounding between its two passes leaves that to
  a pixel or a few per region; `tests/quirks_test.py` measures it).
  """
  img = mask_to_l(img)
  if not strict_zero:
    a = np.asarray(img)
    img = Image.fromarray(np.where(a != 0, 255, 0).astype(np.uint8), "L")
  if img.size != (size, size):
    img = img.resize((size, size), Image.BILINEAR)
  a = np.asarray(img, np.float32) * (1.0 / 255.0)
  return (a > (0.0 if strict_zero else threshold)).astype(np.float32)


def encode_png(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


def zero_mask_png(width: int, height: int) -> bytes:
  return encode_png(np.zeros((height, width), np.uint8))


# ----------------------------------------------------------------------------
# Prediction: a plain folder or glob of images.


def _walk_images(root: str, others: list[str] | None = None) -> list[str]:
  """Image files below `root`, following symlinked folders; a folder reached
  twice (a link loop or two links to one place) is read once. Files with
  another extension (not hidden ones) are appended to `others` when given."""
  seen: set[str] = set()
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames.sort()
    found += [os.path.join(dirpath, f) for f in filenames
              if is_image_file(f) and os.path.isfile(os.path.join(dirpath, f))]
    if others is not None:
      others += sorted(os.path.join(dirpath, f) for f in filenames
                       if not f.startswith(".") and not is_image_file(f)
                       and os.path.isfile(os.path.join(dirpath, f)))
  return found


def extension_counts(paths: Sequence[str]) -> str:
  """".gif: 2, .svg: 1" for files skipped by their extension."""
  counts: dict[str, int] = {}
  for p in paths:
    ext = os.path.splitext(p)[1].lower() or "(no extension)"
    counts[ext] = counts.get(ext, 0) + 1
  return ", ".join(f"{e}: {n}" for e, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def read_image_folder(
    folder_or_glob: str | os.PathLike, *, exclude: Sequence[str | os.PathLike] = (),
    excluded: list[str] | None = None, skipped: list[str] | None = None,
) -> tuple[list[str], list[tuple[str, str]]]:
  """Lists the images of a folder (recursively, following symlinked folders
  with a guard against loops) or a glob pattern.

  Files under a folder of `exclude` (e.g. the run's workdir, where its own
  outputs are) are left out, and appended to `excluded` when given. Every
  candidate is opened and decoded once, so a file that cannot be used is
  known before prediction starts. Files of a folder or glob whose extension
  is not an image's (`.gif`, `.heic`, `.svg`, `.txt`; hidden files aside)
  are appended to `skipped` when given, so a caller can count them.

  Returns:
    (paths, unreadable): sorted readable image paths, and (path, reason) for
    every file with an image extension that PIL cannot decode.

  Raises:
    FileNotFoundError: nothing matches, naming the pattern.
  """
  spec = os.fspath(folder_or_glob)
  others: list[str] = []
  if os.path.isdir(spec):
    candidates = _walk_images(spec, others)
  elif os.path.isfile(spec):
    candidates = [spec]
  else:
    matched = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    candidates = [p for p in matched if is_image_file(p)]
    others = sorted(p for p in matched if not is_image_file(p)
                    and not os.path.basename(p).startswith("."))
  roots = [os.path.realpath(e) for e in exclude if e]
  inside: list[str] = []
  if roots:
    def under(p):
      return any(os.path.commonpath([os.path.realpath(p), r]) == r for r in roots)
    inside = [p for p in candidates if under(p)]
    others = [p for p in others if not under(p)]
    if inside:
      candidates = [p for p in candidates if p not in set(inside)]
      if excluded is not None:
        excluded.extend(sorted(inside))
  if skipped is not None:
    skipped.extend(others)
  if not candidates:
    raise FileNotFoundError(
        f"no images found at {spec!r} (a folder is searched recursively for "
        f"{', '.join(IMAGE_EXTENSIONS)}; a glob pattern is matched as given"
        + (f"; {len(inside)} files under the workdir are never inputs"
           if inside else "")
        + (f"; {len(others)} files with other extensions skipped "
           f"({extension_counts(others)})" if others else "") + ")")
  ok, bad = [], []
  for p in sorted(candidates):
    try:
      with Image.open(p) as img:
        img.load()
        problem = pixel_problem(img)
      if problem:
        bad.append((p, problem))
      else:
        ok.append(p)
    except Exception as e:  # PIL raises many kinds; every one means unusable.
      bad.append((p, describe_error(e)))
  return ok, bad


def describe_error(e: BaseException) -> str:
  """`Kind: message` without object reprs (PIL names the BytesIO it was given:
  `cannot identify image file <_io.BytesIO object at 0x...>`)."""
  text = re.sub(r"\s*<[_\w.]+ object at 0x[0-9a-fA-F]+>", "", str(e)).strip()
  text = text.replace("cannot identify image file", "not a known image format")
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_for_prediction(path: str, size: int, keep_rgb: bool = False) -> dict:
  """One preprocessed image for prediction, with its original size.

  `keep_rgb=True` also returns the upright full-size 8-bit RGB image as
  `rgb` (the same decode, e.g. for a heatmap panel), None when unreadable.
  """
  rgb = None
  try:
    img = decode(path)
    w, h = img.size
    if keep_rgb:
      rgb = np.asarray(img, np.uint8)
    image = preprocess_image(img, size)   # to_rgb of RGB is the image itself
    error = ""
  except Exception as e:
    image = np.zeros((size, size, 3), np.uint8)
    w = h = 0
    rgb = None
    error = describe_error(e)
  out = {"image": image, "orig_size": np.array([h, w], np.int32),
         "valid": np.bool_(not error), "path": path, "error": error}
  if keep_rgb:
    out["rgb"] = rgb
  return out


def prediction_batches(paths: Sequence[str], *, image_size: int,
                       batch_size: int, num_threads: int = 4
                       ) -> Iterator[dict]:
  """Yields prediction batches in path order.

  Each batch: `image` uint8 RGB [B,S,S,3], `orig_size` int32 [B,2] (height,
  width), `valid` bool [B] (False for padding of the last batch and for a file
  that failed to decode now although it was readable when listed), `path`
  and `error` (numpy str arrays; error is "" when fine). The last batch is
  padded to `batch_size` so a compiled model sees one shape.
  """
  paths = list(paths)
  with ThreadPoolExecutor(max(1, num_threads)) as pool:
    for start in range(0, len(paths), batch_size):
      chunk = paths[start:start + batch_size]
      items = list(pool.map(lambda p: load_for_prediction(p, image_size), chunk))
      pad = batch_size - len(items)
      for _ in range(pad):
        items.append({"image": np.zeros((image_size, image_size, 3), np.uint8),
                      "orig_size": np.zeros(2, np.int32), "valid": np.bool_(False),
                      "path": "", "error": ""})
      yield {
          "image": np.stack([x["image"] for x in items]),
          "orig_size": np.stack([x["orig_size"] for x in items]),
          "valid": np.array([x["valid"] for x in items], bool),
          "path": np.array([x["path"] for x in items], dtype=str),
          "error": np.array([x["error"] for x in items], dtype=str),
      }
