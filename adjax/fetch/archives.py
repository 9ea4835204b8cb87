"""Unpacking a downloaded archive into its data folder, atomically."""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

from adjax.common import atomic
from adjax.common.errors import UserError


class ArchiveError(UserError):
  """An archive that cannot be unpacked safely: one line naming it."""


def extract(archive: str | os.PathLike, dst: str | os.PathLike, what: str) -> Path:
  """Unpacks the tar archive (any compression) into the folder `dst`.

  The members are written to a temporary sibling that becomes `dst` only when
  every one is out, so `dst` is either complete or absent. A single top-level
  folder is stripped (archives differ in whether they wrap their content).
  Members that would land outside `dst`, links to outside it and device files
  are refused (tarfile's `data` filter).
  """
  archive, dst = Path(archive), Path(dst)
  try:
    tar = tarfile.open(archive, "r:*")
  except (tarfile.TarError, EOFError, OSError) as e:
    raise ArchiveError(f"{what}: {archive} is not a readable tar archive ({e})") from None
  with tar, atomic.atomic_dir(dst) as tmp:
    members = 0
    try:
      for member in tar:
        tar.extract(member, tmp, filter="data")
        members += 1
        if members % 2000 == 0:
          print(f"{what}: unpacked {members} files", file=sys.stderr, flush=True)
    except (tarfile.TarError, EOFError, OSError) as e:
      raise ArchiveError(f"{what}: cannot unpack {archive} ({type(e).__name__}: {e}); "
                         f"nothing was written to {dst}") from None
    entries = list(tmp.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
      inner = entries[0].rename(tmp / ".unwrapped")
      for child in list(inner.iterdir()):
        os.replace(child, tmp / child.name)
      inner.rmdir()
  return dst
