"""The run config's fields, declared once: types, defaults, bounds, meaning.

Users write `ml_collections` config files and `--config.x=y` overrides
(`adjax.config.defaults.base_config()` is built from these declarations);
`resolve(cfg)` checks the whole config (every problem in one message, as
`adjax.config.check` always did) and turns it into a frozen `RunConfig`.
Everything below the commands reads the resolved `RunConfig`, or the part
of it that concerns it (`run.model`, `run.optimizer`, `run.eval`, ...),
never the `ConfigDict`; a variant is a `dataclasses.replace`, never an edit.
The configuration reference (`python -m adjax.config.doc`) is generated from
the `doc` of each field here.
"""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Any, Iterator, Mapping

import ml_collections

from adjax import modes

# Enumerations checked by `adjax.config.check` and listed by the reference.
MODES = ("train", "evaluate", "predict", "build_bank")
DTYPES = ("float32", "bfloat16")
FEATURE_CACHES = ("none", "memory", "disk")
BACKBONE_SHARDINGS = ("replicated", "model")
TEXT_ACTIVATIONS = ("", "gelu", "quick_gelu")
IMAGE_SCORES = modes.IMAGE_SCORES
PREDICT_SCORINGS = modes.PREDICT_SCORINGS

# Data sets the protocol evaluates on after training on MVTec AD (SPEC section 1).
MVTEC_TARGETS = ("visa", "mpdd", "btad", "isic", "clinicdb", "colondb", "tn3k")


def field(default: Any, doc: str, *, choices: tuple | None = None, minimum: int | None = None):
  """A declared field: its default, its meaning (the reference's text), and
  the bounds the config check enforces (`choices`, or an integer `minimum`)."""
  meta = {"doc": doc, "choices": choices, "minimum": minimum}
  if isinstance(default, type) and dataclasses.is_dataclass(default):
    return dataclasses.field(default_factory=default, metadata=meta)
  if isinstance(default, dict):
    frozen = types.MappingProxyType(dict(default))
    return dataclasses.field(default_factory=lambda: frozen, metadata={**meta, "mapping": True})
  return dataclasses.field(default=default, metadata=meta)


class Part:
  """A resolved group of fields; walks like a mapping for the fingerprints."""

  def items(self) -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(self):
      yield f.name, getattr(self, f.name)

  def to_dict(self) -> dict:
    return {k: (v.to_dict() if isinstance(v, Part) else
                dict(v) if isinstance(v, Mapping) else v) for k, v in self.items()}


def _frozen(cls):
  return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


# ---- the parts each layer receives ------------------------------------------
# The file's layout groups fields by where a user looks for them; these
# views group them by who reads them, so a layer takes only what it uses.

@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What the AD-DINOv3 model itself is made of (besides its towers)."""
  layers: tuple[int, ...]         # () = the backbone family's default four
  image_size: int
  image_score: str
  reference_quirks: bool


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int
  keep: int
  log_every_steps: int


@dataclasses.dataclass(frozen=True)
class FeatureCacheConfig:
  """The training run's backbone-feature cache."""
  kind: str                       # none | memory | disk
  dtype: str
  dir: str                        # "" = <workdir>/feature_cache


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
  """Multi-host start-up (jax.distributed)."""
  distributed: bool
  coordinator_address: str
  num_processes: int
  process_id: int


@_frozen
class BackboneConfig(Part):
  family: str = field("dinov3", "a row of adjax.models.backbones.FAMILIES: dinov3 | dinov2")
  variant: str = field("vitl16", "the family's VARIANTS name; \"\" = the checkpoint's own")
  checkpoint: str = field("checkpoints/dinov3_vitl16", "converted directory")
  hub_id: str = field(
      "facebook/dinov3-vitl16-pretrain-lvd1689m",
      "Hugging Face repository a missing backbone.checkpoint is fetched from, converted "
      "and verified at start (\"\" = never fetch). DINOv3 is gated: accept its licence on "
      "the hub and log in (hf auth login, or HF_TOKEN) first.")
  random_init: bool = field(False, "random weights of the variant (demo, benchmarks)")
  layers: tuple = field((5, 11, 17, 23), "tapped blocks; () = the family's default four")
  dtype: str = field("bfloat16", "matmul dtype; parameters, norms and softmax stay float32",
                     choices=DTYPES)


