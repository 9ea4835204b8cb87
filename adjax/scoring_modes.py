"""Evaluation beyond zero-shot: scoring against neighbours (`eval.scoring`).

- `zero_shot`: the trained head alone (`adjax.evaluate.Evaluator`).
- `few_shot`: each image against a memory bank of `eval.references` normal
  images of its own category: the first k `good` images of the category in a
  fixed-seed shuffle of the target's split; they are left out of the metrics
  and listed in the results' identity (`references`). With
  `eval.references_dir`, the bank is instead the first k images (by path) of
  the folder's subfolder named after the category, and every test image is
  scored.
- `batch`: MuSc: each image against the other unlabeled images of its
  category (`neighbors.mutual_maps`), image scores refined over the category
  (`neighbors.refine_scores`, k_list `eval.rscin_k`).
- `zero_shot+few_shot`, `zero_shot+batch`: the head's map and the neighbour
  map, each normalised over the category (`eval.combine`), averaged; the
  image score is the combined map's maximum (then RsCIN for `+batch`).

One backbone pass per category feeds the head and the neighbours. The
neighbour modes use the tapped blocks' patch tokens as the backbone returns
them (prefix tokens removed), not the head's standardised patches (which
the feature cache stores); the global token of RsCIN is the cls token of
the deepest tapped block through the final norm. With `eval.token_cache=disk`
(the default) they are kept in the data set's raw-token cache
(`adjax.workdir.token_cache`): the first run fills it, later runs of any
neighbour mode read it instead of running the backbone (the combined modes
still run it for the head), and a category is read from disk block by block
(or subset by subset) instead of held in host memory. With `none` a
category's raw tokens are held in host memory while it is scored
(`L * n * P * D * 4` bytes: ViT-L/16 at 512, 200 images, 3.4 GB).
Few-shot scores against the category's `adjax.workdir.banks.Bank`, stored
in the workdir and reused (`NeighbourScorer.category_bank`).
`few_shot` and `batch` need neither the head nor the text tower.
Neighbour maps are on the patch grid and upsampled to the image size
bilinearly with align_corners=True, like the head's maps.
"""

from __future__ import annotations

from pathlib import Path
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from adjax import coreset, modes, neighbors
from adjax.ad_model import Features
from adjax.common import sharding
from adjax.common.errors import UserError
from adjax.config import schema
from adjax.data import images as image_io
from adjax.data import targets as datasets
from adjax.models import head as head_lib
from adjax.modes import needs_head, neighbour_kind
from adjax.scorer import Scorer
from adjax.workdir import Workdir, banks, feature_cache, run_log, thresholds, token_cache

REFERENCE_SEED = 0   # the fixed shuffle that picks few-shot references


class ScoringError(UserError, ValueError):
  """A data set cannot be scored in the chosen mode (too few images)."""


def choose_references(handle, category_index: int, k: int) -> np.ndarray:
  """Example indices of the k reference images of a category: its `good`
  (label 0) images in a fixed-seed shuffle, the first k."""
  good = np.flatnonzero((handle.example_category == category_index)
                        & (np.asarray(handle.example_label) == 0))
  order = np.random.default_rng(REFERENCE_SEED).permutation(len(good))
  return np.sort(good[order[:k]])


CATEGORY = modes.CATEGORY   # in eval.references_dir: the category's name


def category_folder(refs_dir: str, name: str) -> Path:
  """`<refs_dir>/<name>`, or `refs_dir` with {category} replaced by the name
  (`data/mvtec/{category}/train/good`: a data set's own training normals)."""
  return Path(refs_dir.replace(CATEGORY, name)) if CATEGORY in refs_dir else Path(refs_dir) / name


def references_dir_for(cfg, handle) -> str:
  """The folder (pattern) the few-shot bank is read from: `eval.references_dir`,
  or with `eval.references_split=train` the data set's own training normals,
  `<raw folder>/{category}/train/good`; "" for the test split's goods."""
  if cfg.eval.references_split == "train":
    return str(Path(handle.raw_dir or ".") / CATEGORY / "train" / "good")
  return str(cfg.eval.references_dir)


