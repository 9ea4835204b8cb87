"""Anomaly-map pictures: the image, its ground truth and the map overlaid.

Drawn with PIL and a small built-in "jet"-like colour map, so no plotting
library is needed. Files are written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from adjax.common import atomic

# Piecewise-linear jet: blue -> cyan -> green -> yellow -> red.
_JET_X = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_RGB = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]])


def colormap(values: np.ndarray) -> np.ndarray:
  """[H, W] in [0, 1] -> [H, W, 3] uint8."""
  v = np.clip(values, 0.0, 1.0)
  rgb = np.stack([np.interp(v, _JET_X, _JET_RGB[:, c]) for c in range(3)], -1)
  return (rgb * 255).round().astype(np.uint8)


def overlay(rgb: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  heat = colormap(amap).astype(np.float32)
  return (alpha * heat + (1 - alpha) * rgb.astype(np.float32)).round().astype(np.uint8)


def panel(rgb: np.ndarray, amap: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """Side by side: image | ground truth (if given) | map overlaid on the image.

  The map is min-max scaled per image (as ZSAD papers draw them): it shows
  where the model looks, not how sure it is; the image score says that.
  """
  h, w = amap.shape
  lo, hi = float(np.min(amap)), float(np.max(amap))
  amap = (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)
  if rgb.shape[:2] != (h, w):
    rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
  tiles = [rgb]
  if mask is not None:
    tiles.append(np.repeat((np.asarray(mask) > 0.5).astype(np.uint8)[..., None] * 255, 3, -1))
  tiles.append(overlay(rgb, amap))
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
