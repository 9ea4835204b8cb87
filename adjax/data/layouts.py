"""Scanning the raw layouts users download into a list of example records.

Every data set is reduced to records (image file, mask file or none, label,
category, defect type, path relative to the root). Images and masks are paired
by file stem (MVTec's `_mask` suffix, BTAD's same stem with another
extension, VisA's csv), never by sorted position. Anything that does not fit
the layout is an error naming the file and what was expected: a defect image
without a mask, a mask without an image, a csv row pointing nowhere.
Decoding (unreadable files) is checked later, when the builder writes.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import logging
from pathlib import Path
from typing import Sequence

from adjax.common.errors import UserError
from adjax.data import images

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
  """Raw data that does not match its expected layout or cannot be read."""


class DatasetNotFoundError(DataError):
  """The raw data set is not there (and was never prepared)."""


@dataclasses.dataclass(frozen=True)
class Record:
  image: Path
  mask: Path | None
  label: int  # 0 normal, 1 anomalous
  category: str
  defect_type: str
  path: str  # image path relative to the data set root, with "/"
  has_mask: bool = True  # False only for a defect image of a mask-less folder


def _image_files(d: Path) -> tuple[list[Path], list[Path]]:
  """(image files, other non-hidden files) directly in `d`, sorted."""
  imgs, other = [], []
  for p in sorted(d.iterdir()):
    if p.is_file() and images.is_image_file(p):
      imgs.append(p)
    elif p.is_file() and not p.name.startswith("."):
      other.append(p)
  return imgs, other


def _warn_ignored(ignored: list[Path], root: Path) -> None:
  if ignored:
    shown = ", ".join(str(p.relative_to(root)) for p in ignored[:5])
    log.warning("ignored %d non-image file(s) under %s: %s%s", len(ignored),
                root, shown, " ..." if len(ignored) > 5 else "")


def _pair_masks(img_dir: Path, imgs: list[Path], mask_dir: Path,
                suffixes: Sequence[str]) -> dict[Path, Path]:
  """Maps each image to its mask by stem; every mask must be used."""
  masks, _ = _image_files(mask_dir) if mask_dir.is_dir() else ([], [])
  by_stem: dict[str, list[Path]] = collections.defaultdict(list)
  for m in masks:
    by_stem[m.stem].append(m)
  for stem, ms in by_stem.items():
    if len(ms) > 1:
      raise DataError(f"two masks with the same stem {stem!r}: "
                      f"{', '.join(map(str, ms))}")
  pairs, used = {}, set()
  for img in imgs:
    found = [by_stem[img.stem + s][0] for s in suffixes if img.stem + s in by_stem]
    if not found:
      expected = " or ".join(str(mask_dir / f"{img.stem}{s}.png") for s in suffixes)
      raise DataError(f"defect image {img} has no mask; expected {expected}")
    if len(found) > 1:
      raise DataError(f"defect image {img} matches several masks: "
                      f"{', '.join(map(str, found))}")
    pairs[img] = found[0]
    used.add(found[0])
  for m in masks:
    if m not in used:
      stems = [m.stem[:len(m.stem) - len(s)] for s in suffixes
               if m.stem.endswith(s) and len(m.stem) > len(s)]
      raise DataError(f"mask {m} has no image: expected an image with stem "
                      f"{' or '.join(map(repr, stems))} in {img_dir}")
  return pairs


def scan_mvtec(root: Path, *, good: str = "good",
               mask_suffixes: Sequence[str] = ("_mask",),
               masks_optional: bool = False,
               category_dirs: Sequence[Path] | None = None,
               category_names: Sequence[str] | None = None) -> list[Record]:
  """MVTec layout: `<cat>/test/<defect>/x.png`, `<cat>/ground_truth/<defect>/`.

  Args:
    root: data set root (paths are stored relative to it).
    good: the folder name of normal images (`good`; BTAD: `ok`).
    mask_suffixes: stem suffixes a mask may carry (`000.png` -> `000_mask.png`).
    masks_optional: a category without any `ground_truth` folder is accepted;
      its defect images get `has_mask=False` (image-level evaluation only).
      A category that has `ground_truth` must have every mask.
    category_dirs / category_names: explicit category folders and names
      (default: every sub-folder of `root` that contains `test/`).
  """
  if category_dirs is None:
    category_dirs = [d for d in sorted(root.iterdir())
                     if d.is_dir() and (d / "test").is_dir()]
    others = [d.name for d in sorted(root.iterdir()) if d.is_dir()
              and not d.name.startswith(".") and not (d / "test").is_dir()]
    if others and category_dirs:
      log.warning("%s: ignoring %d folder(s) without test/ (not categories): %s", root,
                  len(others), ", ".join(others))
  if category_names is None:
    category_names = [d.name for d in category_dirs]
  if not category_dirs:
    raise DataError(f"no category folder with a test/ sub-folder in {root}")
  records, ignored = [], []
  for cat_dir, cat in zip(category_dirs, category_names):
    test, gt = cat_dir / "test", cat_dir / "ground_truth"
    defects = sorted(d for d in test.iterdir() if d.is_dir())
    if not defects:
      raise DataError(f"{test} has no sub-folders; expected {test}/{good}/ and "
                      f"{test}/<defect type>/ with images")
    defect_names = {d.name for d in defects}
    if gt.is_dir():
      for g in sorted(gt.iterdir()):
        if g.is_dir() and g.name not in defect_names and g.name != good:
          raise DataError(f"mask folder {g} has no image folder {test / g.name}")
    elif not masks_optional and any(d.name != good for d in defects):
      raise DataError(f"{cat_dir} has defect images but no ground_truth/ folder "
                      f"(expected masks in {gt}/<defect type>/)")
    for d in defects:
      imgs, other = _image_files(d)
      ignored += other
      if d.name == good:
        if (gt / good).is_dir():
          log.warning("ignoring %s: normal images need no masks", gt / good)
        records += [Record(p, None, 0, cat, good, p.relative_to(root).as_posix())
                    for p in imgs]
        continue
      if not gt.is_dir():
        records += [Record(p, None, 1, cat, d.name, p.relative_to(root).as_posix(),
                           has_mask=False) for p in imgs]
        continue
      pairs = _pair_masks(d, imgs, gt / d.name, mask_suffixes)
      records += [Record(p, pairs[p], 1, cat, d.name, p.relative_to(root).as_posix())
                  for p in imgs]
  # A category with no image would vanish from the results without a word.
  empty = [str(d / "test") for d, c in zip(category_dirs, category_names)
           if not any(r.category == c for r in records)]
  if empty:
    raise DataError(f"{len(empty)} categor{'y' if len(empty) == 1 else 'ies'} without "
                    f"images: {', '.join(empty)} (expected images in test/{good}/ or "
                    "test/<defect type>/); add images or remove the folder")
  _warn_ignored(ignored, root)
  return records


def scan_visa(root: Path) -> list[Record]:
  """VisA: the official `split_csv/1cls.csv`, rows of the `test` split.

  Columns `object, split, label, image, mask`; label `normal`/`anomaly`;
  paths relative to the root. Masks: non-zero = defect. The csv is the
  authority, so masks it does not reference are not an error.
  """
  csv_path = root / "split_csv" / "1cls.csv"
  if not csv_path.is_file():
    raise DataError(f"VisA split file {csv_path} not found (expected the "
                    "official split_csv/1cls.csv at the data set root)")
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    need = {"object", "split", "label", "image", "mask"}
    if reader.fieldnames is None or not need <= set(reader.fieldnames):
      raise DataError(f"{csv_path}: expected columns {sorted(need)}, found "
                      f"{reader.fieldnames}")
    rows = list(reader)
  records, seen = [], {}
  for line, row in enumerate(rows, start=2):
    if row["split"].strip() != "test":
      continue
    where = f"{csv_path} line {line}"
    label = row["label"].strip()
    if label not in ("normal", "anomaly"):
      raise DataError(f"{where}: label {label!r}, expected 'normal' or 'anomaly'")
    rel = row["image"].strip()
    img = root / rel
    if not img.is_file():
      raise DataError(f"{where}: image {img} does not exist")
    if rel in seen:
      raise DataError(f"{where}: image {rel} already listed on line {seen[rel]}")
    seen[rel] = line
    mask = None
    if label == "anomaly":
      mrel = row["mask"].strip()
      if not mrel:
        raise DataError(f"{where}: anomalous image {rel} has no mask path")
      mask = root / mrel
      if not mask.is_file():
        raise DataError(f"{where}: mask {mask} (for image {rel}) does not exist")
    records.append(Record(img, mask, int(label == "anomaly"),
                          row["object"].strip(),
                          "anomaly" if label == "anomaly" else "good",
                          Path(rel).as_posix()))
  if not records:
    raise DataError(f"{csv_path} has no rows with split 'test'")
  return records


def scan_btad(root: Path) -> list[Record]:
  """BTAD: `01|02|03/test/{ok,ko}/`, masks `ground_truth/ko/` with the same stem."""
  return scan_mvtec(root, good="ok", mask_suffixes=("",))


def scan_single_category(root: Path, category: str) -> list[Record]:
  """Medical sets: one category folder with `test/{good,<abnormal>}`.

  `root` may be that folder or contain exactly one such folder. Masks carry
  the image's stem, with or without `_mask`.
  """
  if (root / "test").is_dir():
    cat_dir = root
  else:
    subs = [d for d in sorted(root.iterdir()) if d.is_dir() and (d / "test").is_dir()]
    if len(subs) != 1:
      raise DataError(
          f"{root}: expected one category folder with test/ (or test/ directly "
          f"in it), found {len(subs)}: {[d.name for d in subs]}")
    cat_dir = subs[0]
  return scan_mvtec(root, mask_suffixes=("_mask", ""), category_dirs=[cat_dir],
                    category_names=[category])