def folder_references(refs_dir: str, categories, k: int) -> tuple[dict[str, list[str]], list[str]]:
  """The bank of each category from `eval.references_dir`: the first k readable
  images (sorted by path; k = 0: all) of `category_folder(refs_dir, category)`.
  Returns (category -> paths, problems), the problems one line each."""
  if CATEGORY not in refs_dir and not Path(refs_dir).is_dir():
    return {}, [f"eval.references_dir={refs_dir!r}: not a folder (expected one subfolder "
                "of normal images per category)"]
  found, missing, short = {}, [], []
  for name in categories:
    sub = category_folder(refs_dir, name)
    if not sub.is_dir():
      missing.append(name)
      continue
    try:
      ok, _ = image_io.read_image_folder(sub)
    except FileNotFoundError:
      ok = []
    if len(ok) < max(k, 1):
      short.append(f"{name} ({len(ok)})")
    else:
      found[name] = ok[:k] if k else ok
  out = []
  if missing:
    if CATEGORY in refs_dir:
      out.append(f"eval.references_dir={refs_dir!r} has no folder for "
                 f"{', '.join(missing)} (expected one per category, {{category}} "
                 "replaced by its name)")
    else:
      out.append(f"eval.references_dir={refs_dir!r} has no subfolder for "
                 f"{', '.join(missing)} (expected one per category, named as it)")
  if short:
    out.append(f"eval.references={k} needs at least {max(k, 1)} readable images in each "
               f"subfolder of eval.references_dir={refs_dir!r}; fewer in {', '.join(short)}")
  return found, out


def problems(cfg, handle) -> list[str]:
  """What stops `handle` being scored in `cfg.eval.scoring`, per category."""
  kind = neighbour_kind(cfg.eval.scoring)
  refs_dir = references_dir_for(cfg, handle)
  need = neighbors.MIN_BATCH
  k = int(cfg.eval.references)
  k_list = tuple(int(x) for x in cfg.eval.rscin_k)
  rscin = max(k_list) if k_list and 0 not in k_list else 0
  small, short, few = [], [], []
  for ci, name in enumerate(handle.categories):
    in_cat = handle.example_category == ci
    n = int(in_cat.sum())
    good = int((in_cat & (np.asarray(handle.example_label) == 0)).sum())
    if kind == "batch" and n < need:
      small.append(f"{name} ({n})")
    elif kind == "batch" and n < rscin:
      few.append(f"{name} ({n})")
    if kind == "few_shot" and not refs_dir and good < k + 1:
      short.append(f"{name} ({good})")
  out = []
  if small:
    out.append(f"eval.scoring={cfg.eval.scoring} scores each image against the other "
               f"images of its category and needs at least {need} per category; "
               f"{handle.display_name} has fewer in {', '.join(small)}")
  if few:
    out.append(f"eval.rscin_k={k_list}: RsCIN keeps each image's k most similar images of "
               f"its category, so each category needs at least {rscin} images; "
               f"{handle.display_name} has fewer in {', '.join(few)} (lower eval.rscin_k, "
               "or (0,) to turn RsCIN off)")
  if short:
    out.append(f"eval.references={k} needs at least {k + 1} good images per category "
               f"(k references and one left to score); {handle.display_name} has "
               f"fewer in {', '.join(short)}")
  if kind == "few_shot" and refs_dir:
    out += folder_references(refs_dir, handle.categories, k)[1]
  return out


def normalise(values: np.ndarray, how: str) -> np.ndarray:
  """Maps of one category on a common scale: z-scored or min-max over all its pixels."""
  values = np.asarray(values, np.float32)
  if how == "zscore":
    return (values - values.mean()) / max(float(values.std()), 1e-12)
  lo, hi = float(values.min()), float(values.max())
  return (values - lo) / max(hi - lo, 1e-12)


_upsample = jax.jit(lambda m, hw: head_lib.upsample_align_corners(m[..., None], hw)[..., 0],
                    static_argnums=1)


def upsample(maps: np.ndarray, hw: tuple[int, int], block: int = 32) -> np.ndarray:
  """[n, h, w] patch-grid maps -> [n, H, W], bilinear, align_corners=True."""
  return np.concatenate([np.asarray(_upsample(jnp.asarray(maps[s:s + block]), hw))
                         for s in range(0, len(maps), block)])