@_frozen
class TextConfig(Part):
  variant: str = field("vit-l-14", "CLIP text architecture (clip_text.VARIANTS), for random_init")
  checkpoint: str = field("checkpoints/clip_vitl14_336_text", "converted directory")
  hub_id: str = field("openai/clip-vit-large-patch14-336",
                      "where a missing text.checkpoint is fetched from (\"\" = never)")
  random_init: bool = field(False, "random weights of text.variant (demo, benchmarks)")
  activation: str = field("", "\"\" = the checkpoint's (quick_gelu), or gelu under the quirks",
                          choices=TEXT_ACTIVATIONS)
  display_names: Mapping[str, str] = field({}, "folder name -> readable object name")
  cache_dir: str = field("", "default: <workdir>/text_cache")


@_frozen
class DemoConfig(Part):
  root: str = field("", "Generated demo data (adjax.data.synthetic): when set, families a "
                    "and b are written there on first use")
  seed: int = field(0, "the generated data's seed")
  image_size: int = field(256, "generated images' side in pixels")
  per_category: int = field(30, "test images per category")
  train_per_category: int = field(0, "normal training images per category (<cat>/train/good)")


@_frozen
class DataConfig(Part):
  train: str = field("mvtec_ad", "a data set name, or a path to a folder in MVTec layout")
  targets: str = field(",".join(MVTEC_TARGETS), "comma-separated names or paths")
  data_dir: str = field("data/tfds", "where prepared data sets live")
  manual_dirs: Mapping[str, str] = field({
      "mvtec_ad": "data/mvtec_anomaly_detection",
      "visa": "data/VisA_20220922",
      "mpdd": "data/MPDD",
      "btad": "data/BTech_Dataset_transformed",
      "isic": "data/ISIC",
      "clinicdb": "data/CVC-ClinicDB",
      "colondb": "data/CVC-ColonDB",
      "tn3k": "data/TN3K",
  }, "Where each benchmark's raw download lies (read once, when it is prepared).")
  demo: DemoConfig = field(DemoConfig, "Generated demo data (adjax.data.synthetic)")
  worker_count: int = field(0, "grain worker processes decoding images (0: threads only)")
  prefetch: int = field(2, "batches decoded ahead")
  skip_bad_files: bool = field(False, "unreadable images become warnings, not errors")
  download: bool = field(
      False, "A benchmark with a published archive (mvtec_ad, visa) that is neither "
      "prepared nor under data.manual_dirs is downloaded into it, after its licence is "
      "printed: only with data.download=True, or a yes at a terminal.")
  sources: Mapping[str, str] = field(
      {"mvtec_ad": "", "visa": ""},
      "Per data set, \"URL#sha256=HEX\" replaces the published source (a mirror or a "
      "local copy); \"\" = the table in adjax/fetch/sources.py.")


@_frozen
class OptimizerConfig(Part):
  learning_rate: float = field(1e-5, "AdamW peak learning rate")
  b1: float = field(0.9, "AdamW first-moment decay")
  b2: float = field(0.999, "AdamW second-moment decay")
  weight_decay: float = field(0.01, "AdamW decoupled weight decay")
  warmup_fraction: float = field(0.03, "linear warm-up over this fraction of the steps")


@_frozen
class TrainConfig(Part):
  allow_no_anomalies: bool = field(
      False, "True: train on a set without anomalous images (the losses then only push "
      "every image and pixel toward \"normal\"; no defect is learned).")


