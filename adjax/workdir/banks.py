"""The few-shot memory bank as an artifact: built once, stored, checked on load.

A `Bank` is what few-shot scoring compares against, in every path
(evaluation's `scoring_modes.NeighbourScorer`, `Detector`, the page, the
export): per layer and neighbourhood size r, the LNAMD features of the
reference patches kept (after any coreset), `features` [L, R, K, D] float32,
with `origin` [L, R, K] (the reference each patch comes from, for
leave-one-out calibration), and its identity:

- `bank`: the references' identity (`thresholds.bank_identity`: their
  model-size pixels' digests, their number, the coreset settings), the key
  a few-shot threshold record is checked against;
- `references`: the references' names (paths, or "<array>");
- `backbone`, `layers`, `image_size`, `grid`, `r_list`: what made the features.

Stored as one `.npz` (written atomically) holding the arrays, the identity
as JSON and a SHA-256 over both (`content_digest`): on load a file that does
not read, or whose digest differs, is refused in one line (`BankError`), and
so is a bank made for another backbone, layers, image size or r_list
(`Bank.check`). Sizes: K = references x patches without a coreset, so a
bank is L x R x K x D x 4 bytes (README, "Bank sizes").
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
import zipfile

import numpy as np

from adjax import coreset as coreset_lib
from adjax import neighbors
from adjax.common import atomic
from adjax.common.errors import UserError
from adjax.workdir import thresholds

FORMAT_VERSION = 1
SUFFIX = ".bank.npz"


class BankError(UserError, ValueError):
  """A stored bank that cannot be used (damaged, or made for another model)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Bank:
  features: np.ndarray     # [L, R, K, D] float32
  origin: np.ndarray       # [L, R, K] int32
  identity: dict

  @property
  def bank(self) -> dict:
    """The references' identity (`thresholds.bank_identity`)."""
    return self.identity["bank"]

  @property
  def references(self) -> list[str]:
    return list(self.identity["references"])

  @property
  def image_digests(self) -> list[str]:
    return list(self.identity["image_digests"])

  @property
  def count(self) -> int:
    """Number of reference images."""
    return len(self.identity["image_digests"])

  @property
  def nbytes(self) -> int:
    return int(self.features.nbytes)

  def content_digest(self) -> str:
    return content_digest(self.features, self.origin, self.identity)

  def check(self, *, backbone: str, layers, image_size: int, r_list, where: str) -> None:
    """Refuses (BankError, one line) a bank made for another model."""
    want = {"backbone": str(backbone), "layers": [int(l) for l in layers],
            "image_size": int(image_size), "r_list": [int(r) for r in r_list]}
    diffs = [f"{k} {self.identity.get(k)!r} (expected {v!r})" for k, v in want.items()
             if self.identity.get(k) != v]
    if diffs:
      raise BankError(f"{where}: a bank made for another model: {'; '.join(diffs)}; build "
                      "it again for this one (mode=build_bank, or use_references)")

  def without(self, drop) -> "Bank":
    """The bank less the patches of references `drop` (indices): each dropped
    patch replaced by a kept patch of its layer and r (a duplicate changes
    no nearest distance), so the array keeps its shape."""
    drop = np.asarray(sorted(set(int(i) for i in drop)), np.int32)
    if not len(drop):
      return self
    gone = np.isin(self.origin, drop)
    feats = self.features.copy()
    for l in range(feats.shape[0]):
      for k in range(feats.shape[1]):
        kept = np.flatnonzero(~gone[l, k])
        if not len(kept):
          raise BankError(f"every patch of the bank comes from references {drop.tolist()}")
        feats[l, k, gone[l, k]] = feats[l, k, kept[0]]
    return Bank(feats, np.where(gone, -1, self.origin).astype(np.int32), self.identity)


def content_digest(features: np.ndarray, origin: np.ndarray, identity: dict) -> str:
  h = hashlib.sha256()
  for a in (features, origin):
    a = np.ascontiguousarray(a)
    h.update(f"{a.shape}{a.dtype.str}".encode())
    h.update(a.tobytes())
  h.update(json.dumps(identity, sort_keys=True).encode())
  return h.hexdigest()


def identity_digest(identity: dict) -> str:
  """A short name for a bank's identity (its stored file's name)."""
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def build(reference_tokens, *, names, image_digests, backbone: str, layers, image_size: int,
          r_list, coreset: float = 0.0, coreset_seed: int = 0, mesh=None) -> Bank:
  """The bank of raw reference tokens [L, M, h, w, D] (or per-layer arrays),
  `neighbors.bank_arrays` with its identity."""
  settings = coreset_lib.settings(coreset, coreset_seed)
  feats, origin = neighbors.bank_arrays(reference_tokens, r_list, coreset=coreset,
                                        coreset_seed=coreset_seed, mesh=mesh)
  refs = neighbors._layers(reference_tokens)
  grid = list(refs[0].shape[1:3])
  ident = {"format_version": FORMAT_VERSION,
           "bank": thresholds.bank_identity(image_digests, settings),
           "references": [str(n) for n in names],
           "image_digests": [str(d) for d in image_digests],
           "backbone": str(backbone), "layers": [int(l) for l in layers],
           "image_size": int(image_size), "grid": [int(g) for g in grid],
           "r_list": [int(r) for r in r_list], "coreset": settings,
           "shape": list(feats.shape)}
  return Bank(feats, origin, ident)


def save(bank: Bank, path: str | os.PathLike) -> Path:
  """Writes `bank` to `path` atomically, with its content digest."""
  path = Path(path)
  buf = io.BytesIO()
  np.savez(buf, features=bank.features, origin=bank.origin,
           identity=np.array(json.dumps(bank.identity, sort_keys=True)),
           digest=np.array(bank.content_digest()))
  atomic.write_bytes(path, buf.getvalue())
  return path


def load(path: str | os.PathLike) -> Bank:
  """The bank stored at `path`; refused (BankError, one line) when the file
  does not read or its content differs from its recorded digest."""
  path = Path(path)
  if not path.is_file():
    raise BankError(f"{path}: no such bank file (build it with mode=build_bank or "
                    "Detector.use_references)")
  try:
    with np.load(path, allow_pickle=False) as f:
      feats, origin = f["features"], f["origin"]
      ident, recorded = json.loads(str(f["identity"])), str(f["digest"])
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise BankError(f"{path}: damaged bank file, unreadable ({why[:200]}); build it again "
                    "(mode=build_bank, or use_references)") from None
  if content_digest(feats, origin, ident) != recorded:
    raise BankError(f"{path}: damaged bank file, its content differs from the digest "
                    "recorded when it was written; build it again (mode=build_bank, or "
                    "use_references)")
  if ident.get("format_version") != FORMAT_VERSION:
    raise BankError(f"{path}: bank format {ident.get('format_version')!r}, expected "
                    f"{FORMAT_VERSION}; build it again")
  return Bank(feats, origin, ident)
