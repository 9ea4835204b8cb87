"""Generated anomaly-detection data in MVTec layout, for the demo and tests.

Two families of categories share the defect kinds but not their appearance,
so a model trained on one family can be evaluated zero-shot on the other:

  family a: textures `fabric`, `wood`; objects `washer`, `pill`
  family b: textures `mesh`, `tile`; objects `nut`, `chip`

Defect kinds: `scratch`, `hole`, `stain`, `color` (colour spots) on every
category, plus `missing` and `extra` parts on objects. A mask is exactly the
set of pixels the defect changed (hard-edged shapes, no blending at the
border). Each image is drawn from its own generator seeded by
`(seed, family, category, index)`, so output is deterministic and does not
depend on how many images are asked for.

Layout written, one root per family (each loadable with the `folder`
builder): `<root>/family_<f>/<cat>/test/good/000.png`,
`.../test/<defect>/000.png`, `.../ground_truth/<defect>/000_mask.png`, and
(`train_per_category` > 0) normal training images `<cat>/train/good/000.png`,
drawn from generators of their own (`(seed, family, category, index, 2)`),
so the test split is the same byte for byte with or without them.

  python -m adjax.data.synthetic /path/to/out [--image_size 256] [--per_category 30] [--train_per_category 40]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from adjax.common import atomic

TEXTURE_DEFECTS = ("scratch", "hole", "stain", "color")
OBJECT_DEFECTS = TEXTURE_DEFECTS + ("missing", "extra")
FAMILIES = {
    "a": {"fabric": "texture", "wood": "texture", "washer": "object", "pill": "object"},
    "b": {"mesh": "texture", "tile": "texture", "nut": "object", "chip": "object"},
}


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
  return yy, xx


def _smooth_noise(rng: np.random.Generator, s: int, cells: int) -> np.ndarray:
  """Smooth noise in [0, 1]: a coarse random grid upsampled bicubically."""
  small = (rng.random((cells, cells)) * 255).astype(np.uint8)
  big = Image.fromarray(small, "L").resize((s, s), Image.BICUBIC)
  return np.asarray(big, np.float32) / 255.0


def _jitter(rng, rgb, amount=0.06) -> np.ndarray:
  return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 1)


def _shape_mask(s: int, draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
  m = Image.new("L", (s, s), 0)
  draw(ImageDraw.Draw(m))
  return np.asarray(m) > 127


# ---------------------------------------------------------------- textures


def _fabric(rng, s):
  yy, xx = _grid(s)
  f = rng.uniform(18, 26)
  n = _smooth_noise(rng, s, 8)
  v = (0.5 + 0.2 * np.sin(2 * np.pi * f * (xx + 0.02 * n))
       * np.sign(np.sin(np.pi * f * yy)) + 0.2 * np.sin(2 * np.pi * f * yy))
  v += 0.08 * (_smooth_noise(rng, s, s // 4) - 0.5)
  return _jitter(rng, (0.25, 0.35, 0.62)) * (0.55 + 0.6 * v[..., None])


def _wood(rng, s):
  yy, xx = _grid(s)
  cx, cy = rng.uniform(-0.5, 1.5), rng.uniform(-1.5, -0.5)
  r = np.sqrt(0.04 * (xx - cx) ** 2 + (yy - cy) ** 2)
  v = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(14, 20) * r
                         + 3.0 * _smooth_noise(rng, s, 6))
  dark, light = _jitter(rng, (0.45, 0.27, 0.13)), _jitter(rng, (0.78, 0.58, 0.36))
  return dark + (light - dark) * v[..., None]


def _mesh(rng, s):
  yy, xx = _grid(s)
  f = rng.uniform(9, 13)
  off = rng.random(2)
  dx = np.abs(((xx + off[0]) * f) % 1.0 - 0.5)
  dy = np.abs(((yy + off[1]) * f) % 1.0 - 0.5)
  wire = (np.maximum(dx, dy) > 0.38).astype(np.float32)
  base = _jitter(rng, (0.16, 0.2, 0.17)) * (0.8 + 0.4 * _smooth_noise(rng, s, 5))[..., None]
  metal = _jitter(rng, (0.62, 0.7, 0.64))
  return base + (metal - base) * wire[..., None]


def _tile(rng, s):
  yy, xx = _grid(s)
  k = int(rng.integers(4, 7))
  gx, gy = (xx * k) % 1.0, (yy * k) % 1.0
  grout = (np.minimum(np.minimum(gx, 1 - gx), np.minimum(gy, 1 - gy)) < 0.05)
  idx = (yy * k).astype(int) * k + (xx * k).astype(int)
  shades = rng.uniform(0.85, 1.1, k * k)[idx]
  base = _jitter(rng, (0.72, 0.33, 0.2)) * shades[..., None]
  base *= (0.92 + 0.16 * _smooth_noise(rng, s, s // 8))[..., None]
  return np.where(grout[..., None], _jitter(rng, (0.82, 0.8, 0.74)), base)


# ----------------------------------------------------------------- objects


def _background(rng, s, rgb):
  yy, xx = _grid(s)
  g = 0.9 + 0.15 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))
  return _jitter(rng, rgb, 0.04) * g[..., None] * (
      0.97 + 0.06 * _smooth_noise(rng, s, 16))[..., None]


def _center(rng, s):
  return s * (0.5 + rng.uniform(-0.06, 0.06, 2))


def _washer(rng, s):
  cx, cy = _center(rng, s)
  ro, ri = s * rng.uniform(0.3, 0.34), s * rng.uniform(0.1, 0.13)
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
  r = np.hypot(xx - cx, yy - cy)
  obj = (r <= ro) & (r >= ri)
  shade = 0.75 + 0.25 * np.cos((r - ri) / (ro - ri) * np.pi)
  img = np.where(obj[..., None], _jitter(rng, (0.7, 0.7, 0.72)) * shade[..., None],
                 _background(rng, s, (0.12, 0.12, 0.14)))
  return img, obj


def _pill(rng, s):
  cx, cy = _center(rng, s)
  a, b, t = s * rng.uniform(0.3, 0.35), s * rng.uniform(0.13, 0.16), rng.uniform(0, np.pi)
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
  u = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
  v = -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
  obj = (u / a) ** 2 + (v / b) ** 2 <= 1
  shade = 1.0 - 0.25 * np.clip((v / b) ** 2, 0, 1)
  colour = np.where((u > 0)[..., None], _jitter(rng, (0.93, 0.93, 0.9)),
                    _jitter(rng, (0.9, 0.5, 0.15)))
  img = np.where(obj[..., None], colour * shade[..., None],
                 _background(rng, s, (0.3, 0.45, 0.35)))
  return img, obj


def _polygon(cx, cy, r, n, t):
  return [(cx + r * math.cos(t + 2 * math.pi * i / n),
           cy + r * math.sin(t + 2 * math.pi * i / n)) for i in range(n)]


def _nut(rng, s):
  cx, cy = _center(rng, s)
  r, t = s * rng.uniform(0.3, 0.34), rng.uniform(0, np.pi)
  hole = s * rng.uniform(0.1, 0.13)
  obj = _shape_mask(s, lambda d: d.polygon(_polygon(cx, cy, r, 6, t), fill=255))
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
  obj &= np.hypot(xx - cx, yy - cy) > hole
  shade = 0.8 + 0.2 * np.sin((xx - yy) / s * 6)
  img = np.where(obj[..., None], _jitter(rng, (0.75, 0.6, 0.25)) * shade[..., None],
                 _background(rng, s, (0.85, 0.85, 0.85)))
  return img, obj


def _chip(rng, s):
  cx, cy = _center(rng, s)
  h, t = s * rng.uniform(0.17, 0.2), rng.uniform(-0.2, 0.2)
  c, si = math.cos(t), math.sin(t)

  def rect(x0, y0, x1, y1):
    return [(cx + x * c - y * si, cy + x * si + y * c)
            for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]

  body = _shape_mask(s, lambda d: d.polygon(rect(-h, -h, h, h), fill=255))
  pins = np.zeros((s, s), bool)
  for k in range(5):
    y = -h + (k + 0.5) * 2 * h / 5
    pins |= _shape_mask(s, lambda d, y=y: d.polygon(
        rect(-1.45 * h, y - 0.08 * h, 1.45 * h, y + 0.08 * h), fill=255))
  pins &= ~body
  img = _background(rng, s, (0.2, 0.42, 0.22))
  img = np.where(pins[..., None], _jitter(rng, (0.8, 0.8, 0.8)), img)
  img = np.where(body[..., None], _jitter(rng, (0.1, 0.1, 0.11)), img)
  return img, body | pins


RENDER = {"fabric": _fabric, "wood": _wood, "mesh": _mesh, "tile": _tile,
          "washer": _washer, "pill": _pill, "nut": _nut, "chip": _chip}


# ----------------------------------------------------------------- defects
# Surface defects are centred on, and clipped to, the object (the whole image
# for textures), as real ones are.


def _pick(rng, obj, s) -> tuple[float, float]:
  ys, xs = np.nonzero(obj[s // 5:s - s // 5, s // 5:s - s // 5])
  if len(xs) == 0:
    ys, xs = np.nonzero(obj)
    i = rng.integers(len(xs))
    return float(xs[i]), float(ys[i])
  i = rng.integers(len(xs))
  return float(xs[i] + s // 5), float(ys[i] + s // 5)


def _scratch(rng, img, obj, s):
  pts = [_pick(rng, obj, s)]
  for _ in range(int(rng.integers(2, 4))):
    ang, ln = rng.uniform(0, 2 * np.pi), s * rng.uniform(0.06, 0.18)
    pts.append((pts[-1][0] + ln * math.cos(ang), pts[-1][1] + ln * math.sin(ang)))
  width = max(2, int(s * rng.uniform(0.008, 0.018)))
  m = _shape_mask(s, lambda d: d.line(pts, fill=255, width=width, joint="curve"))
  m &= obj
  tone = rng.choice([0.08, 0.95])
  return np.where(m[..., None], tone + 0.04 * rng.standard_normal(3), img), m


def _hole(rng, img, obj, s):
  cx, cy = _pick(rng, obj, s)
  rx, ry = np.maximum(3.0, s * rng.uniform(0.03, 0.06, 2))
  m = _shape_mask(s, lambda d: d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255))
  m &= obj
  return np.where(m[..., None], np.float32(0.03), img), m


def _stain(rng, img, obj, s):
  cx, cy = _pick(rng, obj, s)
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
  r = np.hypot(xx - cx, yy - cy) / max(4.0, s * rng.uniform(0.06, 0.1))
  m = ((r + 0.8 * (_smooth_noise(rng, s, 12) - 0.5)) < 1.0) & obj
  colour = _jitter(rng, (0.4, 0.28, 0.1), 0.1)
  return np.where(m[..., None], 0.35 * img + 0.65 * colour, img), m


def _color(rng, img, obj, s):
  m = np.zeros((s, s), bool)
  out = img
  for _ in range(int(rng.integers(1, 4))):
    (cx, cy), r = _pick(rng, obj, s), max(2.0, s * rng.uniform(0.02, 0.035))
    spot = _shape_mask(s, lambda d: d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255))
    spot &= obj
    hue = np.eye(3, dtype=np.float32)[rng.integers(3)] * 0.85 + 0.05
    out = np.where(spot[..., None], hue, out)
    m |= spot
  return out, m


def _missing(rng, img, obj, s, background):
  ys, xs = np.nonzero(obj)
  i = rng.integers(len(xs))
  cx, cy, r = xs[i], ys[i], max(4.0, s * rng.uniform(0.06, 0.1))
  region = _shape_mask(s, lambda d: d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255))
  m = region & obj
  return np.where(m[..., None], background, img), m


def _extra(rng, img, obj, s, background):
  ys, xs = np.nonzero(obj)
  i = rng.integers(len(xs))
  cx, cy, r = xs[i], ys[i], max(4.0, s * rng.uniform(0.06, 0.1))
  ang = rng.uniform(0, 2 * np.pi)
  ex, ey = cx + r * math.cos(ang), cy + r * math.sin(ang)
  blob = _shape_mask(s, lambda d: d.ellipse((ex - r, ey - r, ex + r, ey + r), fill=255))
  m = blob & ~obj
  colour = img[obj].mean(0)
  return np.where(m[..., None], colour, img), m


DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "color": _color}


TRAIN_STREAM = 2   # the training images' generators: (seed, family, category, index, 2)


def _render_example(seed, fam_i, cat_i, idx, name, kind, defect, s, stream=()):
  rng = np.random.default_rng([seed, fam_i, cat_i, idx, *stream])
  out = RENDER[name](rng, s)
  img, obj = out if kind == "object" else (out, np.ones((s, s), bool))
  mask = np.zeros((s, s), bool)
  if defect is not None:
    for _ in range(20):  # redraw until the defect covers enough pixels
      if defect in ("missing", "extra"):
        background = img[~obj].mean(0)  # the removed part shows the backdrop
        new, mask = (_missing if defect == "missing" else _extra)(
            rng, img, obj, s, background)
      else:
        new, mask = DEFECTS[defect](rng, img, obj, s)
      if mask.sum() >= max(8, (s // 32) ** 2):
        img = new
        break
    else:
      raise RuntimeError(f"could not place a {defect} defect on {name} #{idx}")
  # Sensor noise from its own stream: a defective image differs from the
  # normal image of the same index exactly on its mask.
  noise = np.random.default_rng([seed, fam_i, cat_i, idx, *stream, 1]).standard_normal(
      img.shape, dtype=np.float32)
  img = np.clip(img + 0.015 * noise, 0, 1)
  return (img * 255 + 0.5).astype(np.uint8), mask


def generate(root, *, seed: int = 0, image_size: int = 256,
             per_category: int = 30, families: Sequence[str] = ("a", "b"),
             normal_fraction: float = 0.4, overwrite: bool = False,
             train_per_category: int = 0) -> dict:
  """Writes the generated data sets under `root/family_<f>/`.

  Args:
    root: output folder; each family is written atomically.
    seed: generation seed.
    image_size: square image side in pixels.
    per_category: test images per category (normal and defective).
    families: which families to write (`a`, `b`).
    normal_fraction: share of normal images per category.
    overwrite: replace existing family folders (else they are an error).
    train_per_category: normal training images per category (`train/good`).

  Returns:
    {"roots": {family: path}, "categories": {family: [names]},
     "defect_types": {family: {cat: [kinds]}},
     "counts": {family: {cat: {"good": n, "anomalous": m, "train_good": t}}}}.
  """
  unknown = sorted(set(families) - set(FAMILIES))
  if unknown:
    raise ValueError(f"unknown families {unknown}; expected {sorted(FAMILIES)}")
  n_good = max(1, round(per_category * normal_fraction))
  n_bad = per_category - n_good
  if n_bad < 1:
    raise ValueError(f"per_category {per_category} leaves no defective images")
  root = Path(root)
  result: dict = {"roots": {}, "categories": {}, "defect_types": {}, "counts": {}}
  for fam in families:
    fam_i = sorted(FAMILIES).index(fam)
    cats = FAMILIES[fam]
    result["categories"][fam] = sorted(cats)
    result["defect_types"][fam] = {}
    result["counts"][fam] = {}
    with atomic.atomic_dir(root / f"family_{fam}", overwrite=overwrite) as tmp:
      for cat_i, (name, kind) in enumerate(sorted(cats.items())):
        kinds = OBJECT_DEFECTS if kind == "object" else TEXTURE_DEFECTS
        result["defect_types"][fam][name] = list(kinds)
        result["counts"][fam][name] = {"good": n_good, "anomalous": n_bad,
                                       "train_good": int(train_per_category)}
        for idx in range(int(train_per_category)):
          img, _ = _render_example(seed, fam_i, cat_i, idx, name, kind, None, image_size,
                                   stream=(TRAIN_STREAM,))
          d = tmp / name / "train" / "good"
          d.mkdir(parents=True, exist_ok=True)
          Image.fromarray(img).save(d / f"{idx:03d}.png")
        plan = [None] * n_good + [kinds[i % len(kinds)] for i in range(n_bad)]
        numbers: dict[str, int] = {}
        for idx, defect in enumerate(plan):
          img, mask = _render_example(seed, fam_i, cat_i, idx, name, kind,
                                      defect, image_size)
          sub = defect or "good"
          k = numbers.get(sub, 0)
          numbers[sub] = k + 1
          d = tmp / name / "test" / sub
          d.mkdir(parents=True, exist_ok=True)
          Image.fromarray(img).save(d / f"{k:03d}.png")
          if defect is not None:
            g = tmp / name / "ground_truth" / sub
            g.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(g / f"{k:03d}_mask.png")
    result["roots"][fam] = root / f"family_{fam}"
  return result


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("root")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--per_category", type=int, default=30)
  p.add_argument("--families", default="a,b")
  p.add_argument("--train_per_category", type=int, default=0)
  p.add_argument("--overwrite", action="store_true")
  a = p.parse_args(argv)
  out = generate(a.root, seed=a.seed, image_size=a.image_size,
                 per_category=a.per_category, families=a.families.split(","),
                 overwrite=a.overwrite, train_per_category=a.train_per_category)
  for fam, path in out["roots"].items():
    print(f"family {fam}: {path} categories {', '.join(out['categories'][fam])}")


if __name__ == "__main__":
  main()
