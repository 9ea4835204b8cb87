"""Atomic writes: outputs appear complete under their final name or not at all.

Everything the project writes that a later run trusts (converted checkpoints,
prepared data sets, feature caches, result files) goes through these helpers:
the content is written under a temporary sibling name and renamed into place
only when it is complete, so an interrupted or failed write leaves nothing
behind at the destination.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
  """Yields a fresh temporary directory that becomes `dst` on success.

  Args:
    dst: final directory path.
    overwrite: replace an existing `dst`; otherwise an existing `dst` is an
      error (raised before anything is written).
  """
  dst = Path(dst).absolute()
  if dst.exists() and not overwrite:
    raise FileExistsError(
        f"{dst} already exists; remove it or pass an overwrite flag")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
  try:
    yield tmp
    if dst.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
      os.replace(dst, old / "x")
      os.replace(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike, mode: str = "w") -> Iterator:
  """Opens a temporary file beside `dst`; renames it to `dst` on success."""
  dst = Path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    os.replace(tmp, dst)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_text(dst: str | os.PathLike, text: str) -> None:
  with atomic_file(dst, "w") as f:
    f.write(text)


def write_bytes(dst: str | os.PathLike, data: bytes) -> None:
  with atomic_file(dst, "wb") as f:
    f.write(data)