@_frozen
class EvalConfig(Part):
  enabled: bool = field(True, "evaluate after training")
  batch_size: int = field(16, "global evaluation batch", minimum=1)
  image_score: str = field(
      "global", "global | max | mean (the model's rule, checked by adjax.ad_model)")
  fpr_limit: float = field(0.3, "AUPRO integrates the PRO curve up to this FPR")
  aupro_zsad: bool = field(False, "also report the ZSAD papers' AUPRO variant")
  heatmaps_per_category: int = field(4, "heatmap panels drawn per category")
  report_panels: int = field(
      2, "highest- and lowest-scoring panels per category (HTML report)")
  force: bool = field(False, "evaluate a finished run again")
  compare: tuple = field(
      (), "Modes evaluated after eval.scoring on the same targets, e.g. (\"few_shot\", "
      "\"batch\") (eval.scoring itself is not evaluated twice): each writes its own results (and, in a training run, its first "
      "deployment record); the run ends with one table of every mode evaluated and the "
      "report that shows them side by side (results/<target>.modes.html).")
  set_thresholds: bool = field(
      False, "True: this evaluation's F1-max thresholds replace the deployment record of "
      "its eval.scoring mode (<workdir>/thresholds.json for zero_shot, "
      "thresholds.<mode>.json otherwise; every evaluation writes its own beside its "
      "results; a training run's evaluation creates thresholds.json when none exists).")
  feature_cache: str = field(
      "none", "disk: each target's backbone features are stored once per (backbone, image "
      "size, layers, data set) and every later evaluation of any head runs the head only.",
      choices=("none", "disk"))
  feature_cache_dtype: str = field("float32", "float32: cached results equal uncached ones",
                                   choices=DTYPES)
  feature_cache_dir: str = field("", "default: <data.data_dir>/feature_cache")
  scoring: str = field(
      "zero_shot", "Scoring against neighbours (SPEC section 11): few_shot and batch need "
      "neither a trained head nor the text tower", choices=modes.SCORINGS)
  references: int = field(
      4, "few_shot: normal reference images per category (left out of the metrics); 0: all "
      "of them (with eval.references_dir or eval.references_split=train)", minimum=0)
  references_split: str = field(
      "test", "few_shot: test takes the references from the test split's good images (or "
      "eval.references_dir); train from the data set's own normal training images, "
      "<raw folder>/<category>/train/good (MVTec layout; the demo has them)",
      choices=("test", "train"))
  references_dir: str = field(
      "", "few_shot: folder with a subfolder per category of normal images (or a path with "
      "{category}, e.g. data/mvtec/{category}/train/good); the first eval.references (by "
      "path) are the bank and no test image is left out")
  coreset: float = field(
      0.0, "few_shot: 0 keeps every reference patch; a fraction in (0, 1] or a count > 1 of "
      "them kept per layer and r, by greedy k-center (PatchCore's coreset, adjax.coreset)")
  coreset_seed: int = field(0, "few_shot: the coreset's random start and projection")
  token_cache: str = field(
      "disk", "neighbour modes: disk keeps each target's raw patch tokens once per (backbone, "
      "image size, layers, data set) in <eval.feature_cache_dir>/raw_tokens, read by rows: "
      "later runs of any neighbour mode skip the backbone, and a category is read from disk, "
      "not held in memory (examples x layers x patches x width x 4 bytes)",
      choices=("none", "disk"))
  batch_subset: int = field(
      0, "batch: 0 scores each image against all others of its category; S >= 5: against "
      "the others of its random subset of about S (memory and time bounded in the "
      "category's size)")
  r_list: tuple = field(
      (1, 3, 5), "neighbour modes: LNAMD neighbourhood sizes (odd), maps averaged over them")
  rscin_k: tuple = field(
      (1, 2, 3), "batch: RsCIN k_list refining image scores ((1, 8, 9) for VisA in MuSc)")
  combine: str = field(
      "zscore", "zero_shot+...: each map normalised over its category, then averaged",
      choices=modes.COMBINES)


