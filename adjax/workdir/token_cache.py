"""The raw-token cache: the tapped blocks' patch tokens as the backbone returns
them (prefix tokens removed), and the global token, per example of a data set.

The neighbour modes (few_shot, batch, zero_shot+few_shot, zero_shot+batch)
score these raw tokens, not the head's standardised patches that
`feature_cache` holds. Stored on disk as float32 `.npy` files read and
written by rows (`RowFile`: only the rows in use are in memory)
(one per tapped block, [examples, patches, D], and the global tokens
[examples, D]) under `<dir>/<key>/`, keyed as the feature cache is
(`feature_cache.cache_key`: backbone checkpoint, image size, layers,
backbone dtype, data set, where and when it was prepared, its size): one
backbone pass feeds every neighbour mode of every later run. float32, so a
score from the cache equals one computed afresh.

Filled as a category is scored (`*.partial` files); published when every
example is stored (files renamed, then `meta.json` written last), with a
CRC32 per example checked, with the files' sizes, whenever it is opened: a
damaged cache is said in one line and computed again, never scored. Reading
goes through `Rows`, a per-layer view of some examples that reads only the
rows indexed, so a category (or one batch subset of it) is read from the
disk, never held whole. Size: examples x L x P x D x 4 bytes (the
demo's ViT-S/16 at 224, 4 blocks: 1.2 MB per image; ViT-L/16 at 512: 16 MiB).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import zlib

import numpy as np

from adjax.common import atomic
from adjax.workdir import feature_cache


class RowFile:
  """A float32 `.npy` array [N, ...] on disk, written and read by rows with
  `pwrite`/`pread`: only what is read is in the process's memory (a memmap's
  touched pages count in its resident size until the system reclaims them,
  which for a data set's tokens is gigabytes)."""

  def __init__(self, path, mode: str, shape=None):
    self.path = Path(path)
    if mode == "w+":
      created = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32,
                                          shape=tuple(shape))
      del created                              # the header written, the data sparse
    with open(self.path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read(f)
      self.offset = f.tell()
    if dtype != np.float32:
      raise ValueError(f"{self.path}: dtype {dtype}, expected float32")
    self.shape = tuple(shape)
    self.row_shape = self.shape[1:]
    self.row = int(np.prod(self.row_shape)) * 4
    self.fd = os.open(self.path, os.O_RDWR if mode != "r" else os.O_RDONLY)

  def __len__(self) -> int:
    return self.shape[0]

  def __setitem__(self, indices, values) -> None:
    values = np.ascontiguousarray(values, np.float32)
    for k, i in enumerate(np.asarray(indices).reshape(-1)):
      os.pwrite(self.fd, values[k].tobytes(), self.offset + int(i) * self.row)

  def __getitem__(self, idx) -> np.ndarray:
    if isinstance(idx, (int, np.integer)):
      return self[np.array([idx])][0]
    idx = np.arange(self.shape[0])[idx] if isinstance(idx, slice) else np.asarray(idx)
    out = np.empty((len(idx),) + self.row_shape, np.float32)
    for k, i in enumerate(idx):
      data = os.pread(self.fd, self.row, self.offset + int(i) * self.row)
      out[k] = np.frombuffer(data, np.float32).reshape(self.row_shape)
    return out

  def flush(self) -> None:
    os.fsync(self.fd)

  def close(self) -> None:
    os.close(self.fd)


class Rows:
  """One layer's tokens of some examples, [n, h, w, D] float32, read on indexing."""

  def __init__(self, array, rows: np.ndarray, grid: tuple[int, int]):
    self.array, self.rows, self.grid = array, np.asarray(rows, np.int64), tuple(grid)
    self.shape = (len(self.rows),) + self.grid + (array.shape[-1],)
    self.dtype = np.dtype(np.float32)
    self.ndim = 4

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, idx) -> np.ndarray:
    rows = self.rows[idx]
    if np.ndim(rows) == 0:
      return np.asarray(self.array[int(rows)], np.float32).reshape(self.shape[1:])
    return np.asarray(self.array[rows], np.float32).reshape((len(rows),) + self.shape[1:])

  def take(self, idx) -> "Rows":
    """The view of a subset (`idx` into this view's rows), still unread."""
    return Rows(self.array, self.rows[idx], self.grid)


