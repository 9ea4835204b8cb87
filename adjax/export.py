"""Exports a trained run as one self-contained file: ONNX or serialized StableHLO.

  python -m adjax.export --workdir runs/mvtec --object-names bottle,screw \
      --format onnx|stablehlo --out model.onnx \
      [--image-size 512] [--dtype float32|bfloat16] [--config CFG[:arg]] [--set k=v]

The file holds the frozen backbone, the trained head and the text table of
the given object names (their prompt-ensemble embeddings), all as constants:
- inputs `images` uint8 [B, H, W, 3] RGB at H = W = image size (resize as
  the data pipeline does: PIL bilinear) and `object_index` int32 [B], an
  index into the object names; normalisation (/255, ImageNet mean and std)
  happens inside;
- outputs `anomaly_map` float32 [B, H, W] and `image_score` float32 [B], the
  numbers `mode=predict` writes, and `decision` bool [B] (image_score >= the
  object's image threshold, a per-object vector indexed by object_index,
  chosen by `thresholds.resolve` as predict chooses it) when
  `<workdir>/thresholds.json` exists and was made for this model and
  image-score mode. The thresholds (image and pixel) and where each comes
  from are in the metadata.
An `object_index` outside [0, number of names) gives NaN outputs for that
image. The batch dimension is dynamic; an ONNX file gives empty outputs
for a batch of 0 images (`guard_empty_batch`).

ONNX goes through jax2onnx (`pip install 'adjax[export]'`); the model's
object names, image size and threshold are in its metadata_props. StableHLO
goes through `jax.export` and is loaded back, without adjax, by
`jax.export.deserialize(open(f, "rb").read()).call(images, object_index)`,
which returns a dict with the outputs above; the names and settings go to a
`<out>.json` beside it. Files are written atomically.

With `--references DIR` (no `--object-names`) the file is the few-shot
scorer instead (`build_few_shot`): no head or text tower, the Detector's
bank of the normal images of DIR (`Detector.use_references`: loaded from
the workdir when stored there, else built and stored) as a constant, or a
stored bank file given as `--references FILE.bank.npz` (checked on load:
a damaged file or one made for another model is refused in one line); input
`images` only, outputs `anomaly_map`, `image_score` and `decision`
(image_score >= the image threshold) when the workdir's few-shot record
(`thresholds.few_shot.json`, from evaluation or calibration) was made with
this bank (`thresholds.resolve`, as predict decides; a record of another
bank is refused), or with `--threshold T` (which replaces its image
threshold); it scores as `Detector.predict(images, scoring="few_shot")`
after `use_references(DIR)`.

The model's forward pass is `_anomaly_forward`, composed from the project's
public pieces (backbone features, head, image score).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
from pathlib import Path
import sys
import tempfile
from typing import Callable, Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from adjax import loading, neighbors
from adjax import towers as towers_lib
from adjax.common import atomic, errors, quiet, sharding
from adjax.common.errors import UserError
from adjax.config import load as run_config
from adjax.config import schema
from adjax.data.images import IMAGE_EXTENSIONS, read_image_folder
from adjax.detector import Detector, DetectorError
from adjax.models import head as head_lib
from adjax.models import vit
from adjax.workdir import Workdir, banks, checkpoints, thresholds
from adjax.workdir.lock import WorkdirLock

# transformers announces at import that PyTorch is absent (it is optional).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FORMATS = ("onnx", "stablehlo")
EXTRA_HINT = "pip install 'adjax[export]'"
OUTPUT_NAMES = ("anomaly_map", "image_score", "decision")
INPUT_NAMES = ("images", "object_index")


class ExportError(UserError, ValueError):
  """The run cannot be exported; the message says why and what to do."""


@dataclasses.dataclass
class Exportable:
  """A run's deployable function and what describes it."""
  fn: Callable            # (images uint8 [B,S,S,3], object_index int32 [B]) -> dict
  image_size: int
  object_names: list[str]
  image_threshold: list[float | None] | None   # per object name; None: no decision
  metadata: dict