@_frozen
class PredictConfig(Part):
  input: str = field("", "folder or glob of images")
  object_name: str = field("", "required: the prompt's object name for these images")
  threshold: float = field(
      -1.0, ">= 0: the image threshold (else the mode's record's, if any)")
  calibrate_normals: str = field(
      "", "folder or glob of normal images: set predict.scoring's thresholds from them "
      "(few_shot: a reference among them is scored against the others)")
  calibrate_quantile: float = field(
      0.99, "their scores' quantile that becomes the threshold")
  batch_size: int = field(8, "images per prediction batch", minimum=1)
  scoring: str = field(
      "zero_shot", "few_shot and batch need neither a trained head nor the text tower "
      "(adjax.Detector). zero_shot | few_shot (against predict.references) | batch (the "
      "inputs together)", choices=PREDICT_SCORINGS)
  references: str = field(
      "", "few_shot: folder or glob of normal images of the object ({category} is replaced "
      "by predict.object_name, e.g. data/demo/family_b/{category}/train/good), or a stored "
      "bank (*.bank.npz, e.g. from mode=build_bank)")


@_frozen
class MeshConfig(Part):
  data: int = field(-1, "-1: all devices not used by \"model\"")
  model: int = field(1, "devices splitting the frozen backbone's weights", minimum=1)
  backbone_sharding: str = field(
      "replicated", "Devices: a mesh (\"data\", \"model\"). The batch is split on "
      "\"data\"; the trainable head is replicated; the frozen backbone's weights are "
      "either replicated or split over \"model\" (for towers that do not fit one device). "
      "replicated | model", choices=BACKBONE_SHARDINGS)


@_frozen
class RunConfig(Part):
  """The resolved run config: the file's fields, typed and frozen."""
  name: str = field("adjax", "run name; the default workdir is runs/<name>")
  mode: str = field("train", "train (then evaluate) | evaluate | predict | build_bank (the "
                    "few_shot bank of each target category, stored in the workdir)",
                    choices=MODES)
  workdir: str = field("", "default: runs/<name> (the same field as the --workdir flag)")
  init_from: str = field("", "a trained workdir whose head parameters start this run")
  resume_mismatch: str = field(
      "refuse", "A workdir remembers its training config; resuming it (or evaluating its "
      "head) under a config that differs in a result-changing field is refused unless this "
      "is \"allow\". refuse | allow", choices=("refuse", "allow"))
  seed: int = field(0, "head initialisation, data order, random towers")
  reference_quirks: bool = field(
      True, "One switch for the release's quirks (SPEC section 9): text columns mixed, "
      "exact GELU in the text tower, VisA masks thresholded at > 0, and a first optimiser "
      "step with learning rate 0.")
  backbone: BackboneConfig = field(BackboneConfig, "the frozen image tower")
  text: TextConfig = field(TextConfig, "the frozen CLIP text tower")
  data: DataConfig = field(DataConfig, "training and evaluation data")
  image_size: int = field(512, "model input side in pixels")
  batch_size: int = field(64, "global batch (all processes and devices)", minimum=1)
  epochs: int = field(100, "passes over the training set", minimum=1)
  optimizer: OptimizerConfig = field(OptimizerConfig, "AdamW with linear warm-up")
  feature_cache: str = field("none", "training features: none | memory | disk",
                             choices=FEATURE_CACHES)
  feature_cache_dtype: str = field(
      "bfloat16", "storage precision of cached features: bfloat16 | float32", choices=DTYPES)
  feature_cache_dir: str = field("", "default: <workdir>/feature_cache")
  checkpoint_every_steps: int = field(
      200, "save a resumable checkpoint this often (and at the end)", minimum=1)
  checkpoints_to_keep: int = field(2, "newest checkpoints kept", minimum=1)
  log_every_steps: int = field(
      10, "metrics.jsonl / TensorBoard / progress line cadence", minimum=1)
  train: TrainConfig = field(TrainConfig, "training data checks")
  eval: EvalConfig = field(EvalConfig, "evaluation and scoring modes")
  predict: PredictConfig = field(PredictConfig, "mode=predict")
  mesh: MeshConfig = field(MeshConfig, "devices")
  distributed: bool = field(False, "call jax.distributed.initialize() (multi-host)")
  coordinator_address: str = field(
      "", "host:port of process 0 (left empty on TPU VMs and SLURM/GPU clusters, where JAX "
      "finds it itself)")
  num_processes: int = field(0, "with coordinator_address: number of processes")
  process_id: int = field(-1, "with coordinator_address: this process's index")

  # ---- the parts each layer receives -------------------------------------
  @property
  def model(self) -> ModelConfig:
    return ModelConfig(layers=tuple(int(l) for l in self.backbone.layers),
                       image_size=int(self.image_size), image_score=self.eval.image_score,
                       reference_quirks=bool(self.reference_quirks))

  @property
  def checkpoints(self) -> CheckpointConfig:
    return CheckpointConfig(every_steps=self.checkpoint_every_steps,
                            keep=self.checkpoints_to_keep, log_every_steps=self.log_every_steps)

  @property
  def training_cache(self) -> FeatureCacheConfig:
    return FeatureCacheConfig(kind=self.feature_cache, dtype=self.feature_cache_dtype,
                              dir=self.feature_cache_dir)

  def to_json(self, **kwargs) -> str:
    """The config as the `config.json` files a run writes (declaration order)."""
    return to_configdict(self).to_json_best_effort(**kwargs)

  @property
  def processes(self) -> ProcessConfig:
    return ProcessConfig(distributed=bool(self.distributed),
                         coordinator_address=self.coordinator_address,
                         num_processes=self.num_processes, process_id=self.process_id)


