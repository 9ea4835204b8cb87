"""Binary decisions drawn: mask PNGs and mask contours over the image.

For deployment outputs: `binary_mask(amap, threshold)` turns an anomaly map
into a 0/255 mask (anomalous where map >= threshold, the convention of
`adjax.workdir.thresholds`), `contour(mask)` marks the mask's boundary pixels (mask
pixels with a 4-neighbour outside the mask or on the image border), and
`draw_contour(rgb, mask)` paints that boundary, thickened, onto the image.
PNGs are written atomically (`heatmaps.save_png`). numpy and PIL only.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
import numpy as np

from adjax.common import atomic
from adjax.report import heatmaps


def binary_mask(amap: np.ndarray, threshold: float) -> np.ndarray:
  """[H, W] map -> uint8 [H, W], 255 where map >= threshold, else 0."""
  amap = np.asarray(amap)
  if amap.ndim != 2:
    raise ValueError(f"binary_mask: expected an [H, W] map, got shape {amap.shape}")
  return np.where(amap >= threshold, 255, 0).astype(np.uint8)


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of a mask to (H, W), so it stays binary."""
  img = Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8))
  return np.asarray(img.resize((hw[1], hw[0]), Image.NEAREST))


def contour(mask: np.ndarray) -> np.ndarray:
  """bool [H, W]: mask pixels with a 4-neighbour outside the mask (or the border)."""
  m = np.asarray(mask) > 0
  padded = np.pad(m, 1, constant_values=False)
  interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
  return m & ~interior


def _dilate(m: np.ndarray, radius: int) -> np.ndarray:
  """Square (Chebyshev) dilation by `radius` pixels."""
  out = m.copy()
  h, w = m.shape
  padded = np.pad(m, radius, constant_values=False)
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      out |= padded[radius + dy: radius + dy + h, radius + dx: radius + dx + w]
  return out


def draw_contour(rgb: np.ndarray, mask: np.ndarray, color=(255, 0, 0),
                 thickness: int = 2) -> np.ndarray:
  """The image with the mask's outline painted in `color`, `thickness` pixels wide.

  A mask of another size is resized (nearest) to the image first.
  """
  rgb = np.asarray(rgb)
  if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
    raise ValueError(f"draw_contour: expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
  if thickness < 1:
    raise ValueError(f"thickness={thickness}: expected >= 1")
  mask = np.asarray(mask)
  if mask.shape != rgb.shape[:2]:
    mask = resize_mask(mask, rgb.shape[:2])
  edge = contour(mask)
  if thickness > 1:
    edge = _dilate(edge, thickness - 1) & (np.asarray(mask) > 0)
  out = rgb.copy()
  out[edge] = np.asarray(color, np.uint8)
  return out


def save_mask_png(path: str | Path, mask: np.ndarray) -> None:
  """A single-channel 0/255 PNG (what MVTec-style ground truth looks like)."""

  buf = io.BytesIO()
  Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), "L").save(
      buf, format="PNG")
  atomic.write_bytes(Path(path), buf.getvalue())


def save_overlay_png(path: str | Path, rgb: np.ndarray, mask: np.ndarray, **kwargs) -> None:
  heatmaps.save_png(Path(path), draw_contour(rgb, mask, **kwargs))
