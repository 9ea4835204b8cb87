"""The feature cache: frozen-backbone features stored per example.

Both towers are frozen and training uses no augmentation, so an image's
backbone features are the same every epoch. With a cache the first epoch
stores each training example's standardised patch tokens and cls tokens
(bfloat16 by default) and later epochs run only the adapters. The disk cache
is keyed by everything that determines the features (backbone checkpoint,
image size, layers, dtype, data set and its size) and is only trusted once a
complete first epoch has been written (the files are renamed into place and
meta.json written last). Each stored example's CRC32 is recorded when the
cache is published and checked, with the files' sizes, whenever it is opened:
a damaged cache is reported by path and computed again, never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import zlib

import ml_dtypes
import numpy as np

from adjax.common import atomic


def evaluation_dir(cfg) -> Path:
  """Where evaluation's caches live (`eval.feature_cache_dir`, by default
  `<data.data_dir>/feature_cache`, beside the prepared data, not in a run
  folder: every run over the data shares them)."""
  return (Path(cfg.eval.feature_cache_dir) if cfg.eval.feature_cache_dir
          else Path(cfg.data.data_dir) / "feature_cache")


def cache_key(**parts) -> str:
  blob = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


def open_cache(mode: str, directory: Path, backbone_id: str, model, handle, *,
               dtype: str, backbone_dtype: str) -> "FeatureCache":
  """The cache of `handle`'s features under `model`'s backbone, size and layers.

  The key holds everything that determines the features, and nothing about
  the head: any head over the same backbone, size and layers shares it.
  """
  import jax  # deferred: JAX; a workdir is read without it
  grid = model.grid
  key = cache_key(
      backbone=backbone_id, image_size=model.image_size, layers=model.layers,
      dtype=backbone_dtype, cache_dtype=dtype, dataset=handle.name,
      prepared=str(handle.data_dir),
      prepared_at=(handle.data_dir / "dataset_info.json").stat().st_mtime_ns,
      examples=handle.num_examples, process=(jax.process_index(), jax.process_count()))
  return FeatureCache(mode, handle.num_examples, len(model.layers), grid[0] * grid[1],
                      model.backbone.dim, dtype, directory, key)


def read_index(directory: Path, n: int, digest) -> tuple[np.ndarray | None, str | None]:
  """The filled flags of a published cache of `n` examples (`filled.npy`),
  each filled example checked against its CRC32 recorded at publication
  (`digests.npy`, recomputed by `digest(i)`): (filled, None), or (None,
  what is wrong)."""
  try:
    filled = np.load(directory / "filled.npy")
    digests = np.load(directory / "digests.npy")
  except (OSError, ValueError) as e:
    return None, str(e)
  if filled.shape != (n,) or digests.shape != (n,):
    return None, "index files of another size"
  bad = [i for i in np.flatnonzero(filled) if digest(i) != digests[i]]
  if bad:
    return None, f"{len(bad)} examples fail their checksum, e.g. example {bad[0]}"
  return filled, None


class FeatureCache:
  """Per-example features, indexed by the data set's example index.

  mode "memory" keeps them in host RAM; mode "disk" in a memory-mapped .npy
  pair under `directory/<key>/`, written as `*.partial` during the first epoch
  and renamed when every example has been stored, so an interrupted first
  epoch is recomputed rather than trusted.

  Memory: num_examples * L * (N + 1) * D * itemsize bytes (ViT-L/16 at 512,
  MVTec's 1725 images, bfloat16: about 14.5 GB), held in RAM or on disk. In a
  multi-host run every process holds the whole cache: the first epoch's
  features are gathered to all processes, so that every process sees the
  same hits and takes the same (collective) step.
  """

  def __init__(self, mode: str, num_examples: int, layers: int, tokens: int, dim: int,
               dtype: str = "bfloat16", directory: str | os.PathLike | None = None,
               key: str = ""):
    if mode not in ("memory", "disk"):
      raise ValueError(f"feature_cache={mode!r}; expected none, memory or disk")
    self.mode = mode
    self.dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    self.filled = np.zeros(num_examples, bool)
    pshape = (num_examples, layers, tokens, dim)
    cshape = (num_examples, layers, dim)
    self.complete = False
    if mode == "memory":
      self.patches = np.zeros(pshape, self.dtype)
      self.cls = np.zeros(cshape, self.dtype)
      return
    if directory is None:
      raise ValueError("a disk feature cache needs feature_cache_dir")
    self.dir = Path(directory) / key
    self.dir.mkdir(parents=True, exist_ok=True)
    meta = self.dir / "meta.json"
    want = {"shape_patches": list(pshape), "shape_cls": list(cshape),
            "dtype": str(self.dtype)}
    if meta.exists():
      damage = self._open_published(meta, want, pshape, cshape)
      if damage is None:
        self.complete = True
        return
      print(f"feature cache {self.dir} is damaged ({damage}); computing it again",
            flush=True)
      self.filled[:] = False
      for name in ("meta.json", "patches.npy", "cls.npy", "filled.npy", "digests.npy"):
        (self.dir / name).unlink(missing_ok=True)
    self._meta, self._want = meta, want
    self.patches = self._open(self.dir / "patches.npy.partial", pshape, "w+")
    self.cls = self._open(self.dir / "cls.npy.partial", cshape, "w+")

  def _open_published(self, meta: Path, want: dict, pshape, cshape) -> str | None:
    """Opens a published cache; returns what is wrong with it, or None.

    The files must have the sizes their shapes imply, and every stored
    example must match the checksum taken when the cache was published.
    """
    try:
      stored = json.loads(meta.read_text())
    except ValueError:
      return "unreadable meta.json"
    if {k: stored.get(k) for k in want} != want:
      return "written for other shapes"
    try:
      for name, expect in (("patches.npy", stored.get("bytes_patches")),
                           ("cls.npy", stored.get("bytes_cls"))):
        size = (self.dir / name).stat().st_size
        if size != expect:
          return f"{name} has {size} bytes, expected {expect}"
      self.patches = self._open(self.dir / "patches.npy", pshape, "r+")
      self.cls = self._open(self.dir / "cls.npy", cshape, "r+")
    except (OSError, ValueError) as e:
      return str(e)
    filled, damage = read_index(self.dir, len(self.filled), self._digest)
    if damage is None:
      self.filled = filled
    return damage

  def _digest(self, i: int) -> int:
    return zlib.crc32(self.cls[i].tobytes(), zlib.crc32(self.patches[i].tobytes()))

  def _open(self, path, shape, mode):
    raw = np.lib.format.open_memmap(
        path, mode=mode, dtype=np.uint16 if self.dtype == ml_dtypes.bfloat16 else self.dtype,
        shape=shape if mode == "w+" else None)
    return raw.view(self.dtype) if self.dtype == ml_dtypes.bfloat16 else raw

  def has(self, indices: np.ndarray) -> bool:
    indices = np.asarray(indices)
    return bool(np.all(self.filled[indices[indices >= 0]]))

  def put(self, indices: np.ndarray, patches: np.ndarray, cls: np.ndarray) -> None:
    """patches [L, B, N, D], cls [L, B, D] for rows `indices` (-1 = padding)."""
    indices = np.asarray(indices)
    keep = indices >= 0
    self.patches[indices[keep]] = np.moveaxis(np.asarray(patches), 1, 0)[keep].astype(self.dtype)
    self.cls[indices[keep]] = np.moveaxis(np.asarray(cls), 1, 0)[keep].astype(self.dtype)
    self.filled[indices[keep]] = True

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (patches [L, B, N, D], cls [L, B, D]) as float32."""
    indices = np.asarray(indices)
    return (np.moveaxis(self.patches[indices].astype(np.float32), 0, 1),
            np.moveaxis(self.cls[indices].astype(np.float32), 0, 1))

  def finish_epoch(self) -> None:
    """Publishes the disk cache after a complete first epoch.

    Examples this process did not see in that epoch (dropped remainders, other
    processes' shards) stay marked unfilled and are computed when they come.
    """
    if self.mode != "disk" or self.complete:
      return
    for name in ("patches", "cls"):
      arr = getattr(self, name)
      (arr if hasattr(arr, "flush") else arr.base).flush()
    np.save(self.dir / "filled.npy", self.filled)
    digests = np.zeros(self.filled.shape, np.uint32)
    for i in np.flatnonzero(self.filled):
      digests[i] = self._digest(i)
    np.save(self.dir / "digests.npy", digests)
    sizes = {}
    for name in ("patches", "cls"):
      os.replace(self.dir / f"{name}.npy.partial", self.dir / f"{name}.npy")
      sizes[f"bytes_{name}"] = (self.dir / f"{name}.npy").stat().st_size
    # meta.json last: its presence publishes the cache.
    atomic.write_text(self._meta, json.dumps(dict(self._want, **sizes)))
    self.complete = True


def run_batch(cache, local: dict, mesh, hit: bool, from_features, from_images):
  """One batch through the feature cache, the dispatch shared by training and
  evaluation: on a hit the stored features of `local["index"]` are placed as
  a global batch {"patches", "cls"} and `from_features(batch)` runs the head
  only; otherwise `local["image"]` is placed as {"image"} and
  `from_images(batch)` runs the backbone too; with a cache it returns
  (outputs, (patches, cls)) and those features of every row of the global
  batch are stored (every process stores them all, so the caches stay
  identical and every process takes the same branch). -> the outputs."""
  from adjax.common import sharding  # deferred: JAX; a workdir is read without it
  if hit:
    patches, cls = cache.get(local["index"])
    return from_features(sharding.global_batch({"patches": patches, "cls": cls}, mesh,
                                                {"patches": 1, "cls": 1}))
  images = sharding.global_batch({"image": local["image"]}, mesh)
  if cache is None:
    return from_images(images)
  outputs, (patches, cls) = from_images(images)
  cache.put(sharding.all_rows(local["index"]), sharding.all_rows(patches, 1),
            sharding.all_rows(cls, 1))
  return outputs