def _check_names(object_names: Sequence[str]) -> list[str]:
  names = [n.strip() for n in object_names]
  if not names or any(not n for n in names):
    raise ExportError(f"--object-names {','.join(object_names)!r}: give one or more "
                      "non-empty comma-separated names, e.g. bottle,screw")
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ExportError(f"--object-names: {dupes} given more than once; each name is one "
                      "object_index")
  return names


def _f32_at_least(t: float) -> np.float32:
  """The smallest float32 >= t: for a float32 score s, `s >= it` exactly when
  `s >= t` in float64 (what predict computes)."""
  f = np.float32(t)
  return f if float(f) >= t else np.nextafter(f, np.float32(np.inf))


def load_config(workdir, config: str | None = None, overrides: Sequence[str] = ()):
  """The run's config (a config file, else the workdir's config.json), typed."""
  try:
    if config:
      return schema.from_configdict(run_config.from_file(config, overrides))
    return schema.from_configdict(run_config.from_workdir(workdir, overrides))
  except (run_config.RunConfigError, schema.ResolveError) as e:
    raise ExportError(str(e)) from None


def build(workdir, object_names: Sequence[str], *, config: str | None = None,
          overrides: Sequence[str] = (), image_size: int | None = None,
          dtype: str | None = None, allow_new_objects: bool = False) -> Exportable:
  """Loads the run in `workdir` and closes the forward pass over its weights."""
  workdir = Path(workdir)
  names = _check_names(object_names)
  if not workdir.is_dir():
    raise ExportError(f"--workdir {workdir}: no such directory")
  cfg = load_config(workdir, config, overrides)
  if dtype:
    if dtype not in ("float32", "bfloat16"):
      raise ExportError(f"--dtype {dtype}: expected float32 or bfloat16")
    cfg = schema.replace(cfg, **{"backbone.dtype": dtype})
  size = int(image_size or cfg.image_size)
  source = workdir if Workdir(workdir).checkpoints.is_dir() else (
      Path(cfg.init_from) if cfg.init_from and Workdir(cfg.init_from).checkpoints.is_dir()
      else None)
  step = None
  if source is not None:
    ckpts = checkpoints.RunCheckpoints(source, cfg.checkpoints_to_keep)
    try:
      step = ckpts.latest_step()
    finally:
      ckpts.close()
  if step is None:
    raise ExportError(f"{workdir}: no trained checkpoint (checkpoints/ with a complete "
                      "step); train first (mode=train), or import a release head with "
                      "python -m converters.head")
  cfg = schema.replace(cfg, **{"mesh.data": 1, "mesh.model": 1})
  towers = towers_lib.build(cfg, workdir)
  try:   # the size checked first, to name the flag (load_head builds the same model)
    dataclasses.replace(towers.model(cfg.model), image_size=size)
  except ValueError as e:
    raise ExportError(f"--image-size {size}: {e}") from None
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  # The newest intact step (a damaged newer one is reported and skipped), and
  # its thresholds.json checked for this head at this size.
  try:
    head = loading.load_head(cfg, workdir, towers=towers, mesh=mesh, image_size=size)
  except thresholds.ThresholdError as e:
    raise ExportError(f"{e} (or remove it to export without a decision output)") from None
  model, params, step, record = head.model, jax.device_get(head.params), head.step, head.record
  table = np.asarray(towers.text_embed(names), np.float32)
  identity = head.threshold_model
  # Each object is decided with its own threshold, chosen by the rule predict
  # uses (thresholds.resolve): the file decides as predict does.
  if record is not None and not allow_new_objects:
    known = head.known_objects
    unknown = [n for n in names
               if thresholds.category_of(dict.fromkeys(known), n) is None]
    if known and unknown:
      raise ExportError(
          f"--object-names: {unknown} not among the categories of {record['_path']} "
          f"({', '.join(known)}); a misspelt name gets another prompt and the top-level "
          "threshold. Pass --allow-new-objects to export them anyway")
  chosen = [thresholds.resolve(record, n) for n in names]
  image_thresholds = [c.image for c in chosen]
  threshold = image_thresholds if any(t is not None for t in image_thresholds) else None
  backbone, kind = towers.backbone, model.image_score
  table_j = jnp.asarray(table)
  # An object without an image threshold gets NaN: its decision is False.
  limit_j = jnp.asarray([np.nan if t is None else _f32_at_least(t)
                         for t in image_thresholds], jnp.float32)
  num_objects = len(names)

  def fn(images, object_index):
    idx = object_index.astype(jnp.int32)
    valid = (idx >= 0) & (idx < num_objects)
    # What predict computes, from raw pixels (the model normalises them).
    amap, score = model.anomaly(params, backbone, table_j, images,
                                jnp.clip(idx, 0, num_objects - 1))
    nan = jnp.float32(jnp.nan)
    out = {"anomaly_map": jnp.where(valid[:, None, None], amap, nan).astype(jnp.float32),
           "image_score": jnp.where(valid, score, nan).astype(jnp.float32)}
    if threshold is not None:
      out["decision"] = out["image_score"] >= limit_j[jnp.clip(idx, 0, num_objects - 1)]
    return out

  metadata = {"object_names": names, "image_size": size,
              "image_thresholds": image_thresholds,
              "pixel_thresholds": [c.pixel for c in chosen],
              "threshold_sources": [c.source for c in chosen],
              "thresholds_file": None if record is None else {
                  k: record[k] for k in ("dataset", "method", "checkpoint_step")},
              "image_score": kind, "backbone_dtype": cfg.backbone.dtype,
              "checkpoint_step": step, "model": identity,
              "inputs": list(INPUT_NAMES),
              "outputs": list(OUTPUT_NAMES if threshold is not None else OUTPUT_NAMES[:2])}
  return Exportable(fn, size, names, threshold, metadata)


