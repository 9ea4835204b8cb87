"""Preparing data sets once (locked, atomic) and opening them for a run.

`prepare(name, manual_dir=..., data_dir=...)` turns a raw download (or a
user's folder in MVTec layout) into an array_record data set on first use
and reuses it afterwards, as a `DatasetHandle`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from adjax.common import atomic, processes
from adjax.data.builders import BUILDERS, fingerprint, folder_config
from adjax.data.layouts import DataError, DatasetNotFoundError

log = logging.getLogger(__name__)

# Names `prepare` accepts: the builder table's keys.
DATASETS: tuple[str, ...] = tuple(BUILDERS)


@dataclasses.dataclass
class DatasetHandle:
  """A prepared data set: random-access source plus what the pipeline needs.

  `source[i]` is a dict of `image` (encoded bytes), `mask` (PNG bytes),
  `label`, `category`, `defect_type`, `path` (text as bytes), `has_mask`.
  `example_category[i]` indexes `categories` (sorted names).
  """
  name: str
  source: Any
  categories: list[str]
  num_examples: int
  example_category: np.ndarray
  example_label: np.ndarray
  data_dir: Path
  skipped: list = dataclasses.field(default_factory=list)
  # How results and logs name the data set (a user folder: its folder name).
  label: str = ""
  # The raw folder it was prepared from (MVTec layout: its normal training
  # images are <raw_dir>/<category>/train/good); "" when unknown.
  raw_dir: str = ""

  @property
  def display_name(self) -> str:
    return self.label or self.name


def _missing_manual_dir(cls, root: Path | None) -> DatasetNotFoundError:
  where = f"looked in {root}" if root is not None else "no manual_dir was given"
  return DatasetNotFoundError(
      f"{cls.name}: raw data not found ({where}).\n"
      f"Expected layout:\n{cls.LAYOUT}\n"
      f"The data set is published at {cls.HOMEPAGE}; download and extract it, "
      "then set manual_dir to its root.")


def _describe(records) -> str:
  per_cat: dict[str, list[int]] = {}
  for r in records:
    per_cat.setdefault(r.category, [0, 0])[r.label] += 1
  parts = [f"{c} {n}+{a}" for c, (n, a) in sorted(per_cat.items())]
  normal = sum(n for n, _ in per_cat.values())
  return (f"{len(per_cat)} categories, {len(records)} images ({normal} normal, "
          f"{len(records) - normal} anomalous; per category normal+anomalous: "
          f"{', '.join(parts)})")


def _check_known(cls, categories: list[str], n: int) -> None:
  known = set(cls.KNOWN_CATEGORIES)
  if not known:
    return
  missing, extra = sorted(known - set(categories)), sorted(set(categories) - known)
  if missing or extra:
    log.warning("%s: categories differ from the published set (missing: %s; "
                "unexpected: %s)", cls.name, missing or "none", extra or "none")
  elif cls.NUM_TEST_EXAMPLES and n != cls.NUM_TEST_EXAMPLES:
    log.warning("%s: %d test images, the published set has %d", cls.name, n,
                cls.NUM_TEST_EXAMPLES)


def _remove_empty_parents(path: Path, stop: Path) -> None:
  """Removes `path` and its parents up to `stop` while they are empty."""
  path = path.absolute()
  stop = stop.absolute()
  while path != stop and stop in path.parents:
    try:
      path.rmdir()
    except FileNotFoundError:
      pass
    except OSError:
      return
    path = path.parent


def _remove_stale_incomplete(version_dir: Path) -> None:
  """Removes TFDS `incomplete.*` folders a killed preparation left behind.

  TFDS names them `incomplete.<random>_<version>` beside `version_dir`,
  without an owner; they are removed only when no other live process has a
  scratch folder there (see `atomic.scratch_dir`). A live one means two runs
  prepare the same data at once, which is refused.
  """
  parent = version_dir.parent
  me = (processes.this_host(), os.getpid())
  for path, host, pid in atomic.owned_temporaries(parent, version_dir.name):
    if (host, pid) != me and processes.owner_alive(host, pid):
      raise DataError(
          f"{version_dir} is being prepared by process {pid} on {host}; wait "
          f"for it to finish (if that process no longer runs: rm -r '{path}')")
  for path in parent.glob(f"incomplete.*_{version_dir.name}"):
    if path.is_dir():
      log.warning("removed %s, left by an interrupted preparation", path)
      shutil.rmtree(path, ignore_errors=True)


def prepare(name: str, *, manual_dir: str | os.PathLike | None,
            data_dir: str | os.PathLike, skip_bad_files: bool = False
            ) -> DatasetHandle:
  """Prepares (first use) or opens (later uses) a data set's test split.

  Args:
    name: one of `DATASETS`.
    manual_dir: root of the raw download (for `folder`: the user's root in
      MVTec layout). The prepared data records the folder it came from (its
      resolved path and a digest of its files' names, sizes and mtimes) and
      `skip_bad_files`; a different or changed folder, or another
      `skip_bad_files`, is prepared again. When manual_dir does not exist,
      the prepared copy is used (with a message naming its source when that
      was another folder).
    data_dir: where prepared data sets live (`<data_dir>/<name>/...`).
    skip_bad_files: unreadable images or masks become warnings with a count
      (recorded in `handle.skipped`) instead of errors.

  Raises:
    DataError: raw data missing or not in the expected layout, unreadable
      files (without `skip_bad_files`), unpaired images or masks. A failed
      preparation leaves nothing under `data_dir` that a later run would use.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")
  cls = BUILDERS[name]
  data_dir = Path(data_dir).expanduser().absolute()
  root = Path(manual_dir).expanduser().absolute() if manual_dir else None
  kwargs = _builder_kwargs(cls, name, data_dir, root)
  builder = cls(**kwargs)
  version_dir = Path(builder.data_dir)
  source = _raw_source(root, skip_bad_files)
  if not _reusable_prepared_copy(name, builder, version_dir, source, root):
    _prepare_from_raw(cls, builder, name, kwargs, root, version_dir, data_dir, source,
                      skip_bad_files)
    builder = cls(**kwargs)
  return _open_prepared(name, builder, version_dir)


def _builder_kwargs(cls, name: str, data_dir: Path, root: Path | None) -> dict[str, Any]:
  """The arguments every builder of `name` in `data_dir` is made with (for
  `folder`: its config, named after the user's folder)."""
  kwargs: dict[str, Any] = dict(data_dir=os.fspath(data_dir),
                                file_format="array_record")
  if name == "folder":
    if root is None:
      raise _missing_manual_dir(cls, None)
    kwargs["config"] = folder_config(root)
  return kwargs


def _raw_source(root: Path | None, skip_bad_files: bool) -> dict[str, Any]:
  """What prepared data is made from: the raw folder (resolved path and a
  listing digest of names, sizes and mtimes) and the options that shape it;
  empty when the raw folder does not exist."""
  if root is None or not root.is_dir():
    return {}
  return {"root": os.fspath(root.resolve()), "fingerprint": fingerprint(root),
          "skip_bad_files": bool(skip_bad_files)}


def _reusable_prepared_copy(name: str, builder, version_dir: Path, source: dict[str, Any],
                            root: Path | None) -> bool:
  """Whether `version_dir` holds a prepared copy to use as it is.

  A copy made from another source than `source` (another folder, changed
  files, other options) is removed, to be prepared again. Without the raw
  folder the prepared copy is used, saying so when it came from elsewhere.
  """
  if not (version_dir / "dataset_info.json").is_file():
    return False
  meta = builder.info.metadata
  stored = {k: meta.get(k) for k in ("root", "fingerprint", "skip_bad_files")}
  if source and stored != source:
    changed = [k for k in source if stored.get(k) != source[k]]
    print(f"{name}: the data prepared in {version_dir} was made from "
          f"{stored.get('root') or 'an unrecorded source'}; {', '.join(changed)} "
          f"differ now ({root}), so it is prepared again", flush=True)
    shutil.rmtree(version_dir)
    return False
  if not source and root is not None and stored.get("root") not in (
      None, os.fspath(root.resolve())):
    # The raw folder is not needed once prepared; say which copy is used.
    print(f"{name}: {root} does not exist; using the data prepared in {version_dir} "
          f"from {stored['root']}", flush=True)
  return True


def _prepare_from_raw(cls, builder, name: str, kwargs: dict[str, Any], root: Path | None,
                      version_dir: Path, data_dir: Path, source: dict[str, Any],
                      skip_bad_files: bool) -> None:
  """Scans the raw folder `root` and writes the prepared copy to
  `version_dir`, refused while another live process prepares it; on any
  error, Ctrl-C or SIGTERM nothing it started is left for a later run."""
  if root is None or not root.is_dir() or not any(root.iterdir()):
    raise _missing_manual_dir(cls, root)
  records = builder.scan(root)
  print(f"{name}: preparing {_describe(records)} from {root} into {version_dir}",
        flush=True)
  if not sys.stderr.isatty():
    # TFDS's bars write cursor escapes (`[A`) that litter a log file.
    import tensorflow_datasets as tfds  # deferred: TFDS, only to prepare a data set
    tfds.disable_progress_bar()
  _check_known(cls, sorted({r.category for r in records}), len(records))
  builder = cls(skip_bad_files=skip_bad_files, records=records,
                extra_metadata=source, **kwargs)
  # SIGTERM raises, so TFDS's own clean-up of its `incomplete.*` folder
  # and ours below run on errors, Ctrl-C and SIGTERM alike.
  with processes.sigterm_raises():
    try:
      # The scratch folder (the download dir TFDS wants) is named with our
      # pid and host: it tells a later run that this preparation is live.
      with atomic.scratch_dir(version_dir.parent, version_dir.name) as dl:
        _remove_stale_incomplete(version_dir)
        builder.download_and_prepare(
            download_dir=os.fspath(dl),
            download_config=_download_config(root))
    except BaseException:
      _remove_empty_parents(version_dir, data_dir)
      raise


def _open_prepared(name: str, builder, version_dir: Path) -> DatasetHandle:
  """The prepared copy's test split and the per-example metadata the
  pipeline needs; refuses a copy whose metadata does not match it."""
  source = builder.as_data_source()["test"]
  meta = builder.info.metadata
  cats = np.asarray(meta.get("example_category", []), np.int32)
  labels = np.asarray(meta.get("example_label", []), np.int32)
  if len(cats) != len(source) or len(labels) != len(source) or not len(source):
    raise DataError(
        f"prepared data in {version_dir} is inconsistent ({len(source)} "
        f"examples, metadata for {len(cats)}); delete that folder to prepare "
        "it again")
  return DatasetHandle(
      name=name, source=source, categories=list(meta["categories"]),
      num_examples=len(source), example_category=cats, example_label=labels,
      data_dir=version_dir, skipped=list(meta.get("skipped", [])))


def _download_config(root: Path):
  import tensorflow_datasets as tfds  # deferred: TFDS, only to prepare a data set
  return tfds.download.DownloadConfig(manual_dir=os.fspath(root))
