"""TFDS builders for the anomaly-detection benchmarks and for users' folders.

Each builder reads a raw layout the user downloaded (`manual_dir`, see
`layouts`) and writes one `test` split as array_record (the ZSAD protocol
trains and evaluates on test splits only). No TensorFlow is involved:
features are stored as raw values and decoded with PIL by the pipeline.

Storage decision (checked with tfds 4.9 without TensorFlow): `image` and
`mask` are encoded bytes in `tfds.features.Tensor(shape=(), dtype=object)`
rather than `tfds.features.Image`, whose NumPy decoder fixes the channel
count (MVTec mixes grayscale and RGB categories) and would hand back arrays
the pipeline must turn into PIL images again for the release's resize.
PNG and JPEG files are stored byte for byte; BMP/TIFF/WebP are re-encoded
losslessly as PNG. Masks are stored as 8-bit single-channel PNG
(`images.mask_to_l`), all zero for normal images.

Examples are written in scan order (sorted by path; `disable_shuffling`),
and per-example categories and labels are kept in the data set's metadata
so the pipeline can filter and count without reading images.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
import re
import tempfile
from typing import ClassVar

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from adjax.data import images, layouts

log = logging.getLogger(__name__)

VERSION = tfds.core.Version("1.0.0")
_KEEP_FORMATS = ("PNG", "JPEG")


class _AnomalyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common part: features, validation while writing, metadata."""

  VERSION = VERSION
  RELEASE_NOTES = {"1.0.0": "Initial release: test split, encoded image and mask."}
  HOMEPAGE: ClassVar[str] = ""
  LAYOUT: ClassVar[str] = ""
  KNOWN_CATEGORIES: ClassVar[tuple[str, ...]] = ()
  NUM_TEST_EXAMPLES: ClassVar[int | None] = None

  def __init__(self, *, skip_bad_files: bool = False,
               records: list[layouts.Record] | None = None,
               extra_metadata: dict | None = None, **kwargs):
    self._skip_bad_files = skip_bad_files
    self._records = records
    self._extra_metadata = dict(extra_metadata or {})
    super().__init__(**kwargs)

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and
  # "... downloaded and prepared" lines; `adjax.data.prepare` says what it
  # prepares (per-category counts) and where, in its own words.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds locates the module through `importlib_resources` (not a dependency
    # here) for package-installed builders; the answer is simply this file.
    return epath.Path(__file__)

  @classmethod
  def instructions(cls) -> str:
    return (f"Download {cls.name} from {cls.HOMEPAGE}, extract it, and point "
            f"manual_dir at the extracted root, laid out as:\n{cls.LAYOUT}")

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.name}: test split for zero-shot anomaly detection.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "mask": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": tfds.features.Scalar(dtype=np.int64),
            "category": text,
            "defect_type": text,
            "path": text,
            "has_mask": tfds.features.Scalar(dtype=np.bool_),
        }),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def scan(self, root: Path) -> list[layouts.Record]:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    records = self._records
    if records is None:
      records = self.scan(Path(dl_manager.manual_dir))
    return {"test": self._generate_examples(records)}

  def _generate_examples(self, records):
    categories = sorted({r.category for r in records})
    cat_index = {c: i for i, c in enumerate(categories)}
    ex_cat, ex_label, skipped, bad = [], [], [], []
    for r in records:
      try:
        ex = _encode_record(r)
      except _Unreadable as e:
        if not self._skip_bad_files:
          bad.append(str(e))        # every one is named, not only the first
          continue
        skipped.append([r.path, str(e)])
        log.warning("skipping %s", e)
        continue
      if bad:
        continue                    # failing anyway: only look for more bad files
      key = len(ex_cat)
      ex_cat.append(cat_index[r.category])
      ex_label.append(r.label)
      yield key, ex
    if bad:
      raise layouts.DataError(unreadable_message(self.name, bad) +
                              " (pass skip_bad_files to skip them with a warning)")
    if skipped:
      log.warning("%s: skipped %d unreadable file(s) of %d", self.name,
                  len(skipped), len(records))
    if not ex_cat:
      raise layouts.DataError(f"{self.name}: no readable examples")
    self.info.metadata.update({
        "categories": categories, "example_category": ex_cat,
        "example_label": ex_label, "skipped": skipped, **self._extra_metadata,
    })


