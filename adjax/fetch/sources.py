"""Where the paper's data sets and weights come from: the one table of sources.

The URLs, sizes and sha256 digests below are the ones other projects publish
for these archives (the digests agree across several of them); they were not
re-checked against the live sites from here. A mirror or a local copy is
named with `data.sources.<name>` ("URL#sha256=HEX").
"""

from __future__ import annotations

import dataclasses
import re

from adjax.common.errors import UserError


@dataclasses.dataclass(frozen=True)
class DataSource:
  name: str              # the data set's name in adjax.data.DATASETS
  url: str               # http(s) URL of the archive
  sha256: str            # hex digest of the whole archive
  size: int | None       # bytes, when published (progress and a bound on the read)
  archive: str           # file name the archive is stored under while downloading
  licence: str           # short name of the licence
  licence_url: str
  homepage: str


DATA: dict[str, DataSource] = {
    "mvtec_ad": DataSource(
        name="mvtec_ad",
        url=("https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
             "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"),
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        size=5_264_982_680,
        archive="mvtec_anomaly_detection.tar.xz",
        licence="CC BY-NC-SA 4.0 (non-commercial use only)",
        licence_url="https://creativecommons.org/licenses/by-nc-sa/4.0/",
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad"),
    "visa": DataSource(
        name="visa",
        url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        size=1_929_840_640,
        archive="VisA_20220922.tar",
        licence="the terms of spot-diff's LICENSE-DATASET (read them there)",
        licence_url="https://github.com/amazon-science/spot-diff/blob/main/LICENSE-DATASET",
        homepage="https://github.com/amazon-science/spot-diff"),
}

_OVERRIDE = re.compile(r"^(?P<url>https?://\S+)#sha256=(?P<sha>[0-9a-fA-F]{64})$")


def data_source(name: str, override: str = "") -> DataSource | None:
  """The source of data set `name` (None: no download is known for it).

  `override` ("URL#sha256=HEX", from data.sources.<name>) replaces the URL and
  digest and keeps the licence; the size is then unknown.
  """
  base = DATA.get(name)
  if not override:
    return base
  m = _OVERRIDE.match(override.strip())
  if not m:
    raise UserError(f"data.sources.{name}={override!r}: expected "
                    "'http(s)://HOST/PATH#sha256=<64 hex digits>'")
  if base is None:
    raise UserError(f"data.sources.{name}: no licence is known for {name!r}; only "
                    f"{', '.join(sorted(DATA))} can be downloaded")
  archive = m["url"].rsplit("/", 1)[-1].split("?")[0] or base.archive
  return dataclasses.replace(base, url=m["url"], sha256=m["sha"].lower(), size=None,
                             archive=archive)
