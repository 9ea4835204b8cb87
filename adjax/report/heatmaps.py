"""Anomaly-map pictures: the image, its ground truth and the map overlaid.

Drawn with PIL and a small built-in "jet"-like colour map, so no plotting
library is needed. Files are written atomically.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from adjax.common import atomic

# Piecewise-linear jet: blue -> cyan -> green -> yellow -> red.
_JET_X = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_RGB = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]])


def colormap(values: np.ndarray) -> np.ndarray:
  """[H, W] in [0, 1] -> [H, W, 3] uint8."""
  v = np.clip(values, 0.0, 1.0)
  rgb = np.stack([np.interp(v, _JET_X, _JET_RGB[:, c]) for c in range(3)], -1)
  return (rgb * 255).round().astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Scale:
  """How a map's values become colours, the same for every image drawn with
  it: `value / divisor`, from `lo` (blue) to `hi` (dark red), clipped."""
  lo: float
  hi: float
  divisor: float
  label: str
  boundary: float | None = None    # the decision boundary on this scale, if any

  def unit(self, amap: np.ndarray) -> np.ndarray:
    v = np.asarray(amap, np.float64) / self.divisor
    return ((v - self.lo) / (self.hi - self.lo)).astype(np.float32)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


# Without a pixel threshold, each mode's maps on their own fixed range.
_RAW = {"zero_shot": (0.0, 1.0, "anomaly probability"),
        "few_shot": (0.0, 2.0, "distance to the nearest reference patch"),
        "batch": (0.0, 2.0, "distance to the other images' patches"),
        "zero_shot+few_shot": (-3.0, 3.0, "combined z-score"),
        "zero_shot+batch": (-3.0, 3.0, "combined z-score")}


def scale_for(scoring: str, pixel_threshold: float | None = None) -> Scale:
  """The stated scale of a mode's maps: divided by the pixel threshold, 0 to 2
  (1 = the decision boundary) when there is a positive one; otherwise the
  mode's fixed range (zero_shot 0 to 1, few_shot and batch 0 to 2, the
  combined modes' z-scores -3 to 3). Never stretched per image: a normal
  image never looks hotter than a defect."""
  if pixel_threshold is not None and pixel_threshold > 0:
    return Scale(0.0, 2.0, float(pixel_threshold),
                 f"map / pixel threshold ({float(pixel_threshold):.9g}); 1 = decision "
                 "boundary", boundary=1.0)
  lo, hi, what = _RAW.get(scoring, _RAW["zero_shot"])
  return Scale(lo, hi, 1.0, f"{scoring} {what}, {lo:g} to {hi:g}",
               boundary=None if pixel_threshold is None else float(pixel_threshold))


def colour_bar(height: int, scale: Scale, width: int = 64) -> np.ndarray:
  """A vertical colour bar [height, width, 3] for `scale`: hi at the top, its
  end values (and the boundary) written beside it (from 24 pixels high)."""
  height = max(int(height), 1)
  strip = 12
  ramp = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(strip, 1)
  out = np.full((height, width, 3), 255, np.uint8)
  out[:, :strip] = colormap(ramp)
  img = Image.fromarray(out)
  if height < 24:
    return np.asarray(img)
  draw = ImageDraw.Draw(img)
  ticks = [(scale.hi, 0), (scale.lo, height - 11)]
  if scale.boundary is not None and scale.lo < scale.boundary < scale.hi:
    y = int(round((scale.hi - scale.boundary) / (scale.hi - scale.lo) * (height - 1)))
    draw.line([(0, y), (strip + 3, y)], fill=(255, 255, 255), width=1)
    ticks.append((scale.boundary, min(max(y - 5, 10), height - 22)))
  for value, y in ticks:
    draw.text((strip + 3, y), f"{value:g}", fill=(0, 0, 0))
  return np.asarray(img)


def overlay(rgb: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  heat = colormap(amap).astype(np.float32)
  return (alpha * heat + (1 - alpha) * rgb.astype(np.float32)).round().astype(np.uint8)


def panel(rgb: np.ndarray, amap: np.ndarray, mask: np.ndarray | None = None,
          scale: Scale | None = None) -> np.ndarray:
  """Side by side: image | ground truth (if given) | map overlaid on the
  image | colour bar.

  The map is drawn on `scale` (`scale_for`: one scale per mode, or per
  pixel threshold), so panels drawn with the same scale compare; without
  one, the zero-shot head's fixed range (0 to 1).
  """
  h, w = amap.shape
  scale = scale or scale_for("zero_shot")
  amap = scale.unit(amap)
  if rgb.shape[:2] != (h, w):
    rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
  tiles = [rgb]
  if mask is not None:
    tiles.append(np.repeat((np.asarray(mask) > 0.5).astype(np.uint8)[..., None] * 255, 3, -1))
  tiles.append(overlay(rgb, amap))
  tiles.append(colour_bar(h, scale))
  gap = np.full((h, 4, 3), 255, np.uint8)
  row = [tiles[0]]
  for t in tiles[1:]:
    row += [gap, t]
  return np.concatenate(row, axis=1)


def png_bytes(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def save_png(path: Path, pixels: np.ndarray) -> None:
  atomic.write_bytes(path, png_bytes(pixels))