def unreadable_message(name: str, bad: list[str], shown: int = 3) -> str:
  """`N unreadable files: first; second; third; ... (all N in FILE)` - the
  full list goes to a file in the temporary folder."""
  fd, listing = tempfile.mkstemp(prefix=f"adjax-unreadable-{name}-", suffix=".txt")
  with os.fdopen(fd, "w") as f:
    f.write("".join(line + "\n" for line in bad))
  more = f"; ... (all {len(bad)} listed in {listing})" if len(bad) > shown else (
      f" (listed in {listing})")
  return f"{name}: {len(bad)} unreadable files: {'; '.join(bad[:shown])}{more}"


class _Unreadable(Exception):
  pass


def _encode_record(r: layouts.Record) -> dict:
  """Reads, decodes (to validate) and encodes one record."""
  try:
    data = r.image.read_bytes()
    img = images.open_image(data)
    turned = images.upright(img)      # EXIF orientation: stored as seen
  except Exception as e:
    raise _Unreadable(f"unreadable image {r.image}: {images.describe_error(e)}") from e
  w, h = turned.size
  if img.format not in _KEEP_FORMATS or turned is not img:
    img = turned
    if img.mode not in ("1", "L", "P", "RGB", "RGBA", "I", "I;16", "LA"):
      img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
  if r.mask is None:
    mask = images.zero_mask_png(w, h)
  else:
    try:
      m = images.mask_to_l(images.open_image(r.mask))
    except Exception as e:
      raise _Unreadable(f"unreadable mask {r.mask}: {images.describe_error(e)}") from e
    if m.size != (w, h):
      raise layouts.DataError(
          f"mask {r.mask} is {m.size[0]}x{m.size[1]} but its image {r.image} "
          f"is {w}x{h}")
    mask = images.encode_png(np.asarray(m))
  return {"image": data, "mask": mask, "label": r.label, "category": r.category,
          "defect_type": r.defect_type, "path": r.path, "has_mask": r.has_mask}


_MVTEC_LAYOUT = """\
  <root>/<category>/test/good/000.png
  <root>/<category>/test/<defect type>/000.png
  <root>/<category>/ground_truth/<defect type>/000_mask.png"""


class MvtecAd(_AnomalyBuilder, skip_registration=True):
  name = "mvtec_ad"
  HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
  LAYOUT = _MVTEC_LAYOUT
  KNOWN_CATEGORIES = (
      "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
      "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
      "zipper")
  NUM_TEST_EXAMPLES = 1725
  MANUAL_DOWNLOAD_INSTRUCTIONS = "MVTec AD (mvtec_anomaly_detection.tar.xz) from " + HOMEPAGE

  def scan(self, root):
    return layouts.scan_mvtec(root)


class Mpdd(_AnomalyBuilder, skip_registration=True):
  name = "mpdd"
  HOMEPAGE = "https://github.com/stepanje/MPDD"
  LAYOUT = _MVTEC_LAYOUT
  KNOWN_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white",
                      "connector", "metal_plate", "tubes")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "MPDD (MVTec layout) from " + HOMEPAGE

  def scan(self, root):
    return layouts.scan_mvtec(root)


class Visa(_AnomalyBuilder, skip_registration=True):
  name = "visa"
  HOMEPAGE = "https://github.com/amazon-science/spot-diff"
  LAYOUT = """\
  <root>/split_csv/1cls.csv   (columns object,split,label,image,mask)
  <root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG
  <root>/<category>/Data/Masks/Anomaly/*.png   (non-zero = defect)"""
  KNOWN_CATEGORIES = (
      "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
      "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
  NUM_TEST_EXAMPLES = 2162
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("VisA (VisA_20220922.tar) with its official "
                                  "split_csv/1cls.csv from " + HOMEPAGE)

  def scan(self, root):
    return layouts.scan_visa(root)


class Btad(_AnomalyBuilder, skip_registration=True):
  name = "btad"
  HOMEPAGE = "https://github.com/pankajmishra000/VT-ADL"
  LAYOUT = """\
  <root>/{01,02,03}/test/ok/0000.bmp   (or .png)
  <root>/{01,02,03}/test/ko/0000.bmp
  <root>/{01,02,03}/ground_truth/ko/0000.png   (same stem as the image)"""
  KNOWN_CATEGORIES = ("01", "02", "03")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "BTAD (BTech_Dataset_transformed) from " + HOMEPAGE

  def scan(self, root):
    return layouts.scan_btad(root)


_MEDICAL_LAYOUT = """\
  <root>/test/good/<name>.<ext>        (or <root>/<folder>/test/...)
  <root>/test/<abnormal>/<name>.<ext>
  <root>/ground_truth/<abnormal>/<name>.png   (or <name>_mask.png)"""


class _Medical(_AnomalyBuilder, skip_registration=True):
  CATEGORY: ClassVar[str] = ""
  LAYOUT = _MEDICAL_LAYOUT

  def scan(self, root):
    return layouts.scan_single_category(root, self.CATEGORY)


class Isic(_Medical, skip_registration=True):
  name = "isic"
  CATEGORY = "skin"
  KNOWN_CATEGORIES = ("skin",)
  HOMEPAGE = "https://challenge.isic-archive.com/data/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("ISIC (skin lesions) as prepared for zero-shot "
                                  "anomaly detection, from " + HOMEPAGE)


