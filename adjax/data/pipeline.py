"""The grain input pipeline: shuffled, sharded, padded, checkpointable batches.

Index plan. For each epoch there is one global order of the (filtered)
examples: a permutation drawn from `(seed, epoch)` when training, the
stored order when evaluating. Global batch k covers positions
`[k*B*P, (k+1)*B*P)` of that order; process p takes the B positions
starting at `k*B*P + p*B`. So every process of a multi-host run reads its
own disjoint slice, all processes yield the same number of batches, and the
union over processes is the whole epoch. `batch_size` (B) is per process;
the global batch is `B * process_count` (P).

Training drops the last incomplete global batch of each epoch (default) and
repeats for `num_epochs` (None: forever), each epoch a new permutation.
Evaluation is one pass in stored order; positions past the end are padding
rows (`valid=False`, `index=-1`), so every example is seen exactly once and
no process runs out of batches early.

Because the plan is a pure function of the position in the stream, the
iterator state is just that position: `iterator.get_state()` /
`set_state()` resume exactly (with or without worker processes).
"""

from __future__ import annotations

import dataclasses
import io
import sys
from typing import Any, Sequence

from absl import flags
import grain
import numpy as np
from PIL import Image

from adjax.data import images


class _Slots:
  """Random-access list of one process's global example indices (-1: pad)."""

  def __init__(self, indices: np.ndarray, *, batch_size: int,
               process_index: int, process_count: int, shuffle: bool,
               seed: int, num_epochs: int | None, drop_remainder: bool):
    self.indices = np.asarray(indices, np.int64)
    self.n = len(self.indices)
    self.batch_size = batch_size
    self.process_index = process_index
    self.process_count = process_count
    self.shuffle = shuffle
    self.seed = seed
    self.steps_per_epoch = plan_steps(self.n, batch_size * process_count,
                                      drop_remainder)
    self.per_epoch = self.steps_per_epoch * batch_size
    self.length = (self.per_epoch * num_epochs if num_epochs is not None
                   else sys.maxsize)
    self._cache: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return self.length

  def order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return self.indices
    cached = self._cache
    if cached is not None and cached[0] == epoch:
      return cached[1]
    rng = np.random.default_rng([self.seed, epoch])
    order = self.indices[rng.permutation(self.n)]
    self._cache = (epoch, order)
    return order

  def __getitem__(self, i: int) -> int:
    if not 0 <= i < self.length:
      raise IndexError(f"slot {i} out of range [0, {self.length})")
    epoch, r = divmod(i, self.per_epoch)
    k, b = divmod(r, self.batch_size)
    pos = (k * self.process_count + self.process_index) * self.batch_size + b
    return int(self.order(epoch)[pos]) if pos < self.n else -1


def plan_steps(n: int, global_batch: int, drop_remainder: bool) -> int:
  steps = n // global_batch if drop_remainder else -(-n // global_batch)
  if steps == 0:
    raise ValueError(f"{n} examples cannot fill one global batch of "
                     f"{global_batch} with drop_remainder; use a smaller batch")
  return steps


class _Load:
  """Global example index -> preprocessed example (zeros for padding)."""

  def __init__(self, source, categories: Sequence[str], image_size: int,
               mask_threshold: float, strict_zero: bool):
    self.source = source
    self.cat_index = {c: i for i, c in enumerate(categories)}
    self.size = image_size
    self.threshold = mask_threshold
    self.strict_zero = strict_zero

  def __call__(self, index: int) -> dict[str, Any]:
    s = self.size
    if index < 0:
      return {"image": np.zeros((s, s, 3), np.uint8),
              "mask": np.zeros((s, s), np.float32), "label": np.int32(0),
              "category_index": np.int32(0), "valid": np.bool_(False),
              "has_mask": np.bool_(False), "index": np.int64(-1), "path": ""}
    ex = self.source[index]
    with Image.open(io.BytesIO(ex["image"])) as img:
      image = images.preprocess_image(img, s)
    with Image.open(io.BytesIO(ex["mask"])) as m:
      mask = images.preprocess_mask(m, s, threshold=self.threshold,
                                    strict_zero=self.strict_zero)
    cat = ex["category"]
    cat = cat.decode() if isinstance(cat, bytes) else str(cat)
    path = ex["path"]
    return {"image": image, "mask": mask, "label": np.int32(ex["label"]),
            "category_index": np.int32(self.cat_index[cat]),
            "valid": np.bool_(True), "has_mask": np.bool_(ex["has_mask"]),
            "index": np.int64(index),
            "path": path.decode() if isinstance(path, bytes) else str(path)}