FEW_SHOT_INPUTS = ("images",)


def _check_references(references) -> Path:
  """The --references folder, refused unless it holds a readable image, or a
  stored bank file (`*.bank.npz`, checked when loaded)."""
  refs = Path(references)
  if refs.name.endswith(banks.SUFFIX) and refs.is_file():
    return refs
  if not refs.is_dir():
    raise ExportError(f"--references {refs}: no such folder; give a folder of normal "
                      "images of the object")
  try:
    paths, unreadable = read_image_folder(refs)
  except FileNotFoundError:
    paths, unreadable = [], []
  if not paths:
    raise ExportError(f"--references {refs}: no readable images (searched recursively for "
                      f"{', '.join(IMAGE_EXTENSIONS)}" + (
                          f"; {len(unreadable)} unreadable, e.g. {unreadable[0][0]}: "
                          f"{unreadable[0][1]}" if unreadable else "") + ")")
  return refs


def build_few_shot(workdir, references, *, config: str | None = None,
                   overrides: Sequence[str] = (), image_size: int | None = None,
                   dtype: str | None = None, threshold: float | None = None) -> Exportable:
  """The few-shot function: the backbone (no head, no text tower) and the
  Detector's memory bank (`Detector.references_from(references)`: the normal
  images of a folder, built or loaded from the workdir, or a stored
  `*.bank.npz`; its features one constant), scored as
  `Detector(...).predict(images, scoring="few_shot")` scores them. A head in
  the workdir is not used."""

  refs = _check_references(references)
  workdir = Path(workdir)
  cfg = load_config(workdir, config, overrides)
  if dtype:
    if dtype not in ("float32", "bfloat16"):
      raise ExportError(f"--dtype {dtype}: expected float32 or bfloat16")
    cfg = schema.replace(cfg, **{"backbone.dtype": dtype})
  if image_size:
    cfg = schema.replace(cfg, image_size=int(image_size))
  cfg = schema.replace(cfg, **{"predict.scoring": "few_shot"})
  try:
    det = Detector.from_config(cfg, workdir)
    count = det.references_from(refs)
  except DetectorError as e:
    raise ExportError(f"--references {refs}: {e}") from None
  except ValueError as e:
    raise ExportError(str(e)) from None
  # The few-shot record made with this bank decides, as Detector.predict does.
  try:
    chosen = det.thresholds_for("", "few_shot")
  except thresholds.ThresholdError as e:
    raise ExportError(f"{e} (or remove it to export without a decision output)") from None
  record = det.record_for("few_shot")
  if threshold is not None:
    chosen = thresholds.Resolved(float(threshold), chosen.pixel, "--threshold")
  threshold = chosen.image
  model, r_list = det.model, det.r_list
  # The Detector's bank, as it scores with it (built, or loaded from the workdir).
  bank_array = det.references.features
  backbone = det.backbone_module()
  (h, w), out_hw = model.grid, model.out_hw
  limit = None if threshold is None else _f32_at_least(float(threshold))

  def fn(images):
    # The tapped blocks' raw patch tokens (no standardisation), as the Detector's.
    tokens, _ = model.raw_tokens(backbone, images)
    tokens = tokens.reshape(tokens.shape[:2] + (h, w, tokens.shape[-1]))
    grid = neighbors.reference_maps_dense(tokens, jnp.asarray(bank_array), r_list)
    amap = head_lib.upsample_align_corners(grid[..., None], out_hw)[..., 0]
    out = {"anomaly_map": amap.astype(jnp.float32),
           "image_score": jnp.max(amap.reshape(amap.shape[0], -1), axis=-1)}
    if limit is not None:
      out["decision"] = out["image_score"] >= limit
    return out

  names = [os.path.basename(p) if p else "<array>" for p in det.reference_paths]
  bank = det.references
  metadata = {"scoring": "few_shot", "image_size": int(model.image_size),
              "references": names, "reference_count": count, "r_list": list(r_list),
              "bank_shape": list(bank.features.shape), "coreset": det.coreset,
              "bank_content_sha256": bank.content_digest(),
              "image_threshold": threshold,
              "pixel_threshold": chosen.pixel, "threshold_source": chosen.source,
              "bank": det.bank,
              "thresholds_file": None if record is None else {
                  k: record.get(k) for k in ("dataset", "method", "scoring", "_path")},
              "backbone_id": det.towers.backbone_id, "layers": list(model.layers),
              "backbone_dtype": cfg.backbone.dtype,
              "inputs": list(FEW_SHOT_INPUTS),
              "outputs": list(OUTPUT_NAMES if limit is not None else OUTPUT_NAMES[:2])}
  return Exportable(fn, int(model.image_size), [], None if threshold is None else
                    [threshold], metadata)


