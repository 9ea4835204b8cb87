"""One file over HTTP(S): resumable, checksum-verified, atomic, with progress.

The bytes go to `.<name>.partial` beside the destination; an interrupted
download keeps them and the next call asks the server for the rest (an HTTP
Range request). Only a file whose sha256 matches is renamed to its final
name, so the final name never holds a partial or corrupt file. A mismatch
removes the partial file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from adjax.common import processes
from adjax.common.errors import UserError

CHUNK = 1 << 20
TIMEOUT_S = 30.0


class DownloadError(UserError):
  """A download that did not complete: one line naming the file and what to do."""


def partial_path(dst: Path) -> Path:
  return dst.parent / f".{dst.name}.partial"


def _size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  return f"{n:.1f} GB"


class Progress:
  """`what: 1.2 GB / 5.3 GB (23%), 41.0 MB/s`: rewritten in place on a
  terminal, one line every `every_s` seconds otherwise."""

  def __init__(self, what: str, total: int | None, start: int = 0, every_s: float = 10.0,
               stream=None):
    self.what, self.total, self.done = what, total, start
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.every_s = 0.5 if self.tty else every_s
    self.t0 = self.last = time.monotonic()
    self.start = start

  def line(self) -> str:
    rate = (self.done - self.start) / max(time.monotonic() - self.t0, 1e-6)
    of = f" / {_size(self.total)} ({100 * self.done / self.total:.0f}%)" if self.total else ""
    return f"{self.what}: {_size(self.done)}{of}, {_size(rate)}/s"

  def update(self, n: int) -> None:
    self.done += n
    now = time.monotonic()
    if now - self.last >= self.every_s:
      self.last = now
      self._write()

  def _write(self, end: str = "") -> None:
    text = self.line()
    if self.tty:
      self.stream.write("\r" + text + end)
    else:
      self.stream.write(text + "\n")
    self.stream.flush()

  def close(self) -> None:
    self._write("\n")


def _hash_prefix(path: Path) -> tuple["hashlib._Hash", int]:
  h = hashlib.sha256()
  n = 0
  with open(path, "rb") as f:
    while block := f.read(CHUNK):
      h.update(block)
      n += len(block)
  return h, n


def download(url: str, dst: str | os.PathLike, sha256: str, *, size: int | None = None,
             what: str | None = None) -> Path:
  """Downloads `url` to `dst` unless `dst` is there (it only ever holds a
  verified file); resumes a partial download; returns `dst`.

  Raises DownloadError (one line) when the server cannot be reached, the
  transfer stops early (the partial file is kept for the next call), or the
  digest differs (the partial file is removed).
  """
  dst = Path(dst)
  what = what or dst.name
  if dst.is_file():
    return dst
  if not url.startswith(("http://", "https://")):
    raise DownloadError(f"{what}: {url!r} is not an http(s) URL")
  dst.parent.mkdir(parents=True, exist_ok=True)
  part = partial_path(dst)
  h, have = _hash_prefix(part) if part.is_file() else (hashlib.sha256(), 0)
  if size is not None and have > size:
    part.unlink()
    h, have = hashlib.sha256(), 0
  request = urllib.request.Request(url, headers={"User-Agent": "adjax"})
  if have:
    request.add_header("Range", f"bytes={have}-")
  with processes.sigterm_raises():
    try:
      if size is None or have < size:   # (all there: a run stopped before the rename)
        h, have = _transfer(request, part, h, have, size, what, url)
    except urllib.error.HTTPError as e:
      if not (e.code == 416 and have):  # 416: nothing after `have`; the digest decides
        raise DownloadError(f"{what}: {url} answered HTTP {e.code} {e.reason}; "
                            "check the URL (data.sources) or try later") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
      reason = getattr(e, "reason", e)
      kept = (f"; {_size(have if not part.is_file() else part.stat().st_size)} kept in "
              f"{part}, the same command resumes") if part.is_file() else ""
      raise DownloadError(f"{what}: cannot download {url} ({reason}){kept}") from None
    except KeyboardInterrupt:
      if part.is_file():
        print(f"{what}: interrupted; {_size(part.stat().st_size)} kept in {part}, the "
              "same command resumes", file=sys.stderr, flush=True)
      raise
  digest = h.hexdigest()
  if digest != sha256.lower():
    part.unlink()
    raise DownloadError(
        f"{what}: sha256 {digest} of the {_size(have)} downloaded from {url} differs from "
        f"the published {sha256}; the download was removed (a changed or corrupt file: "
        "run again, or check data.sources)")
  os.replace(part, dst)
  return dst


def _transfer(request, part: Path, h, have: int, size: int | None, what: str,
              url: str) -> tuple:
  """Appends the response's body to `part`; returns (digest so far, bytes held)."""
  with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
    status = response.status
    if have and status == 200:     # the server ignored the Range: start over
      h, have = hashlib.sha256(), 0
    elif have and status != 206:
      raise DownloadError(f"{what}: {url} answered HTTP {status} to a resumed request")
    length = response.headers.get("Content-Length")
    total = size if size is not None else (have + int(length) if length else None)
    progress = Progress(what, total, have)
    # os.open: the file's mode follows the umask, as for any file the user makes.
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if have else os.O_TRUNC),
                 0o666)
    try:
      with os.fdopen(fd, "wb") as f:
        while True:
          try:
            block = response.read(CHUNK)
          except http.client.IncompleteRead as e:
            raise ConnectionError(f"connection closed after {_size(have)}") from e
          if not block:
            break
          f.write(block)
          h.update(block)
          have += len(block)
          if total is not None and have > total:
            break                  # more than announced: the digest decides
          progress.update(len(block))
    finally:
      progress.close()
    if total is not None and have < total:
      raise ConnectionError(f"connection closed after {_size(have)} of {_size(total)}")
  return h, have