class TokenCache:

  FILES = ("meta.json", "glob.npy", "filled.npy", "digests.npy")

  def __init__(self, directory, key: str, num_examples: int, layers: int, patches: int,
               dim: int, say=print):
    self.dir = Path(directory) / key
    self.dir.mkdir(parents=True, exist_ok=True)
    self.layers, self.complete = layers, False
    self.filled = np.zeros(num_examples, bool)
    self.shapes = {"tokens": [num_examples, patches, dim], "glob": [num_examples, dim],
                   "layers": layers}
    meta = self.dir / "meta.json"
    if meta.exists():
      damage = self._open_published(meta)
      if damage is None:
        self.complete = True
        return
      say(f"raw-token cache {self.dir} is damaged ({damage}); computing it again")
      for name in self.FILES + tuple(self._layer_name(l) for l in range(layers)):
        (self.dir / name).unlink(missing_ok=True)
    self.tokens = [self._open(self.dir / (self._layer_name(l) + ".partial"), "w+",
                              self.shapes["tokens"]) for l in range(layers)]
    self.glob = self._open(self.dir / "glob.npy.partial", "w+", self.shapes["glob"])

  @staticmethod
  def _layer_name(l: int) -> str:
    return f"layer{l}.npy"

  @staticmethod
  def _open(path, mode, shape=None):
    return RowFile(path, mode, shape)

  def _names(self) -> list[str]:
    return [self._layer_name(l) for l in range(self.layers)] + ["glob.npy"]

  def _open_published(self, meta: Path) -> str | None:
    try:
      stored = json.loads(meta.read_text())
    except ValueError:
      return "unreadable meta.json"
    if stored.get("shapes") != self.shapes:
      return "written for other shapes"
    try:
      for name in self._names():
        size = (self.dir / name).stat().st_size
        if size != stored.get("bytes", {}).get(name):
          return f"{name} has {size} bytes, expected {stored.get('bytes', {}).get(name)}"
      self.tokens = [self._open(self.dir / self._layer_name(l), "r")
                     for l in range(self.layers)]
      self.glob = self._open(self.dir / "glob.npy", "r")
    except (OSError, ValueError) as e:
      return str(e)
    filled, damage = feature_cache.read_index(self.dir, len(self.filled), self._digest)
    if damage is None:
      self.filled = filled
    return damage

  def _digest(self, i: int) -> int:
    crc = zlib.crc32(self.glob[i].tobytes())
    for layer in self.tokens:
      crc = zlib.crc32(layer[i].tobytes(), crc)
    return crc

  def has(self, indices) -> bool:
    indices = np.asarray(indices)
    return bool(np.all(self.filled[indices[indices >= 0]]))

  def put(self, indices, tokens, glob) -> None:
    """tokens [L, B, P, D], glob [B, D] of examples `indices` (-1: padding)."""
    if self.complete:
      return
    indices = np.asarray(indices)
    keep = indices >= 0
    for l, layer in enumerate(self.tokens):
      layer[indices[keep]] = np.asarray(tokens[l])[keep].reshape(
          (int(keep.sum()),) + layer.row_shape)
    self.glob[indices[keep]] = np.asarray(glob)[keep]
    self.filled[indices[keep]] = True

  def rows(self, indices, grid) -> tuple[list[Rows], np.ndarray]:
    """Per-layer views [n, h, w, D] of examples `indices`, and their global tokens."""
    indices = np.asarray(indices)
    return ([Rows(layer, indices, grid) for layer in self.tokens],
            np.asarray(self.glob[indices], np.float32))

  def publish(self) -> bool:
    """Publishes the cache once every example is stored; True when complete."""
    if self.complete:
      return True
    if not self.filled.all():
      for arr in self.tokens + [self.glob]:
        arr.flush()
      return False
    for arr in self.tokens + [self.glob]:
      arr.flush()
    np.save(self.dir / "filled.npy", self.filled)
    np.save(self.dir / "digests.npy",
            np.array([self._digest(i) for i in range(len(self.filled))], np.uint32))
    sizes = {}
    for name in self._names():
      os.replace(self.dir / (name + ".partial"), self.dir / name)
      sizes[name] = (self.dir / name).stat().st_size
    for arr in self.tokens + [self.glob]:       # reopened for reading under the final names
      arr.close()
    self.tokens = [self._open(self.dir / self._layer_name(l), "r") for l in range(self.layers)]
    self.glob = self._open(self.dir / "glob.npy", "r")
    # meta.json last: its presence publishes the cache.
    atomic.write_text(self.dir / "meta.json", json.dumps({"shapes": self.shapes,
                                                          "bytes": sizes}))
    self.complete = True
    return True


def open_cache(directory, backbone_id: str, model, handle, *, backbone_dtype: str,
               say=print) -> TokenCache:
  """The raw-token cache of `handle` under `model`'s backbone, size and layers."""
  key = feature_cache.cache_key(
      kind="raw_tokens", backbone=backbone_id, image_size=model.image_size,
      layers=model.layers, dtype=backbone_dtype, dataset=handle.name,
      prepared=str(handle.data_dir),
      prepared_at=(handle.data_dir / "dataset_info.json").stat().st_mtime_ns,
      examples=handle.num_examples)
  h, w = model.grid
  return TokenCache(Path(directory) / "raw_tokens", key, handle.num_examples,
                    len(model.layers), h * w, model.backbone.dim, say=say)
