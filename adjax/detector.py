"""`Detector`: the Python API over a trained (or imported) workdir.

    from adjax import Detector
    det = Detector.from_workdir("runs/demo")
    pred = det.predict(["a.png", "b.png"], object_name="tile")
    pred.scores, pred.maps[0].shape, pred.decisions

`--config.mode=predict` itself scores through this class (adjax/predict.py
only chooses the files and writes the outputs), so both give the same numbers
and decisions. It builds the config checks, the towers, the head of the
latest checkpoint with its identity check, the compiled eval step of
`adjax.scorer.Scorer` and the checked `thresholds.json` (the workdir's, else
the `init_from` run's; `adjax.workdir.thresholds.resolve` per object) once, and then
scores any number of images: paths, folders, globs, PIL images and uint8
arrays, of any size. Images are preprocessed as the prediction reader does
(`adjax.data.images`), batched at `predict.batch_size` (the last batch padded,
so the step compiles once), and each map is resized to its image's own size.

Scoring modes (`predict(..., scoring=...)`, as `adjax.scoring_modes` scores them):
- `zero_shot`: the trained head (the default).
- `few_shot`: each image against the bank of the normal images given to
  `use_references` (an `adjax.workdir.banks.Bank`, built once and stored in
  the workdir, reloaded from there for the same images), or a stored bank
  given to `use_bank`; `neighbors.bank_maps`.
- `batch`: the images of one call against each other (at least 5),
  `neighbors.mutual_maps`, image scores refined by RsCIN (`eval.rscin_k`).
The neighbour modes use `eval.r_list`, need neither the head nor the text
tower (a Detector built with `predict.scoring=few_shot|batch` loads neither,
and needs no checkpoint).

Every mode decides with its own deployment record
(`Workdir.mode_thresholds`: thresholds.json for zero_shot,
thresholds.few_shot.json, thresholds.batch.json), checked against what the
mode's scores depend on (`thresholds.model_for`; few_shot also against the
bank in use, `thresholds.resolve`), read when the mode is first used; from
an evaluation (`eval.set_thresholds=True`) or from normal images only
(`calibrate`). Without a record (nor `predict.threshold >= 0`) a mode's
predictions are undecided: no decisions, no masks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

from PIL import Image
from flax import nnx
import jax
import numpy as np

from adjax import coreset, data, loading, metrics, modes, neighbors, scoring_modes
from adjax import towers as towers_lib
from adjax.common import sharding
from adjax.common.errors import UserError
from adjax.config import check as config_check
from adjax.config import load as run_config
from adjax.data import images as data_images
from adjax.scorer import Scorer
from adjax.workdir import Workdir, banks, run_log, thresholds

# Scoring modes `Detector.predict` supports (the page's mode selector lists them).
SCORING_MODES = ("zero_shot", "few_shot", "batch")


class DetectorError(UserError, ValueError):
  """Unusable input to the Detector (the message names it)."""


def map_at(amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """A model-size map [S, S] -> float32 [H, W]: PIL bilinear resize to (H, W)."""
  img = Image.fromarray(np.asarray(amap, np.float32), mode="F")
  return np.asarray(img.resize((hw[1], hw[0]), Image.BILINEAR), np.float32)


@dataclasses.dataclass
class Prediction:
  """What `Detector.predict` returns, one entry per readable image, in input order.

  scores: float32 [N] image scores. maps: float32 [H, W] per image, at that
  image's own size. masks: bool [H, W] per image (map >= pixel threshold),
  None without a pixel threshold. decisions: bool [N] (score >= image
  threshold), None without an image threshold. thresholds: (image, pixel)
  per image; threshold_source: where they come from, per image. paths: the
  file of each image (None for an in-memory image). unreadable: (path,
  reason) for listed files that could not be decoded.
  """
  scores: np.ndarray
  maps: list
  masks: list | None
  decisions: np.ndarray | None
  thresholds: list
  threshold_source: list
  paths: list
  object_names: list
  unreadable: list = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.scores)


@dataclasses.dataclass
class ImageResult:
  """One readable image, as `Detector.predict(each=...)` hands it over.

  rgb: the upright full-size uint8 [H, W, 3] image the score was computed
  from (decoded once). map: float32 [H, W]. mask: bool [H, W] or None.
  decision: bool or None. source: where the image threshold comes from.
  """
  index: int
  path: str | None
  object_name: str
  rgb: np.ndarray
  map: np.ndarray
  score: float
  decision: bool | None
  mask: np.ndarray | None
  threshold: float | None
  pixel_threshold: float | None
  source: str


def _override_strings(overrides: dict[str, Any]) -> list[str]:
  """`predict__batch_size=4` or `**{"predict.batch_size": 4}` -> "predict.batch_size=4"."""
  return [f"{key.replace('__', '.')}={value!r}" if not isinstance(value, str)
          else f"{key.replace('__', '.')}={value}" for key, value in overrides.items()]


class Detector:
  """A trained head on its towers, ready to score images (see the module doc)."""

  def __init__(self, cfg, workdir: Path, towers, mesh, head: loading.Head | None = None,
               load_thresholds: bool = True):
    """`head` (`loading.load_head`, with the zero-shot record it checked) or
    None: no head (the neighbour modes only). Every other mode's record is
    read when the mode is first used; `load_thresholds=False` reads none
    (e.g. to `calibrate` new ones over a record that belongs to another head
    or bank)."""
    self.cfg, self.workdir = cfg, Path(workdir)
    self.step = head.step if head is not None else None
    self.mesh, self.towers = mesh, towers
    if head is not None:
      self.scorer = Scorer(cfg, towers, mesh, head.params)
      self.model = self.scorer.model
      self._backbone = (self.scorer.builder.backbone_def, self.scorer.backbone_state)
    else:
      self.scorer = None
      self.model = towers.model(cfg.model)
      graphdef, state, _ = sharding.place_frozen(towers.backbone, mesh,
                                                 cfg.mesh.backbone_sharding)
      self._backbone = (graphdef, state)
    self.image_size = int(self.model.image_size)
    self.batch_size = int(cfg.predict.batch_size)
    self.r_list = tuple(int(r) for r in cfg.eval.r_list)
    self._tables: dict[tuple[str, ...], Any] = {}
    self._tokens_step = None
    self.references = None      # the few-shot Bank (use_references / use_bank)
    self._reference_tokens = None   # its references' raw tokens, when computed here
    self._reference_items = None    # else its references, when loaded for them
    self.reference_paths: list = []
    self.reference_digests: list[str] = []   # thresholds.image_digest per reference
    self.bank = None            # thresholds.bank_identity of the references
    self._load_thresholds = bool(load_thresholds)
    # Per scoring mode: its checked deployment record (None: none) and its file.
    self.records: dict[str, dict | None] = {}
    self.record_paths: dict[str, Path | None] = {}
    # eval.coreset: the bank's greedy k-center coreset settings (None: every
    # reference patch); a bank given to use_bank brings its own.
    self.coreset = self._configured_coreset = coreset.settings(cfg.eval.coreset,
                                                               cfg.eval.coreset_seed)
    self.record = None
    self.thresholds_path = None
    # The workdir's thresholds.json, else (init_from) the trained run's, as
    # mode=predict decides; checked against this head before any use.
    if head is not None:
      self.record = head.record if self._load_thresholds else None
      self.thresholds_path = head.record_path if self._load_thresholds else None
      self.records["zero_shot"], self.record_paths["zero_shot"] = (self.record,
                                                                   self.thresholds_path)
    self._pending: dict[str, dict] = {}   # per mode: calibrated, not yet saved
    self._last_calibrated: str | None = None

  def threshold_model(self, scoring: str = "zero_shot") -> dict:
    """What a record of `scoring` must have been made for (`thresholds.model_for`)."""
    return thresholds.model_for(
        scoring, backbone_id=self.towers.backbone_id, layers=self.model.layers,
        image_size=self.image_size, reference_quirks=bool(self.cfg.reference_quirks),
        head=self.scorer.threshold_model() if self.scorer is not None else None,
        r_list=self.r_list, rscin_k=tuple(self.cfg.eval.rscin_k))

  def image_score_rule(self, scoring: str = "zero_shot") -> str:
    """The image-score rule a record of `scoring` records (as evaluation writes it)."""
    return self.model.image_score if scoring == "zero_shot" else f"{scoring}:max"

  def record_for(self, scoring: str = "zero_shot") -> dict | None:
    """The checked deployment record of `scoring` (None: none), read once:
    the workdir's `Workdir.mode_thresholds(scoring)`, else the init_from
    run's; refused (ThresholdError, one line) when made for another model."""
    if scoring not in self.records:
      path = thresholds.deployment_path(self.workdir, self.cfg.init_from or None,
                                        scoring) if self._load_thresholds else None
      record = None
      if path is not None:
        record = thresholds.read(path)
        thresholds.check(record, image_score=self.image_score_rule(scoring),
                         model=self.threshold_model(scoring), scoring=scoring,
                         head_step=self.step)
      self.records[scoring], self.record_paths[scoring] = record, path
    return self.records[scoring]

  @property
  def scoring_modes(self) -> tuple[str, ...]:
    """The modes this Detector scores in: zero_shot only with a head."""
    return SCORING_MODES if self.scorer is not None else SCORING_MODES[1:]

  @property
  def default_scoring(self) -> str:
    """The mode `predict` scores in when not told: the config's
    predict.scoring (e.g. few_shot in configs/demo.py), else the first mode."""
    chosen = self.cfg.predict.scoring
    return chosen if chosen in self.scoring_modes else self.scoring_modes[0]

  # ---------------------------------------------------------------- building

  @classmethod
  def from_workdir(cls, path: str | os.PathLike, **overrides) -> "Detector":
    """The head of a trained or imported workdir, with its `config.json`.

    `overrides` are config fields, dotted or with `__` for the dots:
    `Detector.from_workdir(w, predict__batch_size=4)`. The config, the head's
    identity (`identity.check_head_model`) and `thresholds.json` are checked as
    `--config.mode=predict` checks them.
    """
    workdir = Path(path)
    cfg = run_config.from_workdir(workdir, _override_strings(overrides), own_workdir=True)
    return cls.from_config(cfg, workdir)

  @classmethod
  def from_config(cls, cfg, workdir: str | os.PathLike | None = None) -> "Detector":
    """A Detector from a run config: a config file's `ConfigDict` or a resolved
    `RunConfig` (its `workdir` or `init_from` holds the head; with
    `predict.scoring=few_shot|batch` no head or text tower is built)."""
    # mode=predict's checks; the images and object names come per call.
    cfg = config_check.resolve_detector(cfg, device_count=jax.device_count(),
                                        process_count=jax.process_count())
    workdir = Path(workdir) if workdir is not None else loading.resolve_workdir(cfg)
    if jax.process_count() > 1:
      raise DetectorError("the Detector runs on one process; start it without "
                          "distributed=True")
    head_free = modes.head_free(cfg)   # predict.scoring=few_shot | batch
    if not head_free and not cfg.init_from and not Workdir(workdir).has_checkpoints():
      raise config_check.ConfigError(
          f"{workdir} holds no trained checkpoint; pass a trained or imported workdir "
          "(or set init_from to one), or predict.scoring=few_shot|batch (no head)")
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
    towers = towers_lib.build(cfg, workdir, text=not head_free)
    if head_free:
      return cls(cfg, workdir, towers, mesh)
    return cls(cfg, workdir, towers, mesh,
               loading.load_head(cfg, workdir, towers=towers, mesh=mesh))

  # ---------------------------------------------------------------- inputs

  def _items(self, images) -> tuple[list, list]:
    """Flattens `images` into [(path or None, PIL image or None)] and unreadable files."""
    items, unreadable = [], []

    def add(x):
      if isinstance(x, (str, os.PathLike)) and os.path.isfile(x):
        items.append((os.fspath(x), None))      # decoded (once) when scored
      elif isinstance(x, (str, os.PathLike)):
        skipped: list[str] = []
        paths, bad = data.read_image_folder(x, skipped=skipped)
        items.extend((p, None) for p in paths)
        unreadable.extend(bad)
        # As predict lists them: every file of a folder not scored is said.
        unreadable.extend((p, "skipped: not an image extension (read are "
                           f"{', '.join(data_images.IMAGE_EXTENSIONS)})") for p in skipped)
      elif isinstance(x, Image.Image):
        problem = data_images.pixel_problem(x)
        if problem:
          raise DetectorError(f"images: PIL image {len(items)} ({x.mode} {x.size[0]} x "
                              f"{x.size[1]}): {problem}")
        items.append((None, x))
      elif isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[-1] != 3:
          raise DetectorError(f"an image array must be uint8 [H, W, 3] or [N, H, W, 3]; "
                              f"got {x.dtype} {list(x.shape)}")
        if 0 in x.shape:
          raise DetectorError(f"an image array must hold at least one pixel (H, W >= 1) "
                              f"and one image; got {x.dtype} {list(x.shape)}")
        for a in (x if x.ndim == 4 else x[None]):
          items.append((None, Image.fromarray(a, "RGB")))
      elif isinstance(x, (list, tuple)):
        for y in x:
          if isinstance(y, (list, tuple)):
            raise DetectorError("images: a list of paths, PIL images or arrays (not nested)")
          add(y)
      else:
        raise DetectorError(f"images: expected a path, folder, PIL image, uint8 array or a "
                            f"list of these; got {type(x).__name__}")

    add(images)
    if not items:
      _none_readable(unreadable)
    return items, unreadable

  def _load(self, item, keep_rgb: bool = False
            ) -> tuple[np.ndarray, tuple[int, int], str, np.ndarray | None]:
    """(uint8 [S, S, 3], (H, W), error, full-size RGB or None): exactly the
    prediction reader's preprocessing, from one decode of the file."""
    path, img = item
    if path is not None:
      loaded = data_images.load_for_prediction(path, self.image_size, keep_rgb=keep_rgb)
      h, w = (int(v) for v in loaded["orig_size"])
      return loaded["image"], (h, w), loaded["error"], loaded.get("rgb")
    rgb = data_images.decode(img)     # as a file of it is read: EXIF orientation too
    w, h = rgb.size
    return (data_images.preprocess_image(rgb, self.image_size), (h, w), "",
            np.asarray(rgb, np.uint8) if keep_rgb else None)

  def _table(self, names: tuple[str, ...]):
    if names not in self._tables:
      self._tables[names] = self.scorer.text_table(list(names))
    return self._tables[names]

  def _batches(self, items, keep_rgb: bool = False):
    """Yields (item indices, their loads, padded uint8 batch [B, S, S, 3]) per
    `predict.batch_size` items (the last batch padded: one compiled shape)."""
    b, s = self.batch_size, self.image_size
    with ThreadPoolExecutor(4) as pool:     # decoding overlaps across files
      for start in range(0, len(items), b):
        chunk = list(range(start, min(start + b, len(items))))
        batch = np.zeros((b, s, s, 3), np.uint8)
        loaded = list(pool.map(lambda i: self._load(items[i], keep_rgb), chunk))
        for j in range(len(chunk)):
          batch[j] = loaded[j][0]
        yield chunk, loaded, batch

  def _raw(self, items, names: list[str], keep_rgb: bool = False, progress=None):
    """Yields (item index, model-size map, score, (H, W), error, RGB or None)
    batch by batch; `progress(n)` after each batch with its readable images."""
    distinct = tuple(sorted(set(names)))
    table = self._table(distinct)
    index = np.array([distinct.index(n) for n in names], np.int32)
    for chunk, loaded, batch in self._batches(items, keep_rgb):
      cats = np.zeros(len(batch), np.int32)
      cats[:len(chunk)] = index[chunk]
      amap, score = self.scorer.maps(batch, cats, table)
      amap, score = np.asarray(amap), np.asarray(score)
      for j, i in enumerate(chunk):
        _, hw, error, rgb = loaded[j]
        yield i, amap[j], float(score[j]), hw, error, rgb
      if progress is not None:
        progress(sum(1 for x in loaded if not x[2]))

  # ---------------------------------------------------------------- neighbours

  def _tokens(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [B, S, S, 3] -> (raw patch tokens of the tapped blocks [L, B, h, w, D],
    as the backbone returns them (no standardisation), global tokens [B, D]:
    the deepest tapped block's cls token), as `adjax.scoring_modes` takes them."""
    if self._tokens_step is None:
      model, graphdef = self.model, self._backbone[0]

      @jax.jit
      def step(state, images):
        backbone = nnx.merge(graphdef, state)
        raw, cls = model.raw_tokens(backbone, images)
        return raw, cls[-1]
      self._tokens_step = step
    raw, glob = (np.asarray(x) for x in self._tokens_step(self._backbone[1], batch))
    h, w = self.model.grid
    return raw.reshape(raw.shape[:2] + (h, w, raw.shape[-1])), glob

  def _upsampled(self, grid_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patch-grid maps [n, h, w] -> (maps at the model's size [n, S, S], their maxima)."""
    maps = scoring_modes.upsample(np.asarray(grid_maps, np.float32), self.model.out_hw)
    return maps, maps.reshape(len(maps), -1).max(-1)

  def use_references(self, normal_images, store: bool = True) -> int:
    """Normal images of the object (paths, folders, globs, PIL images or arrays,
    as `predict` takes them) for `scoring="few_shot"`: their bank
    (`adjax.workdir.banks.Bank`: the LNAMD features of their patches, after
    `eval.coreset`) becomes this Detector's (replacing any earlier one).
    The bank is stored in the workdir (`Workdir.reference_bank`, named by
    its identity) and, when one made of the same images for this model is
    there, loaded from it instead of computed (`store=False`: neither).
    Returns the number of readable references; raises DetectorError when none is."""
    items, unreadable = self._items(normal_images)
    paths, digests, readable = [], [], []
    for chunk, loaded, batch in self._batches(items):
      for j, i in enumerate(chunk):
        if loaded[j][2]:
          unreadable.append((items[i][0], loaded[j][2]))
        else:
          paths.append(items[i][0])
          digests.append(thresholds.image_digest(batch[j]))
          readable.append(i)
    if not paths:
      raise DetectorError("use_references: no readable normal images" + (
          f" ({len(unreadable)} unreadable: {unreadable[0][0]}: {unreadable[0][1]})"
          if unreadable else ""))
    self.coreset = self._configured_coreset
    stored = self._stored_bank(thresholds.bank_identity(digests, self.coreset)) if store else None
    if stored is not None and stored.is_file():
      self.use_bank(stored)
      self._reference_items = [items[i] for i in readable]   # tokens only if calibrate asks
      return self.references.count
    tokens = self._tokens_of([items[i] for i in readable])
    bank = banks.build(tokens, names=["<array>" if p is None else p for p in paths],
                       image_digests=digests, **self._bank_model(),
                       **self.coreset_args())
    self._set_bank(bank)
    self._reference_tokens, self._reference_items = tokens, None
    if stored is not None:
      try:
        banks.save(bank, stored)
      except OSError as e:          # a read-only workdir: the bank is used, not kept
        print(f"note: the bank is not stored in {stored.parent} ({e.strerror or e})",
              flush=True)
    return len(paths)

  def references_from(self, spec) -> int:
    """`use_bank` for the path of a stored bank (`*.bank.npz`), else
    `use_references`: what predict.references, the page's --references and
    the export's --references take. A refused bank is a DetectorError."""
    if isinstance(spec, (str, os.PathLike)) and os.fspath(spec).endswith(banks.SUFFIX):
      try:
        return self.use_bank(spec)
      except banks.BankError as e:
        raise DetectorError(str(e)) from None
    return self.use_references(spec)

  def _bank_model(self) -> dict:
    """What a bank for this Detector must have been made with."""
    return {"backbone": self.towers.backbone_id, "layers": self.model.layers,
            "image_size": self.image_size, "r_list": self.r_list}

  def _stored_bank(self, bank_identity: dict) -> Path:
    key = dict(self._bank_model(), bank=bank_identity)
    key["layers"], key["r_list"] = list(key["layers"]), list(key["r_list"])
    return Workdir(self.workdir).reference_bank(banks.identity_digest(key))

  def use_bank(self, bank) -> int:
    """A built bank (`adjax.workdir.banks.Bank`, or the path of a stored one,
    e.g. from mode=build_bank) for `scoring="few_shot"`, used as it is (no
    backbone pass). Refused in one line (BankError) when the file is damaged
    or the bank was made for another backbone, layers, image size or r_list.
    Returns its number of references."""
    where = "use_bank"
    if not isinstance(bank, banks.Bank):
      where = str(bank)
      bank = banks.load(bank)
    bank.check(**self._bank_model(), where=where)
    self._set_bank(bank)
    self._reference_tokens = self._reference_items = None
    return bank.count

  def _tokens_of(self, items) -> np.ndarray:
    """Raw tokens [L, n, h, w, D] of readable items."""
    toks = []
    for chunk, _, batch in self._batches(items):
      raw, _ = self._tokens(batch)
      toks.extend(raw[:, j] for j in range(len(chunk)))
    return np.stack(toks, axis=1)

  def _set_bank(self, bank) -> None:
    self.references = bank
    self.reference_paths = [None if p == "<array>" else p for p in bank.references]
    self.reference_digests = bank.image_digests
    self.coreset = bank.identity["coreset"]
    self.bank = bank.bank

  def backbone_module(self):
    """The frozen backbone as an `nnx` module with host copies of its weights
    (what an export closes over, whatever placement this Detector chose)."""
    return nnx.merge(self._backbone[0], jax.device_get(self._backbone[1]))

  def coreset_args(self) -> dict:
    """`coreset`, `coreset_seed` for `neighbors.reference_maps` / `bank_arrays`."""
    c = self.coreset or {"coreset": 0.0, "seed": 0}
    return {"coreset": c["coreset"], "coreset_seed": c["seed"]}

  def _few_shot(self, items, keep_rgb: bool = False, progress=None):
    """As `_raw`, each image scored against the memory bank."""
    if self.references is None:
      raise DetectorError("scoring='few_shot' needs reference images: call "
                          "use_references(normal_images) first")
    for chunk, loaded, batch in self._batches(items, keep_rgb):
      ok = [j for j in range(len(chunk)) if not loaded[j][2]]
      if ok:
        raw, _ = self._tokens(batch)
        maps, scores = self._upsampled(
            neighbors.bank_maps(raw[:, ok], self.references.features, self.r_list))
      at = {j: k for k, j in enumerate(ok)}
      for j, i in enumerate(chunk):
        _, hw, error, rgb = loaded[j]
        yield (i, maps[at[j]] if j in at else None,
               float(scores[at[j]]) if j in at else 0.0, hw, error, rgb)
      if progress is not None:
        progress(len(ok))

  def _batch(self, items, keep_rgb: bool = False, progress=None):
    """As `_raw`, the readable images scored against each other (MuSc), image
    scores refined by RsCIN; every image's tokens are held until all are read."""
    need = neighbors.MIN_BATCH
    if len(items) < need:
      raise DetectorError(f"scoring='batch' scores the images against each other and "
                          f"needs at least {need}; got {len(items)}")
    self._check_rscin(len(items))
    toks, globs, kept, failed = None, [], [], []
    for chunk, loaded, batch in self._batches(items, keep_rgb):
      raw, glob = self._tokens(batch)
      if toks is None:     # one array for all images' tokens (no list, then a copy)
        toks = np.empty((raw.shape[0], len(items)) + raw.shape[2:], raw.dtype)
      for j, i in enumerate(chunk):
        _, hw, error, rgb = loaded[j]
        if error:
          failed.append((i, hw, error))
        else:
          toks[:, len(kept)] = raw[:, j]
          globs.append(glob[j])
          kept.append((i, hw, rgb))
      if progress is not None:
        progress(sum(1 for x in loaded if not x[2]))
    if len(kept) < need:
      raise DetectorError(f"scoring='batch' scores the images against each other and "
                          f"needs at least {need} readable images; got {len(kept)}")
    self._check_rscin(len(kept), " readable")
    toks = toks[:, :len(kept)]
    subset = int(self.cfg.eval.batch_subset)
    if subset and len(kept) >= 2 * subset:
      shown = run_log.Progress(f"batch scoring (subsets of {subset} or more)", len(kept),
                               every_s=5.0)
      grid = neighbors.mutual_maps_subsets(toks, subset, self.r_list, progress=shown.update)
      shown.close()
    else:
      grid = neighbors.mutual_maps(toks, self.r_list)
    maps, scores = self._upsampled(grid)
    scores = neighbors.refine_scores(scores, np.stack(globs), tuple(self.cfg.eval.rscin_k))
    for i, hw, error in failed:
      yield i, None, 0.0, hw, error, None
    for k, (i, hw, rgb) in enumerate(kept):
      yield i, maps[k], float(scores[k]), hw, "", rgb

  def _check_rscin(self, n: int, what: str = "") -> None:
    """RsCIN keeps each image's k most similar images of the call: every k of
    eval.rscin_k must be at most the number of images scored."""
    k_list = tuple(int(k) for k in self.cfg.eval.rscin_k)
    if 0 not in k_list and k_list and max(k_list) > n:
      raise DetectorError(
          f"scoring='batch' refines scores with RsCIN over each image's k most similar "
          f"images, eval.rscin_k={k_list}: give at least {max(k_list)}{what} images (got "
          f"{n}), or set eval.rscin_k to values <= {n} ((0,) turns RsCIN off)")

  def check_object_names(self, names: Sequence[str]) -> None:
    """Refuses (DetectorError) an object name whose prompts do not fit the text
    tower's context, before any image is read; the zero-shot head only."""
    if self.scorer is None:
      return
    for name in sorted(set(names)):
      problem = self.towers.text_embed.problem(name)
      if problem:
        raise DetectorError(problem)

  def _names(self, n: int, object_name, object_names, need_name: bool = True) -> list[str]:
    if object_names is not None:
      names = [str(x) for x in object_names]
      if object_name is not None:
        raise DetectorError("give object_name or object_names, not both")
      if len(names) != n:
        raise DetectorError(f"object_names has {len(names)} names for {n} images")
    else:
      name = self.cfg.predict.object_name if object_name is None else str(object_name)
      names = [name] * n
    if need_name and any(not x.strip() for x in names):
      raise DetectorError("object name is empty: name the object in the images "
                          "(e.g. object_name='bottle')")
    return names

  # ---------------------------------------------------------------- API

  def thresholds_for(self, object_name: str, scoring: str = "zero_shot"):
    """`thresholds.Resolved` (image threshold, pixel threshold, source) for
    `object_name` in `scoring`: `thresholds.resolve` over the mode's record
    (`record_for`; few_shot: for the bank of `use_references`), the rule
    mode=predict, the page and the export decide with; `predict.threshold
    >= 0` overrides the image threshold. No record: source "none"."""
    override = float(self.cfg.predict.threshold)
    return thresholds.resolve(
        self.record_for(scoring), object_name, override if override >= 0 else None,
        scoring=scoring, bank=self.bank if modes.uses_bank(scoring) else None)

  def predict(self, images, object_name: str | None = None,
              object_names: Sequence[str] | None = None,
              scoring: str | None = None, *, progress=None, each=None,
              keep_maps: bool = True) -> Prediction:
    """Scores `images` (see the module doc) for `object_name` (default:
    `predict.object_name`), or one name per image with `object_names`.

    `scoring`: "zero_shot" (the head), "few_shot" (against the images given
    to `use_references`; DetectorError without them) or "batch" (the
    images of this call against each other; at least 5); by default
    `default_scoring` (the config's predict.scoring). Each mode decides
    with its own record (`thresholds_for`); without one, `decisions` and
    `masks` are None (undecided). A few-shot record of another bank is
    refused (ThresholdError). The neighbour modes' object names only label
    the rows and pick a category's thresholds.

    `progress(n)` is called after each batch with its number of readable
    images. `each(result)` is called per readable image, in order, with an
    `ImageResult` (its full-size RGB, map, mask and decision) as soon as its
    batch is scored; with `keep_maps=False` the returned Prediction then
    holds no maps or masks (`maps == []`, `masks is None`), so a long
    folder is never held in memory. Raises DetectorError when no image
    could be read.
    """
    scoring = scoring or self.default_scoring
    if scoring not in SCORING_MODES:
      raise DetectorError(f"scoring={scoring!r}: expected one of {', '.join(SCORING_MODES)}")
    if scoring not in self.scoring_modes:
      raise DetectorError(f"scoring={scoring!r} needs a trained head; this Detector was "
                          "built without one (predict.scoring=few_shot|batch): use "
                          f"{' or '.join(self.scoring_modes)}")
    if scoring == "few_shot" and self.references is None:
      raise DetectorError("scoring='few_shot' needs reference images: call "
                          "use_references(normal_images) first")
    items, unreadable = self._items(images)
    names = self._names(len(items), object_name, object_names,
                        need_name=scoring == "zero_shot")
    if scoring == "zero_shot":
      self.check_object_names(names)
    limit_of = {n: self.thresholds_for(n, scoring) for n in set(names)}
    scores, maps, masks, paths, kept = [], [], [], [], []
    if scoring == "zero_shot":
      scored = self._raw(items, names, keep_rgb=each is not None, progress=progress)
    else:
      scored = (self._few_shot if scoring == "few_shot" else self._batch)(
          items, keep_rgb=each is not None, progress=progress)
    for i, amap, score, hw, error, rgb in scored:
      if error:                       # a file that changed since it was listed
        unreadable.append((items[i][0], error))
        continue
      full = map_at(amap, hw)
      image_t, pixel_t, source = limit_of[names[i]]
      mask = None if pixel_t is None else full >= pixel_t
      scores.append(score)
      paths.append(items[i][0])
      kept.append(names[i])
      if keep_maps:
        maps.append(full)
        masks.append(mask)
      if each is not None:
        each(ImageResult(
            index=len(scores) - 1, path=items[i][0], object_name=names[i], rgb=rgb,
            map=full, score=score, decision=None if image_t is None else score >= image_t,
            mask=mask, threshold=image_t, pixel_threshold=pixel_t, source=source))
    if not scores:
      _none_readable(unreadable)
    limits = [limit_of[n] for n in kept]
    decisions = None
    if not keep_maps or not all(p is not None for _, p, _ in limits):
      masks = None
    if all(t is not None for t, _, _ in limits):
      decisions = np.array([s >= t for s, (t, _, _) in zip(scores, limits)], bool)
    return Prediction(
        scores=np.asarray(scores, np.float32), maps=maps, masks=masks, decisions=decisions,
        thresholds=[(t, p) for t, p, _ in limits],
        threshold_source=[src for _, _, src in limits], paths=paths, object_names=kept,
        unreadable=unreadable)

  def calibrate(self, normal_images=None, quantile: float = 0.99,
                object_name: str | None = None, scoring: str = "zero_shot"
                ) -> tuple[float, float]:
    """Thresholds of `scoring` from normal images only (as
    `predict.calibrate_normals`): the `quantile` of normal image scores and
    of their pixels' scores (at the model's size), each placed between two
    observed scores (`metrics.quantile_threshold`). What is scored:
    - zero_shot: `normal_images` through the head;
    - few_shot: `normal_images` against the bank of `use_references`; a
      normal image that is one of the references against the others
      (leave-one-out); with `normal_images=None`, each reference against the
      other k-1 (needs k >= 2). The record holds for this bank only;
    - batch: `normal_images` scored together (at least 5); an
      approximation: a batch's scores depend on the images it holds.
    The combined modes normalise maps over a whole category: their
    thresholds come from evaluation (`eval.set_thresholds=True`) only.
    They are used from now on by this Detector in `scoring`;
    `save_thresholds()` writes them to the workdir's record of the mode.
    Returns (image threshold, pixel threshold)."""
    if scoring not in SCORING_MODES:
      raise DetectorError(
          f"calibrate: scoring={scoring!r} cannot be calibrated from normal images here "
          f"(expected one of {', '.join(SCORING_MODES)}; the combined modes' thresholds "
          "come from evaluation with eval.set_thresholds=True)")
    if scoring not in self.scoring_modes:
      raise DetectorError(f"calibrate: scoring={scoring!r} needs a trained head; this "
                          "Detector has no head")
    if not 0.0 < quantile <= 1.0:
      raise DetectorError(f"quantile={quantile!r}: expected a value in (0, 1]")
    if normal_images is None and scoring != "few_shot":
      raise DetectorError(f"calibrate: scoring={scoring!r} needs normal images")
    unreadable: list = []
    if scoring == "few_shot":
      scores, pixels, how = self._few_shot_normals(normal_images, unreadable)
    else:
      items, unreadable = self._items(normal_images)
      if scoring == "zero_shot":
        names = self._names(len(items), object_name, None)
        self.check_object_names(names)
        scored = self._raw(items, names)
        how = "the normal images through the head"
      else:
        scored = self._batch(items)
        how = ("the normal images scored together as one batch (an approximation: a "
               "batch's scores depend on the images it holds)")
      scores, pixels = [], []
      for _, amap, score, _, error, _ in scored:
        if not error:
          scores.append(score)
          pixels.append(np.asarray(amap).ravel())
    if not scores:
      raise DetectorError("calibrate: no readable normal images")
    image = metrics.quantile_threshold(np.asarray(scores), quantile)
    pixel = metrics.quantile_threshold(np.concatenate(pixels), quantile)
    if normal_images is None:
      dataset = f"normals:the {len(scores)} references (leave-one-out)"
    elif isinstance(normal_images, (str, os.PathLike)):
      dataset = f"normals:{os.fspath(normal_images)}"    # as predict.calibrate_normals
    else:
      dataset = f"normals:{len(scores)} images given to calibrate()"
    pending = dict(
        dataset=dataset, scoring=scoring, image_score=self.image_score_rule(scoring),
        checkpoint_step=-1, model=self.threshold_model(scoring), image=image, pixel=pixel,
        method=f"normal-quantile {quantile}",
        bank=self.bank if scoring == "few_shot" else None,
        details={"normal_images": len(scores), "scored": how,
                 "unreadable": [p for p, _ in unreadable]})
    record = {"format_version": thresholds.FORMAT_VERSION, "image_threshold": image,
              "pixel_threshold": pixel, **{k: v for k, v in pending.items()
                                           if k not in ("image", "pixel", "bank")}}
    if pending["bank"] is not None:
      record["bank"] = pending["bank"]
    self._pending[scoring] = pending
    self._last_calibrated = scoring
    self.records[scoring], self.record_paths[scoring] = record, None
    if scoring == "zero_shot":
      self.record, self.thresholds_path = record, None
    return image, pixel

  def _few_shot_normals(self, normal_images, unreadable: list):
    """Image scores and model-size maps of normal images against the bank; a
    reference among them (or each reference, with `normal_images=None`)
    against the bank without it."""
    if self.references is None:
      raise DetectorError("calibrate: scoring='few_shot' needs reference images: call "
                          "use_references(normal_images) first")
    refs = self.references
    k = refs.count
    scores, pixels = [], []

    def against(tokens, drop: tuple[int, ...]):
      if len(drop) >= k:
        return
      maps, got = self._upsampled(neighbors.bank_maps(tokens, refs.without(drop).features,
                                                      self.r_list))
      scores.extend(float(v) for v in got)
      pixels.extend(m.ravel() for m in maps)

    if normal_images is None:
      if k < 2:
        raise DetectorError(
            "calibrate: scoring='few_shot' with no normal images scores each reference "
            f"against the other k-1 and needs at least 2 references; got {k}: give normal "
            "images of the object (predict.calibrate_normals)")
      if self._reference_tokens is None and self._reference_items:
        self._reference_tokens = self._tokens_of(self._reference_items)
      if self._reference_tokens is None:
        raise DetectorError(
            "calibrate: scoring='few_shot' with no normal images scores each reference "
            "against the others, and this bank was loaded without its references' "
            "images: give normal images of the object (predict.calibrate_normals)")
      for i in range(k):
        against(self._reference_tokens[:, i:i + 1], (i,))
      return scores, pixels, f"each of the {k} references against the other {k - 1}"
    items, bad = self._items(normal_images)
    unreadable.extend(bad)
    left_out = whole_bank = 0
    for chunk, loaded, batch in self._batches(items):
      raw, _ = self._tokens(batch)
      groups: dict[tuple[int, ...], list[int]] = {}
      for j, i in enumerate(chunk):
        if loaded[j][2]:
          unreadable.append((items[i][0], loaded[j][2]))
          continue
        digest = thresholds.image_digest(batch[j])
        drop = tuple(r for r, d in enumerate(self.reference_digests) if d == digest)
        left_out += bool(drop)
        whole_bank += len(drop) >= k
        groups.setdefault(drop, []).append(j)
      for drop, js in groups.items():
        against(raw[:, js], drop)
    if not scores and whole_bank:
      raise DetectorError(
          f"calibrate: scoring='few_shot' scores a reference against the other references, "
          f"and the bank has {k}: give normal images of the object other than the "
          "references (or at least 2 references)")
    how = "the normal images against the bank"
    if left_out:
      how += f" ({left_out} of them references, each against the others)"
    return scores, pixels, how

  def save_thresholds(self, path: str | os.PathLike | None = None,
                      scoring: str | None = None) -> Path:
    """Writes the calibrated thresholds of `scoring` (default: the last
    calibrated mode) to the workdir's record of that mode
    (`Workdir.mode_thresholds`), atomically, with the identity checked on
    later use."""
    scoring = scoring or self._last_calibrated
    if scoring is None or scoring not in self._pending:
      raise DetectorError("save_thresholds: nothing calibrated" + (
          f" in scoring={scoring!r}" if scoring else "") + "; call calibrate() first")
    target = Path(path) if path else Workdir(self.workdir).mode_thresholds(scoring)
    if target.is_dir():
      target = Workdir(target).mode_thresholds(scoring)
    written = thresholds.write(target, **self._pending.pop(scoring))
    self.records[scoring] = thresholds.read(written)
    self.record_paths[scoring] = Path(written)
    if scoring == "zero_shot":
      self.record, self.thresholds_path = self.records[scoring], Path(written)
    return written

  @property
  def object_names(self) -> list[str]:
    """Object names with their own thresholds in thresholds.json (sorted)."""
    found = set()
    if self.record is not None:
      for cats in self.record.get("details", {}).get("per_category", {}).values():
        found.update(cats)
    return sorted(found)


def _none_readable(unreadable) -> None:
  raise DetectorError("no readable images given" + (
      f" ({len(unreadable)} unreadable: {unreadable[0][0]}: {unreadable[0][1]})"
      if unreadable else ""))
