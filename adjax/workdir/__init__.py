"""A run folder's layout, named in one place.

    run = Workdir("runs/demo")
    run.checkpoints           # runs/demo/checkpoints
    run.mode_config("predict")  # runs/demo/config_predict.json

Every module that reads or writes a part of a run folder asks `Workdir` for
its path; no other module spells out these names. The layout itself:

  config.json, config_<mode>.json   the training config; each other mode's own
  run_identity.json                 the training fields (`adjax.workdir.identity`)
  imported_from.json                the release checkpoint an imported head came from
  checkpoints/, data_state/         Orbax steps; per step the data-iterator state
                                    of each process and the checkpoint's digest
  results/                          per evaluation `<stem>.{json,md,csv,html}` and
                                    `<stem>.thresholds.json`
  heatmaps/<stem>/                  per evaluation, the heatmap panels
  thresholds.json                   the deployment thresholds of the zero-shot head
                                    (predict, export, Detector, page decide with them)
  thresholds.<mode>.json            those of another scoring mode (few_shot, batch,
                                    zero_shot+few_shot, zero_shot+batch)
  predictions/, unreadable.txt      predict's outputs; the inputs it could not read
  metrics.jsonl, tensorboard/       the training log
  banks/<data set>/<category>.bank.npz  few-shot banks of an evaluation (mode=build_bank)
  banks/<identity>.bank.npz         banks of Detector.use_references (predict, page, export)
  feature_cache/, text_cache/       default cache places (config fields override them)
  tokenizer/                        a random text tower's tokenizer
  .adjax.lock                       held by the run using the folder

Importing this stays light (no JAX, nothing else from adjax): the modules
that own a part's contents import `Workdir`, never the reverse.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

CONFIG_FILE = "config.json"
IDENTITY_FILE = "run_identity.json"
IMPORTED_FROM_FILE = "imported_from.json"
METRICS_FILE = "metrics.jsonl"
THRESHOLDS_FILE = "thresholds.json"
UNREADABLE_FILE = "unreadable.txt"
LOCK_FILE = ".adjax.lock"


@dataclasses.dataclass(frozen=True)
class Workdir:
  """A run folder: `Workdir("runs/demo").checkpoints` and so on.

  It only names paths: nothing is created or read on construction. It is an
  `os.PathLike` of its root, so it can stand where a folder path is taken.
  """

  root: Path

  def __post_init__(self):
    object.__setattr__(self, "root", Path(self.root))

  def __fspath__(self) -> str:
    return os.fspath(self.root)

  # ------------------------------------------------------------- files

  @property
  def config(self) -> Path:
    """The training config (mode=train); the other modes write `mode_config(mode)`."""
    return self.root / CONFIG_FILE

  def mode_config(self, mode: str) -> Path:
    """Where a run in `mode` keeps its resolved config: `config.json` for train,
    `config_<mode>.json` otherwise (a later evaluation does not replace the
    training config)."""
    return self.config if mode == "train" else self.root / f"config_{mode}.json"

  @property
  def run_identity(self) -> Path:
    return self.root / IDENTITY_FILE

  @property
  def imported_from(self) -> Path:
    """What `converters.head` imported the head from (an imported workdir only)."""
    return self.root / IMPORTED_FROM_FILE

  @property
  def thresholds(self) -> Path:
    """The deployment thresholds (predict, export, Detector decide with them)."""
    return self.root / THRESHOLDS_FILE

  def mode_thresholds(self, scoring: str = "zero_shot") -> Path:
    """The deployment thresholds of one scoring mode: `thresholds.json` for
    the zero-shot head, `thresholds.<mode>.json` for any other mode."""
    if not scoring or "/" in scoring or scoring.startswith("."):
      raise ValueError(f"scoring={scoring!r}: not a scoring mode")
    return self.thresholds if scoring == "zero_shot" else (
        self.root / f"thresholds.{scoring}.json")

  @property
  def metrics(self) -> Path:
    return self.root / METRICS_FILE

  @property
  def unreadable(self) -> Path:
    """The inputs a predict run could not read, when none could be read."""
    return self.root / UNREADABLE_FILE

  @property
  def lock(self) -> Path:
    return self.root / LOCK_FILE

  # ------------------------------------------------------------- folders

  @property
  def checkpoints(self) -> Path:
    return self.root / "checkpoints"

  @property
  def data_state(self) -> Path:
    """Per checkpointed step: each process's data-iterator state and the digest."""
    return self.root / "data_state"

  @property
  def results(self) -> Path:
    return self.root / "results"

  @property
  def heatmaps(self) -> Path:
    return self.root / "heatmaps"

  @property
  def predictions(self) -> Path:
    return self.root / "predictions"

  @property
  def tensorboard(self) -> Path:
    return self.root / "tensorboard"

  @property
  def banks(self) -> Path:
    """Few-shot memory banks (`adjax.workdir.banks`)."""
    return self.root / "banks"

  def category_bank(self, dataset: str, category: str) -> Path:
    """The few-shot bank an evaluation of `dataset` uses for `category`."""
    for part in (dataset, category):
      if not part or "/" in part or part.startswith("."):
        raise ValueError(f"{part!r}: not a data set or category name")
    return self.banks / dataset / f"{category}.bank.npz"

  def reference_bank(self, digest: str) -> Path:
    """A bank of `Detector.use_references`, named by its identity's digest."""
    return self.banks / f"{digest}.bank.npz"

  @property
  def feature_cache(self) -> Path:
    """The training feature cache's default place (`feature_cache_dir` overrides it)."""
    return self.root / "feature_cache"

  @property
  def text_cache(self) -> Path:
    """The text embeddings' default place (`text.cache_dir` overrides it)."""
    return self.root / "text_cache"

  @property
  def tokenizer(self) -> Path:
    """The byte-level tokenizer a randomly initialised text tower writes."""
    return self.root / "tokenizer"

  # ------------------------------------------------------------- per evaluation
  # An evaluation's files share a stem (`identity.results_stem`: the data set's
  # name, or `name@<digest>` beside another evaluation's results).

  def evaluation_thresholds(self, stem: str) -> Path:
    """The F1-max thresholds of one evaluation."""
    return self.results / f"{stem}.thresholds.json"

  def evaluation_page(self, stem: str) -> Path:
    """The HTML page of one evaluation."""
    return self.results / f"{stem}.html"

  def evaluation_heatmaps(self, stem: str) -> Path:
    return self.heatmaps / stem

  # ------------------------------------------------------------- questions

  def has_checkpoints(self) -> bool:
    """At least one numbered checkpoint step is there (complete or not)."""
    d = self.checkpoints
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())

  def results_complete(self) -> bool:
    """Some evaluation wrote its results."""
    return self.results.is_dir() and any(self.results.glob("*.json"))


@dataclasses.dataclass(frozen=True)
class Predictions:
  """predict's output folder: `Workdir.predictions`, built under a temporary
  name and then put in place whole.

    scores.csv, index.html, unreadable.txt
    heatmaps/<input path>.png, masks/..., overlays/...   (one per image)
  """

  root: Path

  def __post_init__(self):
    object.__setattr__(self, "root", Path(self.root))

  @property
  def scores(self) -> Path:
    return self.root / "scores.csv"

  @property
  def index(self) -> Path:
    return self.root / "index.html"

  @property
  def unreadable(self) -> Path:
    return self.root / UNREADABLE_FILE

  @staticmethod
  def relative(kind: str, name: str) -> str:
    """An image's file of one kind ("heatmaps", "masks", "overlays") as
    scores.csv and index.html name it, relative to the folder."""
    if kind not in ("heatmaps", "masks", "overlays"):
      raise ValueError(f"no prediction picture kind {kind!r}")
    return f"{kind}/{name}"

  def picture(self, kind: str, name: str) -> Path:
    return self.root / self.relative(kind, name)