def _input_specs(size: int, batch, inputs: Sequence[str] = INPUT_NAMES):
  specs = {"images": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
           "object_index": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  return tuple(specs[k] for k in inputs)


def to_stablehlo(exp: Exportable, platforms: Sequence[str] | None = None) -> bytes:
  (batch,) = jax.export.symbolic_shape("batch")
  with jax.default_matmul_precision("float32"):
    exported = jax.export.export(jax.jit(exp.fn), platforms=platforms)(
        *_input_specs(exp.image_size, batch, exp.metadata["inputs"]))
  return bytes(exported.serialize())


# An ONNX file is one protobuf, which stops at 2 GiB: a larger model (a big
# few-shot bank) keeps its tensors in `<out>.data` beside it (ONNX external
# data; onnxruntime reads it from the model's folder). Tests lower it.
EXTERNAL_DATA_BYTES = 2**31 - 2**24


def to_onnx(exp: Exportable) -> bytes:
  """The ONNX file's bytes (`onnx_model` serialised); over protobuf's limit
  refused: `export` writes such a model with external data instead."""
  model = onnx_model(exp)
  if model.ByteSize() >= 2**31:
    raise ExportError(f"the ONNX model is {model.ByteSize() / 2**30:.1f} GiB, over "
                      "protobuf's 2 GiB single-file limit: write it with export(), which "
                      "keeps its tensors in external data")
  return model.SerializeToString()


def write_onnx(model, out: Path) -> int:
  """Writes `model` to `out` atomically, as one file, or, from
  `EXTERNAL_DATA_BYTES` up, with its tensors in `<out>.data` beside it (the
  data file put in place first, the model last: the model's presence means
  both are complete). Returns the bytes written."""
  import onnx  # deferred: optional, the [export] extra
  if model.ByteSize() < EXTERNAL_DATA_BYTES:
    data = model.SerializeToString()
    atomic.write_bytes(out, data)
    return len(data)
  data_name = out.name + ".data"
  with atomic.scratch_dir(out.parent, out.name) as tmp:
    onnx.save_model(model, str(tmp / out.name), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    written = sum((tmp / n).stat().st_size for n in (out.name, data_name))
    os.replace(tmp / data_name, out.parent / data_name)
    os.replace(tmp / out.name, out)
  return written


def onnx_model(exp: Exportable):
  try:
    import jax2onnx  # deferred: optional, the [export] extra
    import onnx  # noqa: F401  deferred: optional; jax2onnx needs it (checked for the message)
  except ImportError as e:
    raise ExportError(f"--format onnx needs jax2onnx and onnx ({e.name} is not "
                      f"installed): {EXTRA_HINT}") from None
  outputs, inputs = exp.metadata["outputs"], exp.metadata["inputs"]

  def positional(*args):
    out = exp.fn(*args)
    return tuple(out[k] for k in outputs)

  # ONNX carries no platforms: the attention path of the backend exporting,
  # as before platform-dependent paths (jax2onnx knows no platform_index).
  with _quiet_jax2onnx(), vit.attention_for(jax.default_backend()):
    model = jax2onnx.to_onnx(positional, _input_specs(exp.image_size, "B", inputs),
                             model_name="adjax_anomaly", input_names=list(inputs),
                             output_names=list(outputs))
  drop_unused_initializers(model)
  guard_empty_batch(model)
  for key, value in exp.metadata.items():
    entry = model.metadata_props.add()
    entry.key, entry.value = key, json.dumps(value)
  return model


def guard_empty_batch(model) -> None:
  """Wraps the graph in an `If` on the batch size: a batch of 0 images gets
  empty outputs of the declared types (onnxruntime runs the converted graph
  on it into an integer division by zero, SIGFPE, which kills the calling
  process); any other batch runs the graph unchanged. The graph's first
  input carries the batch dimension."""
  import onnx  # deferred: optional, the [export] extra
  from onnx import helper, numpy_helper  # deferred: optional, the [export] extra
  g = model.graph
  batch = g.input[0].name
  inner = {o.name: o.name + "__graph" for o in g.output}

  def renamed(names):
    return [inner.get(n, n) for n in names]

  body = helper.make_graph([], "adjax_graph", [], [])
  for node in g.node:
    copy = body.node.add()
    copy.CopyFrom(node)
    copy.input[:] = renamed(node.input)
    copy.output[:] = renamed(node.output)
  body.value_info.extend(g.value_info)
  empty = helper.make_graph([], "adjax_empty_batch", [], [])
  for out in g.output:
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim[1:]]
    dtype = helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type)
    const = numpy_helper.from_array(np.zeros([0] + dims, dtype), out.name + "__empty")
    empty.node.append(helper.make_node("Constant", [], [out.name + "__empty"], value=const))
    graph_out, empty_out = onnx.ValueInfoProto(), onnx.ValueInfoProto()
    graph_out.CopyFrom(out)
    graph_out.name = inner[out.name]
    empty_out.CopyFrom(out)
    empty_out.name = out.name + "__empty"
    body.output.append(graph_out)
    empty.output.append(empty_out)
  guard = [helper.make_node("Shape", [batch], ["adjax_input_shape"]),
           helper.make_node("Gather", ["adjax_input_shape", "adjax_batch_axis"],
                            ["adjax_batch_size"]),
           helper.make_node("Squeeze", ["adjax_batch_size"], ["adjax_batch_scalar"]),
           helper.make_node("Equal", ["adjax_batch_scalar", "adjax_batch_zero"],
                            ["adjax_batch_is_empty"]),
           helper.make_node("If", ["adjax_batch_is_empty"], [o.name for o in g.output],
                            then_branch=empty, else_branch=body)]
  del g.node[:]
  del g.value_info[:]
  g.node.extend(guard)
  g.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), "adjax_batch_zero"),
                        numpy_helper.from_array(np.array([0], np.int64), "adjax_batch_axis")])