class Clinicdb(_Medical, skip_registration=True):
  name = "clinicdb"
  CATEGORY = "colon"
  KNOWN_CATEGORIES = ("colon",)
  HOMEPAGE = "https://polyp.grand-challenge.org/CVCClinicDB/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("CVC-ClinicDB as prepared for zero-shot "
                                  "anomaly detection, from " + HOMEPAGE)


class Colondb(_Medical, skip_registration=True):
  name = "colondb"
  CATEGORY = "colon"
  KNOWN_CATEGORIES = ("colon",)
  HOMEPAGE = "http://vi.cvc.uab.es/colon-qa/cvccolondb/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("CVC-ColonDB as prepared for zero-shot "
                                  "anomaly detection, from " + HOMEPAGE)


class Tn3k(_Medical, skip_registration=True):
  name = "tn3k"
  CATEGORY = "thyroid"
  KNOWN_CATEGORIES = ("thyroid",)
  HOMEPAGE = "https://github.com/haifangong/TRFE-Net-for-thyroid-nodule-segmentation"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("TN3K (thyroid nodules) as prepared for "
                                  "zero-shot anomaly detection, from " + HOMEPAGE)


class Folder(_AnomalyBuilder, skip_registration=True):
  """A user's own data in MVTec layout; `ground_truth/` is optional.

  A category with a `ground_truth/` folder must have a mask for every defect
  image (pixel-level metrics). A category without one is accepted for
  image-level use: its defect images carry an all-zero mask with
  `has_mask=False`, which pixel metrics and mask losses must skip.
  Each root gets its own config, named from the folder name and a hash of
  its absolute path, so two roots never share prepared data.
  """
  name = "folder"
  HOMEPAGE = "(your own data)"
  LAYOUT = _MVTEC_LAYOUT + "   (ground_truth/ optional per category)"
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Your own images in MVTec layout."

  def scan(self, root):
    records = layouts.scan_mvtec(root, mask_suffixes=("_mask", ""),
                                 masks_optional=True)
    nomask = sorted({r.category for r in records if not r.has_mask})
    if nomask:
      log.warning("categories without ground_truth/ (image-level only, "
                  "has_mask=False on their defect images): %s", ", ".join(nomask))
    return records


BUILDERS: dict[str, type[_AnomalyBuilder]] = {
    b.name: b for b in (MvtecAd, Visa, Mpdd, Btad, Isic, Clinicdb, Colondb,
                        Tn3k, Folder)}


def folder_config(root: str | os.PathLike) -> tfds.core.BuilderConfig:
  """The config of a folder root: readable name plus a hash of its path."""
  absolute = os.path.abspath(os.fspath(root))
  slug = re.sub(r"[^a-z0-9_]+", "_", os.path.basename(absolute).lower()).strip("_")
  digest = hashlib.sha256(absolute.encode()).hexdigest()[:12]
  return tfds.core.BuilderConfig(name=f"{slug or 'root'}-{digest}",
                                 description=f"images under {absolute}")


def fingerprint(root: Path) -> str:
  """Hash of every file's relative path, size and mtime under `root`."""
  h = hashlib.sha256()
  for p in sorted(root.rglob("*")):
    if p.is_file():
      st = p.stat()
      h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()
