"""Data sets named in a config (a benchmark name, or a path to a user folder):
prepared once for training and evaluation (`prepare`), and their loaders (`loader`)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
import jax
from jax.experimental import multihost_utils
import numpy as np

from adjax import data, fetch


def targets(cfg) -> list[str]:
  """The data sets data.targets names, in order."""
  return [t.strip() for t in cfg.data.targets.split(",") if t.strip()]


def loader(cfg, handle, model, *, batch_size: int, train: bool, categories=None):
  """`data.make_loader` with the config's settings, for this process's share
  (of `categories` only, when given).

  `batch_size` is the global batch; the VisA mask quirk (SPEC section 9)
  follows `model.behaviour`.
  """
  return data.make_loader(
      handle, image_size=model.image_size, batch_size=batch_size // jax.process_count(),
      train=train, seed=cfg.seed,
      mask_threshold_strict_zero=(model.behaviour.visa_mask_strict_zero
                                  and handle.name == "visa"),
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=cfg.data.worker_count, prefetch=cfg.data.prefetch,
      categories=categories)


def prepare(cfg, target: str) -> "data.DatasetHandle":
  """`_prepare` on process 0 first, then on the others (they reuse its files)."""
  if jax.process_count() == 1:
    return _prepare(cfg, target)
  error = None
  if jax.process_index() == 0:
    try:
      handle = _prepare(cfg, target)
    except data.DataError as e:
      error = e
  multihost_utils.sync_global_devices(f"prepare {target}")
  if error is not None:
    raise error
  return handle if jax.process_index() == 0 else _prepare(cfg, target)


def _prepare(cfg, target: str) -> "data.DatasetHandle":
  """Prepares (first use) or opens `target` with the config's data settings.

  `target` is a name from `adjax.data.DATASETS` (its raw download is read from
  `data.manual_dirs.<name>`) or a path to a folder in MVTec layout
  (`<category>/test/<good|defect>/...`), prepared with the `folder` builder.

  Raises:
    data.DatasetNotFoundError: the raw data is not there (a missing target is
      listed, not fatal, when evaluating).
  """
  if target in data.DATASETS and target != "folder":
    if target not in cfg.data.manual_dirs:
      raise ValueError(f"config.data.manual_dirs has no entry for {target!r}")
    try:
      handle = data.prepare(target, manual_dir=cfg.data.manual_dirs[target],
                            data_dir=cfg.data.data_dir, skip_bad_files=cfg.data.skip_bad_files)
      handle.raw_dir = str(cfg.data.manual_dirs[target])
      return handle
    except data.DatasetNotFoundError as e:
      # Neither prepared nor on disk: downloaded when it has a published
      # source and its licence is accepted (adjax.fetch).
      if not fetch.ensure_dataset(cfg, target, missing=e):
        raise
    handle = data.prepare(target, manual_dir=cfg.data.manual_dirs[target],
                          data_dir=cfg.data.data_dir, skip_bad_files=cfg.data.skip_bad_files)
    handle.raw_dir = str(cfg.data.manual_dirs[target])
    return handle
  if Path(target).is_dir():
    handle = data.prepare("folder", manual_dir=target, data_dir=cfg.data.data_dir,
                          skip_bad_files=cfg.data.skip_bad_files)
    handle.label = Path(target).resolve().name
    handle.raw_dir = str(target)
    return handle
  raise data.DatasetNotFoundError(
      f"{target!r} is neither a data set name ({', '.join(data.DATASETS)}) nor an "
      "existing folder in MVTec layout (<category>/test/<good|defect>/...)")


def image_at(handle, index: int, image_size: int) -> np.ndarray:
  """Example `index` of a prepared data set, decoded and preprocessed to
  uint8 [S, S, 3] as the loaders feed it."""
  with Image.open(io.BytesIO(handle.source[index]["image"])) as img:
    return data.images.preprocess_image(img, image_size)


def as_str(x) -> str:
  """A stored string field (bytes in the prepared records) as str."""
  return x.decode() if isinstance(x, bytes) else str(x)