class _quiet_jax2onnx:
  """Silences the converters' chatter: jax2onnx logs its example plugins'
  missing extras at import, onnx_ir warns about each value it renames or
  folds. Warnings and log records below ERROR are dropped while exporting."""

  LOGGERS = ("jax2onnx", "onnx_ir", "onnxscript", "onnx")

  def __enter__(self):
    self._levels = {}
    for name in self.LOGGERS:
      logger = logging.getLogger(name)
      self._levels[name] = logger.level
      logger.setLevel(logging.ERROR)
    self._warnings = warnings.catch_warnings()
    self._warnings.__enter__()
    warnings.simplefilter("ignore")

  def __exit__(self, *exc):
    self._warnings.__exit__(*exc)
    for name, level in self._levels.items():
      logging.getLogger(name).setLevel(level)


def drop_unused_initializers(model) -> int:
  """Removes initializers no node reads, in the graph and in every subgraph
  (a Scan's body has its own), so onnxruntime does not warn "Removing
  initializer" on every session. Returns how many were removed."""

  def subgraphs(graph):
    for node in graph.node:
      for attr in node.attribute:
        if attr.HasField("g"):
          yield attr.g
        yield from attr.graphs

  def clean(graph) -> tuple[set, int]:
    """(names read in `graph` or below, initializers removed in and below)."""
    used = {o.name for o in graph.output}
    removed = 0
    for node in graph.node:
      used.update(node.input)
    for sub in subgraphs(graph):
      inner, n = clean(sub)
      used |= inner
      removed += n
    keep = [t for t in graph.initializer if t.name in used]
    gone = {t.name for t in graph.initializer} - {t.name for t in keep}
    if gone:
      del graph.initializer[:]
      graph.initializer.extend(keep)
      inputs = [i for i in graph.input if i.name not in gone]
      del graph.input[:]
      graph.input.extend(inputs)
    return used, removed + len(gone)

  return clean(model.graph)[1]


