"""From a fresh machine to the paper's run: missing weights and data fetched.

- `ensure_weights(cfg)`: converted towers missing under `backbone.checkpoint`
  / `text.checkpoint` are fetched by `backbone.hub_id` / `text.hub_id`,
  converted and verified (`adjax.fetch.hub`).
- `ensure_dataset(cfg, name)`: a benchmark with a known source
  (`adjax.fetch.sources.DATA`) that is neither prepared nor on disk is
  downloaded, after its licence is printed and accepted (`data.download=True`
  or a yes at an interactive prompt), checked against its published sha256
  and unpacked into `data.manual_dirs.<name>`.

Every step is resumable (hub downloads and HTTP Range requests), atomic
(nothing appears under a final name before it is complete and verified) and
prints progress; every failure is one line (a `UserError`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from adjax.common.errors import UserError
from adjax.data.layouts import DatasetNotFoundError
from adjax.fetch import archives, http, sources
from adjax.fetch import hub
from adjax.fetch.hub import FetchError


class LicenceRefused(DatasetNotFoundError):
  """The user did not accept a data set's licence (for an evaluation target:
  listed as absent, like any missing target)."""


def ensure_weights(cfg, *, text: bool = True) -> bool:
  """Fetches the configured towers whose converted folders are missing;
  whether any was fetched."""
  fetched = False
  if not cfg.backbone.random_init and not Path(cfg.backbone.checkpoint).is_dir():
    hub.ensure(cfg.backbone.family, cfg.backbone.hub_id, cfg.backbone.checkpoint,
                   "backbone")
    fetched = True
  if text and not cfg.text.random_init and not Path(cfg.text.checkpoint).is_dir():
    hub.ensure("clip_text", cfg.text.hub_id, cfg.text.checkpoint, "text")
    fetched = True
  return fetched


def _prepared(cfg, name: str) -> bool:
  return any(Path(cfg.data.data_dir).glob(f"{name}/*/dataset_info.json"))


def ensure_datasets(cfg) -> None:
  """At start: the run's benchmarks with a known source that are neither
  prepared nor on disk are downloaded now (consent asked once each, before
  any weights are fetched or any step trained). Without consent and without
  a terminal nothing happens here: a missing training set then stops the
  run with the way to download it, a missing target is listed as absent."""
  names = [str(cfg.data.train)] if cfg.mode == "train" else []
  if cfg.mode in ("train", "evaluate") and (cfg.mode == "evaluate" or cfg.eval.enabled):
    names += [t.strip() for t in str(cfg.data.targets).split(",") if t.strip()]
  interactive = sys.stdin is not None and sys.stdin.isatty()
  for name in dict.fromkeys(names):
    if name not in cfg.data.manual_dirs or _prepared(cfg, name):
      continue
    override = str(cfg.data.sources.get(name, ""))
    if sources.data_source(name, override) is None:
      continue
    if not cfg.data.download and not interactive:
      continue
    try:
      ensure_dataset(cfg, name)
    except LicenceRefused:
      if cfg.mode == "train" and name == str(cfg.data.train):
        raise                 # a target refused is listed as absent at the end


# (id of the run's config, data set) refused at the prompt: asked once per run.
_REFUSED: set[tuple[int, str]] = set()


def _accepted(source: sources.DataSource, download: bool, what: str,
              missing: Exception | None) -> None:
  """Returns when the licence is accepted (data.download=True, or yes at a
  terminal). Without a terminal, `missing` (the not-found error) is raised
  again with the way to download named on its first line."""
  size = f"{source.size / 1e9:.1f} GB, " if source.size else ""
  where = f"licence {source.licence}: {source.licence_url} (data set page: {source.homepage})"
  interactive = sys.stdin is not None and sys.stdin.isatty()
  if not download and not interactive:
    first, _, rest = str(missing or f"{what}: not on disk").partition("\n")
    raise (type(missing) if missing is not None else LicenceRefused)(
        f"{first} (--config.data.download=True downloads it: {size}{where})"
        + (f"\n{rest}" if rest else ""))
  print(f"{what}: {size}{where}", file=sys.stderr, flush=True)
  if download:
    return
  try:
    answer = input(f"{what}: download it and accept its licence? [y/N] ")
  except EOFError:            # the terminal closed: no
    answer = ""
  if answer.strip().lower() not in ("y", "yes"):
    raise LicenceRefused(f"{what}: licence not accepted; nothing was downloaded")


def _refusal_remembered(cfg, name: str):
  """The key remembering a refusal; a data set refused earlier in this run
  is refused again without asking."""
  key = (id(cfg), name)
  if key in _REFUSED and not cfg.data.download:
    raise LicenceRefused(f"{name}: licence not accepted; nothing was downloaded")
  return key


def ensure_dataset(cfg, name: str, missing: Exception | None = None) -> bool:
  """Downloads and unpacks data set `name` into `data.manual_dirs.<name>`
  when it has a known source; False when it has none (nothing done)."""
  override = str(cfg.data.sources.get(name, ""))
  source = sources.data_source(name, override)
  if source is None:
    return False
  root = Path(cfg.data.manual_dirs[name])
  if root.is_dir() and any(root.iterdir()):
    return True
  key = _refusal_remembered(cfg, name)
  try:
    _accepted(source, bool(cfg.data.download), name, missing)
  except LicenceRefused:
    _REFUSED.add(key)
    raise
  archive = root.parent / "downloads" / source.archive
  print(f"{name}: downloading {source.url} to {archive} (resumable)", file=sys.stderr,
        flush=True)
  http.download(source.url, archive, source.sha256, size=source.size, what=name)
  print(f"{name}: sha256 verified; unpacking into {root}", file=sys.stderr, flush=True)
  if root.is_dir():           # an empty folder stands in the way of the rename
    root.rmdir()
  archives.extract(archive, root, name)
  os.unlink(archive)
  print(f"{name}: ready in {root} (the archive was removed)", file=sys.stderr, flush=True)
  return True


__all__ = ["FetchError", "LicenceRefused", "UserError", "ensure_dataset", "ensure_datasets",
           "ensure_weights"]