def _stack(items: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  out = {k: np.stack([x[k] for x in items]) for k in items[0] if k != "path"}
  out["path"] = np.array([x["path"] for x in items], dtype=str)
  return out


@dataclasses.dataclass
class Loader:
  """Iterable of batches; `iter(loader)` gives a checkpointable iterator.

  Batches are dicts of numpy arrays: `image` uint8 RGB [B,S,S,3] (resized;
  the model normalises), `mask` float32 [B,S,S] in {0,1}, `label` int32 [B], `category_index` int32
  [B] (into `handle.categories`), `valid` bool [B] (False on padding),
  `has_mask` bool [B] (False on padding and on defect images of a folder
  category without ground truth), `index` int64 [B] (-1 on padding), `path`
  str [B] ("" on padding). B is the per-process batch size.
  """
  dataset: grain.IterDataset
  steps_per_epoch: int
  num_batches: int | None  # None: repeats forever
  num_examples: int  # real examples per epoch, over all processes
  batch_size: int
  global_batch_size: int

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset)

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("an infinitely repeating loader has no length")
    return self.num_batches


def _select(handle, categories: Sequence[str] | None) -> np.ndarray:
  if categories is None:
    return np.arange(handle.num_examples, dtype=np.int64)
  unknown = sorted(set(categories) - set(handle.categories))
  if unknown:
    raise ValueError(f"{handle.name} has no categories {unknown}; it has "
                     f"{handle.categories}")
  wanted = [handle.categories.index(c) for c in categories]
  idx = np.flatnonzero(np.isin(handle.example_category, wanted))
  return idx.astype(np.int64)


def steps_per_epoch(handle, *, batch_size: int, process_count: int = 1,
                    categories: Sequence[str] | None = None,
                    drop_remainder: bool = True) -> int:
  """Batches per epoch per process (the same on every process)."""
  return plan_steps(len(_select(handle, categories)),
                    batch_size * process_count, drop_remainder)


def make_loader(handle, *, image_size: int, batch_size: int, train: bool,
                seed: int = 0, mask_threshold: float = 0.5,
                mask_threshold_strict_zero: bool = False,
                process_index: int = 0, process_count: int = 1,
                worker_count: int = 0, num_threads: int = 4, prefetch: int = 4,
                num_epochs: int | None = None,
                categories: Sequence[str] | None = None,
                drop_remainder: bool = True) -> Loader:
  """Builds the input pipeline over a prepared data set.

  Args:
    handle: from `adjax.data.prepare`.
    image_size: S; images and masks are resized to S x S.
    batch_size: per-process batch size B.
    train: shuffle (a new permutation from `(seed, epoch)` every epoch) and
      repeat; otherwise one pass in stored order with padding.
    mask_threshold: masks are `> threshold` after the bilinear resize.
    mask_threshold_strict_zero: the release's VisA quirk: raw mask values,
      `> 0` after the resize.
    process_index, process_count: this process's shard of P processes.
    worker_count: grain worker processes (0: decode in this process's
      threads). Worker processes need the program to start under a
      `__main__` guard.
    num_threads: threads reading and decoding (per worker process).
    prefetch: batches buffered ahead (at least num_threads; per worker when
      worker_count > 0).
    num_epochs: training epochs (None: forever); evaluation is always one.
    categories: keep only these categories (names from `handle.categories`).
    drop_remainder: training only; drop each epoch's last incomplete global
      batch (else pad it with `valid=False` rows).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size < 1 or image_size < 1:
    raise ValueError(f"batch_size {batch_size} and image_size {image_size} "
                     "must be positive")
  indices = _select(handle, categories)
  slots = _Slots(indices, batch_size=batch_size, process_index=process_index,
                 process_count=process_count, shuffle=train, seed=seed,
                 num_epochs=num_epochs if train else 1,
                 drop_remainder=drop_remainder if train else False)
  load = _Load(handle.source, handle.categories, image_size, mask_threshold,
               mask_threshold_strict_zero)
  ds = grain.MapDataset.source(slots).map(load).batch(batch_size, batch_fn=_stack)
  num_threads = max(1, num_threads)
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(prefetch, num_threads)))
  if worker_count > 0:
    # grain reads its settings from absl flags; a program that did not start
    # through absl.app.run gets their defaults instead of an error.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=max(1, prefetch)))
  num_batches = (slots.length // batch_size
                 if slots.length != sys.maxsize else None)
  return Loader(dataset=it, steps_per_epoch=slots.steps_per_epoch,
                num_batches=num_batches, num_examples=len(indices),
                batch_size=batch_size, global_batch_size=batch_size * process_count)