@contextlib.contextmanager
def _reading_lock(workdir):
  """`WorkdirLock` on the workdir while the export reads it; a workdir this
  user cannot write (read-only file system or permissions) is read without
  it (no run of this user can write it either), and said."""
  lock = WorkdirLock(workdir)
  try:
    lock.__enter__()
  except OSError as e:
    if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
      raise
    print(f"note: {workdir} is not writable ({e.strerror}); reading it without its lock",
          file=sys.stderr, flush=True)
    yield
    return
  try:
    yield
  finally:
    lock.__exit__(*sys.exc_info())


def _check_out(out: Path, overwrite: bool) -> None:
  if out.is_dir():
    raise ExportError(f"--out {out}: is a directory; give a file name, e.g. "
                      f"{out / 'model.onnx'}")
  if not out.parent.is_dir():
    raise ExportError(f"--out {out}: the folder {out.parent} does not exist")
  if out.exists() and not overwrite:
    raise ExportError(f"--out {out}: exists; pass --overwrite to replace it")
  # Before the towers are built: a folder that cannot be written (permission,
  # a read-only file system) fails now, not after the export's work.
  try:
    with tempfile.TemporaryFile(dir=out.parent):
      pass
  except OSError as e:
    raise ExportError(f"--out {out}: cannot write in {out.parent} ({e.strerror or e}); "
                      "give --out in a writable folder") from None