class NeighbourScorer:
  """Scoring in a neighbour mode (see the module doc): a data set's rows, one
  category at a time, from the backbone pass (and the head, which it holds as
  a `Scorer`, in the combined modes). A `scorer.ModeScorer`, as
  `scorer.ZeroShotScorer` is; `evaluate.Evaluator` consumes its rows."""

  def __init__(self, cfg, towers, mesh, params, workdir: Path | None = None):
    self.cfg, self.towers, self.mesh = cfg, towers, mesh
    # Where the few-shot banks are stored (`Workdir.category_bank`); None: not stored.
    self.workdir = workdir
    self._category_banks: dict[str, dict] = {}   # category -> the bank's identity
    self.scoring = cfg.eval.scoring
    self.kind = neighbour_kind(self.scoring)
    self.with_head = needs_head(self.scoring)
    self.scorer = Scorer(cfg, towers, mesh, params)
    self.model = self.scorer.model
    self._features_step = self._build_step()
    self._refs: dict[str, np.ndarray] = {}
    self._bank_paths: dict[str, list[str]] = {}
    self.references_dir = str(cfg.eval.references_dir) if self.kind == "few_shot" else ""
    self._category = ""
    # The few-shot bank's coreset settings (None: every reference patch), a
    # part of what the bank is.
    self.coreset = (coreset.settings(cfg.eval.coreset, cfg.eval.coreset_seed)
                    if self.kind == "few_shot" else None)

  def adjust_identity(self, ident: dict) -> dict:
    """The results identity of this mode: its settings; no head or text tower
    without the head."""
    cfg = self.cfg
    ev = dict(ident["eval"], scoring=self.scoring)
    if self.kind == "few_shot":
      ev["references"] = int(cfg.eval.references)
      if self.references_dir:
        ev["references_dir"] = self.references_dir
      if cfg.eval.references_split == "train":
        ev["references_split"] = "train"
    ev["r_list"] = [int(r) for r in cfg.eval.r_list]
    if self.coreset:
      ev["coreset"] = dict(self.coreset)
    if self.kind == "batch":
      ev["rscin_k"] = [int(k) for k in cfg.eval.rscin_k]
      if int(cfg.eval.batch_subset):
        ev["batch_subset"] = int(cfg.eval.batch_subset)
    if self.with_head:
      ev["combine"] = cfg.eval.combine
    else:
      ev.pop("image_score")
      ident["head"] = None
      ident["towers"]["text"] = None
    ident["eval"] = ev
    return ident

  def check(self, handle) -> None:
    found = problems(self.cfg, handle)
    if found:
      raise ScoringError("; ".join(found))

  def extra_identity(self, handle) -> dict:
    """The few-shot references of each category (chosen here, left out of the metrics)."""
    self._refs, self._bank_paths, self._category_banks = {}, {}, {}
    if self.kind == "few_shot":
      self.references_dir = references_dir_for(self.cfg, handle)
    if self.references_dir:
      self._bank_paths = folder_references(self.references_dir, handle.categories,
                                           int(self.cfg.eval.references))[0]
      return {"references": {name: list(p) for name, p in self._bank_paths.items()}}
    if self.kind == "few_shot":
      self._refs = {name: choose_references(handle, ci, int(self.cfg.eval.references))
                    for ci, name in enumerate(handle.categories)}
    if not self._refs:
      return {}
    return {"references": {name: [datasets.as_str(handle.source[int(i)]["path"]) for i in idx]
                           for name, idx in self._refs.items()}}

  def display_name(self, handle) -> str:
    return f"{handle.display_name}.{self.scoring}"

  def progress_label(self, handle) -> str:
    return f"evaluate {handle.display_name} ({self.scoring})"

  def rows(self, handle, to_draw: set, progress):
    """Yields (rows, draws) like `evaluate.ZeroShotScorer.rows`: per category,
    its scored images (the references left out) in parts of 16 (the
    accumulator's batch size), the panels of `to_draw` with the first part."""
    table = self.scorer.text_table(handle.categories) if self.with_head else None
    self._cache = self._token_cache(handle)
    for ci, name in enumerate(handle.categories):
      if not (handle.example_category == ci).any():
        continue
      got = self._category_pass(handle, name, table, to_draw, progress)
      self._category = name
      bank = self.category_bank(handle, name, got, table) if self.kind == "few_shot" else None
      rows = self._score_category(got, self._refs.get(name, np.zeros(0, int)), bank)
      draws = []
      for index, (image, path) in got["drawn"].items():
        at = np.flatnonzero(rows["index"] == index)
        if len(at):
          i = int(at[0])
          draws.append((name, path, image, rows["map"][i], rows["mask"][i]))
      n = len(rows["score"])
      rows.update(valid=np.ones(n, bool), category_index=np.full(n, ci))
      for s in range(0, n, 16):
        yield {k: v[s:s + 16] for k, v in rows.items()}, (draws if s == 0 else [])

  def finish(self) -> None:
    """Publishes the raw-token cache once every example is in it."""
    cache, self._cache = getattr(self, "_cache", None), None
    if cache is not None and not cache.complete and cache.publish():
      print(f"raw-token cache {cache.dir}: complete (later neighbour-mode runs read it)",
            flush=True)

  def _token_cache(self, handle):
    """The data set's raw-token cache (`eval.token_cache=disk`; one process)."""
    cfg = self.cfg
    if cfg.eval.token_cache == "none" or jax.process_count() > 1:
      return None
    cache = token_cache.open_cache(feature_cache.evaluation_dir(cfg), self.towers.backbone_id,
                                   self.model, handle, backbone_dtype=cfg.backbone.dtype)
    state = ("complete: the backbone is not run" + (" for the neighbours" if self.with_head
                                                    else "")
             if cache.complete else "filled by this evaluation")
    print(f"raw-token cache {cache.dir}: {state}", flush=True)
    return cache

  def title(self, handle) -> str:
    return f"{handle.display_name}: {self.scoring} results"

  def announce(self, handle, stem: str, results: dict, table_text: str) -> None:
    note = ""
    if self._refs:
      note = (f"; {self.cfg.eval.references} reference image(s) per category left out of the "
              f"metrics (listed in results/{stem}.json)")
    elif self._bank_paths:
      note = (f"; {self.cfg.eval.references or 'all'} reference image(s) per category from "
              f"{self.references_dir} (listed in results/{stem}.json)")
    print(f"\n{handle.display_name}: {self.scoring} results ({len(results)} categories"
          f"{note}) -> results/{stem}.*\n{table_text}", flush=True)

  # ---- the model a threshold belongs to ---------------------------------
  def threshold_model(self) -> dict:
    """`thresholds.model_for` this mode: what `Detector` checks a record against."""
    cfg = self.cfg
    return thresholds.model_for(
        self.scoring, backbone_id=self.towers.backbone_id, layers=self.model.layers,
        image_size=self.model.image_size, reference_quirks=self.scorer.reference_quirks,
        head=self.scorer.threshold_model() if self.with_head else None,
        r_list=cfg.eval.r_list, rscin_k=cfg.eval.rscin_k, combine=cfg.eval.combine)

  def threshold_banks(self, handle) -> dict[str, dict]:
    """Per category, the identity of its few-shot bank (`thresholds.bank_identity`
    of the references' model-size pixels, as `Detector.use_references` computes
    it); empty in the other modes."""
    if self._category_banks:
      return dict(self._category_banks)
    size = self.model.image_size
    out = {}
    for name, idx in self._refs.items():
      out[name] = thresholds.bank_identity(
          (thresholds.image_digest(datasets.image_at(handle, int(i), size)) for i in idx),
          self.coreset)
    for name, paths in self._bank_paths.items():
      out[name] = thresholds.bank_identity(
          (thresholds.image_digest(image_io.load_for_prediction(p, size)["image"])
           for p in paths), self.coreset)
    return out

  def threshold_image_score(self) -> str:
    return f"{self.scoring}:max"

  # ---- the backbone (and head) pass --------------------------------------
  def _build_step(self):
    model, with_head = self.model, self.with_head
    backbone_def = self.scorer.builder.backbone_def

    def step(params, backbone_state, text_table, images, category_index):
      backbone = nnx.merge(backbone_def, backbone_state)
      raw, cls = model.raw_tokens(backbone, images)          # [L, B, N, D], [L, B, D]
      glob = cls[-1]
      if not with_head:
        return raw, glob
      feats = Features(head_lib.standardize_patches(raw), cls)
      return (raw, glob) + tuple(model.maps(params, feats, text_table, category_index))

    rep = sharding.replicated(self.mesh)
    b, b1 = sharding.batch_sharding(self.mesh), sharding.batch_sharding(self.mesh, 1)
    out = (b1, b) + ((b, b) if with_head else ())
    return jax.jit(step, in_shardings=(rep, self.scorer.builder.backbone_sharding, rep, b, b),
                   out_shardings=out)

  def _category_pass(self, handle, name: str, table, to_draw: set, progress) -> dict:
    """One pass over a category: raw tokens, global tokens, targets (and head maps)."""
    cfg = self.cfg
    loader = datasets.loader(cfg, handle, self.model, batch_size=cfg.eval.batch_size,
                            train=False, categories=[name])
    parts: dict[str, list] = {}
    drawn = {}
    cache = getattr(self, "_cache", None)
    for local in loader:
      rows = {k: sharding.all_rows(local[k]) for k in ("mask", "label", "valid", "has_mask",
                                                       "index")}
      valid = rows.pop("valid")
      if self.with_head or cache is None or not cache.has(rows["index"][valid]):
        batch = sharding.global_batch({"image": local["image"],
                                       "category_index": local["category_index"]}, self.mesh)
        outs = self._features_step(self.scorer.params, self.scorer.backbone_state, table,
                                   batch["image"], batch["category_index"])
        tokens, glob = sharding.all_rows(outs[0], 1), sharding.all_rows(outs[1])
        if self.with_head:
          rows["head_map"] = sharding.all_rows(outs[2])
          rows["head_score"] = sharding.all_rows(outs[3])
        if cache is None:
          rows.update(tokens=tokens, glob=glob)
        else:
          cache.put(np.where(valid, rows["index"], -1), tokens, glob)
      for k, v in rows.items():
        parts.setdefault(k, []).append(v[:, valid] if k == "tokens" else v[valid])
      for i in np.flatnonzero(local["valid"]):
        if int(local["index"][i]) in to_draw:
          drawn[int(local["index"][i])] = (local["image"][i], str(local["path"][i]))
      progress.update(int(valid.sum()))
    got = {k: np.concatenate(v, axis=1 if k == "tokens" else 0) for k, v in parts.items()}
    if cache is not None:
      # The category's tokens stay on disk: read per block (or per batch subset).
      got["tokens"], got["glob"] = cache.rows(got["index"], self.model.grid)
    got["drawn"] = drawn
    return got

  def _image_tokens(self, batches, table, what: str) -> np.ndarray:
    """Raw tokens [L, k, P, D] of model-size images given as prediction
    batches (`image_io.prediction_batches`' dicts)."""
    b = max(1, self.cfg.eval.batch_size // jax.process_count())
    parts = []
    for local in batches:
      bad = [f"{p}: {e}" for p, e in zip(local["path"], local["error"]) if e]
      if bad:
        raise ScoringError(f"{what}: unreadable reference {bad[0]}")
      batch = sharding.global_batch({"image": local["image"],
                                     "category_index": np.zeros(b, np.int32)}, self.mesh)
      outs = self._features_step(self.scorer.params, self.scorer.backbone_state, table,
                                 batch["image"], batch["category_index"])
      parts.append(sharding.all_rows(outs[0], 1)[:, sharding.all_rows(local["valid"])])
    return np.concatenate(parts, axis=1)

  def _bank_tokens(self, paths: list[str], table) -> np.ndarray:
    """Raw tokens [L, k, P, D] of reference images from `eval.references_dir`,
    read and resized like predict's inputs."""
    b = max(1, self.cfg.eval.batch_size // jax.process_count())
    return self._image_tokens(image_io.prediction_batches(
        paths, image_size=self.model.image_size, batch_size=b), table, "eval.references_dir")

  def _split_tokens(self, handle, idx, table) -> np.ndarray:
    """Raw tokens [L, k, P, D] of the data set's examples `idx` (test-split references)."""
    b = max(1, self.cfg.eval.batch_size // jax.process_count())
    size = self.model.image_size

    def batches():
      for s in range(0, len(idx), b):
        part = [int(i) for i in idx[s:s + b]]
        image = np.zeros((b, size, size, 3), np.uint8)
        for j, i in enumerate(part):
          image[j] = datasets.image_at(handle, i, size)
        yield {"image": image, "path": [""] * b, "error": [""] * b,
               "valid": np.arange(b) < len(part)}
    return self._image_tokens(batches(), table, "eval.references")

  # ---- the few-shot bank ------------------------------------------------
  def _reference_images(self, handle, name: str):
    """(names, image digests) of a category's references, in bank order."""
    size = self.model.image_size
    if self._bank_paths:
      paths = list(self._bank_paths[name])
      return paths, [thresholds.image_digest(image_io.load_for_prediction(p, size)["image"])
                     for p in paths]
    idx = self._refs[name]
    return ([datasets.as_str(handle.source[int(i)]["path"]) for i in idx],
            [thresholds.image_digest(datasets.image_at(handle, int(i), size)) for i in idx])

  def category_bank(self, handle, name: str, got: dict | None, table, rebuild: bool = False):
    """The few-shot `Bank` of category `name`: the stored one
    (`Workdir.category_bank`) when it was made of these references with these
    settings, else built (from `got`'s tokens of test-split references, or a
    backbone pass over the references) and stored. A stored bank that is
    damaged or made for another model is refused (BankError, one line)."""
    names, digests = self._reference_images(handle, name)
    want = thresholds.bank_identity(digests, self.coreset)
    model = {"backbone": self.towers.backbone_id, "layers": self.model.layers,
             "image_size": self.model.image_size,
             "r_list": tuple(int(r) for r in self.cfg.eval.r_list)}
    path = (Workdir(self.workdir).category_bank(handle.display_name, name)
            if self.workdir is not None else None)
    if path is not None and path.is_file() and not rebuild:
      stored = banks.load(path)
      stored.check(**model, where=str(path))
      if stored.bank == want:
        self._category_banks[name] = stored.bank
        return stored
    start = time.perf_counter()
    if self._bank_paths:
      tokens = self._bank_tokens(self._bank_paths[name], table)
    elif got is not None:
      tokens = _take(got["tokens"], np.isin(got["index"], self._refs[name]))
      order = np.asarray(got["index"])[np.isin(got["index"], self._refs[name])]
      names = [names[list(self._refs[name]).index(i)] for i in order]
      digests = [digests[list(self._refs[name]).index(i)] for i in order]
    else:
      tokens = self._split_tokens(handle, self._refs[name], table)
    bank = self._bank_of(tokens, names, digests, model)
    self.last_build_s = time.perf_counter() - start
    if path is not None and jax.process_index() == 0:
      banks.save(bank, path)
    self._category_banks[name] = bank.bank
    return bank

  # ---- scoring ----------------------------------------------------------
  def _bank_of(self, tokens, names, digests, model: dict):
    """A `Bank` of raw reference tokens [L, k, P, D] with `eval.coreset`."""
    h, w = self.model.grid
    if isinstance(tokens, np.ndarray):
      tokens = tokens.reshape(tokens.shape[:2] + (h, w, tokens.shape[-1]))
    mesh = self.mesh if self.mesh.shape[sharding.DATA] > 1 else None
    return banks.build(tokens, names=names, image_digests=digests, **model, mesh=mesh,
                       coreset=float(self.cfg.eval.coreset),
                       coreset_seed=int(self.cfg.eval.coreset_seed))

  def _neighbour_maps(self, got: dict, keep: np.ndarray, bank=None) -> np.ndarray:
    """Patch-grid maps [n_keep, h, w] of the kept images (the others: references),
    few_shot against `bank` (the category's `Bank`)."""
    h, w = self.model.grid
    tok = got["tokens"]
    if isinstance(tok, np.ndarray):        # else per-layer `token_cache.Rows`
      tok = tok.reshape(tok.shape[:2] + (h, w, tok.shape[-1]))
    n = len(tok[0])
    mesh = self.mesh if self.mesh.shape[sharding.DATA] > 1 else None
    r_list = tuple(int(r) for r in self.cfg.eval.r_list)
    subset = int(self.cfg.eval.batch_subset)
    if self.kind == "batch" and subset and n >= 2 * subset:
      name = getattr(self, "_category", "")
      progress = run_log.Progress(f"batch scoring {name} (subsets of {subset} or more)", n,
                                  enabled=jax.process_index() == 0, every_s=5.0)
      maps = neighbors.mutual_maps_subsets(tok, subset, r_list, mesh=mesh,
                                           progress=progress.update)
      progress.close()
      return maps[keep]
    if self.kind == "batch":
      return neighbors.mutual_maps(tok, r_list, mesh=mesh)[keep]
    if bank is None:        # the references among `got` (not stored: no identity known)
      k = int((~keep).sum())
      bank = self._bank_of(_take(tok, ~keep), ["?"] * k, [str(i) for i in range(k)],
                           {"backbone": "?", "layers": (), "image_size": 0, "r_list": r_list})
    return neighbors.bank_maps(_take(tok, keep), bank.features, r_list, mesh=mesh)

  def _score_category(self, got: dict, refs: np.ndarray, bank=None) -> dict:
    """-> rows (score, label, map, mask, has_mask, index) of the scored images."""
    keep = ~np.isin(got["index"], refs)
    maps = upsample(self._neighbour_maps(got, keep, bank), self.model.out_hw)
    glob = got["glob"][keep]
    if self.with_head:
      how = self.cfg.eval.combine
      maps = 0.5 * (normalise(got["head_map"][keep], how) + normalise(maps, how))
    scores = maps.reshape(len(maps), -1).max(-1)
    if self.kind == "batch":
      scores = neighbors.refine_scores(scores, glob, tuple(self.cfg.eval.rscin_k))
    rows = {k: got[k][keep] for k in ("label", "mask", "has_mask", "index")}
    rows.update(map=maps.astype(np.float32), score=np.asarray(scores, np.float32))
    return rows


def build_banks(cfg, workdir: Path, towers, mesh) -> dict[str, dict[str, Path]]:
  """mode=build_bank: the few-shot bank of every category of every present
  target, built (always anew) and stored in the workdir
  (`Workdir.category_bank`), with one line per bank (size, build time).
  Returns {data set: {category: path}}."""
  # The bank is the same for few_shot and zero_shot+few_shot: built head-free.
  scorer = NeighbourScorer(schema.replace(cfg, **{"eval.scoring": "few_shot"}), towers, mesh,
                           None, workdir)
  out = {}
  for target in datasets.targets(cfg):
    try:
      handle = datasets.prepare(cfg, target)
    except datasets.data.DatasetNotFoundError as e:
      print(f"{target}: not present ({str(e).splitlines()[0]})", flush=True)
      continue
    scorer.check(handle)
    scorer.extra_identity(handle)
    out[handle.display_name] = {}
    for ci, name in enumerate(handle.categories):
      if not (handle.example_category == ci).any():
        continue
      start = time.perf_counter()
      bank = scorer.category_bank(handle, name, None, None, rebuild=True)
      path = Workdir(workdir).category_bank(handle.display_name, name)
      out[handle.display_name][name] = path
      if jax.process_index() == 0:
        shape = "x".join(map(str, bank.features.shape))
        print(f"{handle.display_name}/{name}: bank of {bank.count} references, "
              f"{bank.features.shape[2]} patches per layer and r ({shape}, "
              f"{bank.nbytes / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s "
              f"-> {path}", flush=True)
  return out


def _take(tokens, idx):
  """Images `idx` of raw tokens: an array [L, n, ...] or per-layer `Rows` views."""
  if isinstance(tokens, np.ndarray):
    return tokens[:, idx]
  return [layer.take(idx) for layer in tokens]