def declared(cls=RunConfig, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
  """(dotted name, field) of every leaf field, in declaration order; a
  free-form mapping (`text.display_names`, `data.manual_dirs`) is one leaf."""
  for f in dataclasses.fields(cls):
    sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
    if isinstance(sub, type) and dataclasses.is_dataclass(sub):
      yield from declared(sub, f"{prefix}{f.name}.")
    else:
      yield f"{prefix}{f.name}", f


def default_value(f: dataclasses.Field):
  return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def to_configdict(obj=None):
  """A `ConfigDict` of a resolved config (or of the declared defaults), with
  the fields in declaration order: `base_config()`, and the `config.json`
  every run writes."""
  cls = type(obj) if obj is not None else RunConfig
  out = ml_collections.ConfigDict()
  for f in dataclasses.fields(cls):
    value = getattr(obj, f.name) if obj is not None else default_value(f)
    if isinstance(value, Part):
      out[f.name] = to_configdict(value)
    elif isinstance(value, Mapping):
      out[f.name] = ml_collections.ConfigDict(dict(value))
    else:
      out[f.name] = value
  return out


class ResolveError(ValueError):
  """The ConfigDict does not have the declared shape (a field missing)."""


def from_configdict(cfg, cls=RunConfig, prefix: str = ""):
  """A ConfigDict (or a plain nested dict) as the frozen `cls`."""
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in cfg:
      raise ResolveError(f"the config has no field {prefix}{f.name!r}")
    value = cfg[f.name]
    sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
    if isinstance(sub, type) and dataclasses.is_dataclass(sub):
      value = from_configdict(value, sub, f"{prefix}{f.name}.")
    elif f.metadata.get("mapping"):
      # (a ConfigDict iterates its keys sorted; its JSON keeps the file's order)
      value = types.MappingProxyType(
          json.loads(value.to_json_best_effort()) if hasattr(value, "to_json_best_effort")
          else dict(value))
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[f.name] = value
  return cls(**kwargs)


def replace(run, **changes):
  """`dataclasses.replace` by dotted path: `replace(run, **{"eval.scoring": "batch"})`."""
  nested: dict[str, dict] = {}
  flat = {}
  for key, value in changes.items():
    head, dot, rest = key.partition(".")
    if dot:
      nested.setdefault(head, {})[rest] = value
    else:
      flat[key] = value
  for head, sub in nested.items():
    flat[head] = replace(getattr(run, head), **sub)
  return dataclasses.replace(run, **flat)