def export(workdir, object_names: Sequence[str], fmt: str, out, overwrite: bool = False,
           **kwargs) -> dict:
  """Builds and writes the file `out` (atomically; an existing one only with
  `overwrite`); returns its metadata."""
  if fmt not in FORMATS:
    raise ExportError(f"--format {fmt}: expected one of {FORMATS}")
  references = kwargs.pop("references", None)
  threshold = kwargs.pop("threshold", None)
  if references is not None:
    if object_names:
      raise ExportError("--object-names: not used with --references (the few-shot file "
                        "scores every image against the one memory bank); leave it out")
    if kwargs.pop("allow_new_objects", False):
      raise ExportError("--allow-new-objects: not used with --references")
    if threshold is not None and not np.isfinite(threshold):
      raise ExportError(f"--threshold {threshold}: expected a finite number (the decision "
                        "is image_score >= it)")
    _check_references(references)
  else:
    if threshold is not None:
      raise ExportError("--threshold: only with --references (a trained run's decision "
                        "threshold comes from its thresholds.json)")
    _check_names(object_names or [])
  if not Path(workdir).is_dir():
    raise ExportError(f"--workdir {workdir}: no such directory")
  # Fail before the towers are built. jax.export's serialization needs flatbuffers.
  needed = ("jax2onnx", "onnx") if fmt == "onnx" else ("flatbuffers",)
  for module in needed:
    try:
      with _quiet_jax2onnx():
        __import__(module)
    except ImportError:
      raise ExportError(f"--format {fmt} needs {' and '.join(needed)} ({module} is not "
                        f"installed): {EXTRA_HINT}") from None
  out = Path(out)
  _check_out(out, overwrite)
  platforms = kwargs.pop("platforms", None)
  # The command line says what a long wait is doing (adjax.common.quiet).
  wait = quiet.announce_if_slow if kwargs.pop("progress", False) else (
      lambda line: contextlib.nullcontext())
  # The workdir's lock, as predict takes it: a training run cannot write or
  # prune the checkpoint step while it is read (one consistent step).
  with _reading_lock(workdir), wait(f"loading {workdir} (towers and head)"):
    if references is not None:
      exp = build_few_shot(workdir, references, threshold=threshold, **kwargs)
    else:
      exp = build(workdir, object_names, **kwargs)
  with wait(f"tracing the model into {fmt} (the longest step)"):
    data = onnx_model(exp) if fmt == "onnx" else to_stablehlo(exp, platforms)
  if fmt == "onnx":
    external = data.ByteSize() >= EXTERNAL_DATA_BYTES
    return dict(exp.metadata, format=fmt, bytes=write_onnx(data, out),
                external_data=(out.name + ".data") if external else None)
  meta = dict(exp.metadata, format=fmt, bytes=len(data))
  atomic.write_text(out.with_name(out.name + ".json"), json.dumps(meta, indent=2))
  atomic.write_bytes(out, data)
  return meta


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m adjax.export",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained (or imported) run")
  parser.add_argument("--object-names", default=None,
                      help="comma-separated object names; object_index i is the i-th "
                           "(required unless --references)")
  parser.add_argument("--references", default=None, metavar="DIR",
                      help="few-shot: a folder of normal images baked in as the memory "
                           "bank; the file scores images against them (no head used)")
  parser.add_argument("--threshold", type=float, default=None,
                      help="with --references: add a decision output, image_score >= it")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--out", required=True, help="the file to write")
  parser.add_argument("--image-size", type=int, default=None,
                      help="input height and width (default: the run's image_size)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="backbone matmul dtype (default: the run's backbone.dtype)")
  parser.add_argument("--config", default=None,
                      help="config file[:arg] (default: <workdir>/config.json)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. backbone.checkpoint=ckpts/vitl16")
  parser.add_argument("--platforms", default=None,
                      help="stablehlo: comma-separated platforms to lower for, e.g. "
                           "cpu,cuda (default: this machine's)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --out file")
  parser.add_argument("--allow-new-objects", action="store_true",
                      help="export object names thresholds.json has no category for "
                           "(they get the top-level threshold)")
  args = parser.parse_args(argv)
  if args.references is None and args.object_names is None:
    parser.error("--object-names is required (unless --references)")
  names = args.object_names.split(",") if args.object_names is not None else None
  rc, meta = errors.run_command(lambda: export(
      args.workdir, names, args.format, args.out, references=args.references,
      threshold=args.threshold,
      config=args.config, overrides=args.set, image_size=args.image_size, dtype=args.dtype,
      platforms=args.platforms.split(",") if args.platforms else None,
      overwrite=args.overwrite, allow_new_objects=args.allow_new_objects, progress=True))
  if rc:
    return rc
  if args.references is not None:
    if meta.get("external_data"):
      print(f"(tensors in {meta['external_data']} beside it: keep the two files together)")
    print(f"wrote {args.out} ({meta['bytes'] / 2**20:.1f} MiB, {args.format}): few-shot "
          f"against {meta['reference_count']} references, {meta['image_size']} px, outputs "
          f"{', '.join(meta['outputs'])}")
    return 0
  decision = " and decision" if any(
      t is not None for t in meta["image_thresholds"]) else ""
  print(f"wrote {args.out} ({meta['bytes'] / 2**20:.1f} MiB, {args.format}): "
        f"{len(meta['object_names'])} objects, {meta['image_size']} px, checkpoint step "
        f"{meta['checkpoint_step']}, outputs anomaly_map, image_score{decision}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
