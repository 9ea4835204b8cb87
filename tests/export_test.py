"""adjax.export: ONNX and StableHLO files give the JAX model's maps and scores.

A tiny DINOv3 (custom config) and the tiny text tower, with a head imported
from a random release-layout file, are exported once per format; the file is
run at batch sizes 1 and 3 (onnxruntime; `jax.export.deserialize` in a
subprocess that never imports adjax) and compared with the JAX function and
with the evaluation step on pipeline-normalised images (what predict writes).
"""

import json
import os
import subprocess
import re
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from adjax.config import load as run_config
from adjax import export, steps
from adjax.workdir import thresholds
from adjax import towers as towers_lib
from adjax.data import images as data_images
from adjax.models import dinov3
from adjax.workdir import THRESHOLDS_FILE
from converters import head as head_converter

sys.path.insert(0, str(Path(__file__).parent))
from head_converter_test import release_state, tiny_config  # noqa: E402
import doc_blocks  # noqa: E402

TINY = dinov3.DinoV3Config(64, 4, 2, "mlp", 128, name="export-test-tiny")
SIZE = 32
NAMES = ["bottle", "screw"]
TOL = 1e-4

# The onnxruntime snippet in docs/deploy.md (onnxruntime, numpy and pillow
# only): `python snippet.py model.onnx image.png heatmap.png`. Read from the
# page, so the documented code is the code tested.
ORT_SNIPPET = doc_blocks.block("docs/deploy.md", "onnxruntime as ort")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setitem(dinov3.VARIANTS, TINY.name, TINY)
  tmp = tmp_path_factory.mktemp("export")
  src = tmp / "release.pth"
  torch.save(release_state(feature_dim=TINY.dim, text_dim=256, seed=3), src)
  cfg = tiny_config()
  cfg.backbone.variant = TINY.name
  cfg.backbone.layers = (0, 1, 2, 3)
  cfg.backbone.dtype = "float32"
  cfg.image_size = SIZE
  cfg.eval.image_score = "mean"
  cfg.text.cache_dir = str(tmp / "text_cache")
  head_converter.convert(str(src), str(tmp / "run"), cfg)
  yield tmp / "run"
  mp.undo()


@pytest.fixture(scope="module")
def exportable(run_dir):
  return export.build(run_dir, NAMES)


def _inputs(batch, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
  return images, (np.arange(batch) % len(NAMES)).astype(np.int32)


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_forward_matches_the_eval_step(run_dir, exportable):
  """The exported function computes what evaluate / predict compute."""
  images, idx = _inputs(3)
  got = jax.jit(exportable.fn)(images, idx)
  cfg = export.load_config(run_dir)
  towers = towers_lib.build(cfg, run_dir)
  from adjax import loading
  from adjax.common import sharding
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  params, _, _ = loading.trained_params(cfg, run_dir, towers, mesh)
  backbone_def, backbone_state = nnx.split(towers.backbone)
  step = steps.StepBuilder(towers.model(cfg.model), backbone_def).eval_step()
  # What the data pipeline feeds evaluation and prediction.
  pipeline = np.stack([data_images.preprocess_image(Image.fromarray(im), SIZE)
                       for im in images])
  table = jnp.asarray(towers.text_embed(NAMES))
  amap, score = step(jax.device_get(params), backbone_state, table, jnp.asarray(pipeline),
                     jnp.asarray(idx))
  assert _max_err(got["anomaly_map"], amap) <= 1e-5
  assert _max_err(got["image_score"], score) <= 1e-5


@pytest.mark.slow
def test_stablehlo_reloads_without_adjax(run_dir, exportable, tmp_path):
  pytest.importorskip("flatbuffers")    # jax.export's serialization (the export extra)
  out = tmp_path / "model.shlo"
  meta = export.export(run_dir, NAMES, "stablehlo", out)
  assert meta["object_names"] == NAMES and json.loads(
      (tmp_path / "model.shlo.json").read_text())["image_size"] == SIZE
  ins = {b: _inputs(b, seed=b) for b in (1, 3)}
  np.savez(tmp_path / "in.npz", **{f"images{b}": v[0] for b, v in ins.items()},
           **{f"idx{b}": v[1] for b, v in ins.items()})
  script = textwrap.dedent(f"""\
      import sys, numpy as np, jax
      exp = jax.export.deserialize(open({str(out)!r}, "rb").read())
      data = np.load({str(tmp_path / 'in.npz')!r})
      res = {{}}
      for b in (1, 3):
        o = exp.call(data[f"images{{b}}"], data[f"idx{{b}}"])
        res.update({{f"{{k}}{{b}}": np.asarray(v) for k, v in o.items()}})
      np.savez({str(tmp_path / 'out.npz')!r}, **res)
      assert not any(m.split(".")[0] == "adjax" for m in sys.modules), "adjax imported"
      """)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env,
                 timeout=300)
  res = np.load(tmp_path / "out.npz")
  for b, (images, idx) in ins.items():
    want = jax.jit(exportable.fn)(images, idx)
    assert res[f"anomaly_map{b}"].shape == (b, SIZE, SIZE)
    assert _max_err(res[f"anomaly_map{b}"], want["anomaly_map"]) <= TOL
    assert _max_err(res[f"image_score{b}"], want["image_score"]) <= TOL


def _ort_session(path):
  ort = pytest.importorskip("onnxruntime")
  so = ort.SessionOptions()
  so.log_severity_level = 3
  return ort.InferenceSession(str(path), so)


@pytest.mark.slow
def test_onnx_matches_jax_and_snippet_runs(run_dir, exportable, tmp_path, capfd):
  pytest.importorskip("jax2onnx")
  import onnx
  out = tmp_path / "model.onnx"
  capfd.readouterr()
  export.export(run_dir, NAMES, "onnx", out)
  noise = capfd.readouterr()
  # No library chatter (onnx_ir warnings, jax2onnx plugin notices) while exporting.
  assert noise.err.strip() == "" and "onnx_ir" not in noise.out, noise
  # No initializer that no node reads (onnxruntime would warn about each).
  assert export.drop_unused_initializers(onnx.load(str(out))) == 0
  sess = _ort_session(out)
  assert [i.name for i in sess.get_inputs()] == ["images", "object_index"]
  assert [o.name for o in sess.get_outputs()] == ["anomaly_map", "image_score"]
  for b in (1, 3):
    images, idx = _inputs(b, seed=b)
    amap, score = sess.run(None, {"images": images, "object_index": idx})
    want = jax.jit(exportable.fn)(images, idx)
    assert amap.shape == (b, SIZE, SIZE) and amap.dtype == np.float32
    assert _max_err(amap, want["anomaly_map"]) <= TOL
    assert _max_err(score, want["image_score"]) <= TOL
  # An index outside the names gives NaN, not another object's numbers.
  amap, score = sess.run(None, {"images": _inputs(1)[0], "object_index": np.array([7], np.int32)})
  assert np.isnan(score).all() and np.isnan(amap).all()

  # An empty batch: empty outputs (the unguarded graph died with SIGFPE).
  assert _empty_batch_outputs(out, ["images", "object_index"]) == [
      [[0, SIZE, SIZE], "float32"], [[0], "float32"]]

  Image.fromarray(_inputs(1)[0][0]).resize((50, 40)).save(tmp_path / "photo.png")
  done = _run_snippet(tmp_path, "model.onnx", "photo.png")
  assert "Removing initializer" not in done.stderr, done.stderr[:500]
  assert Image.open(tmp_path / "heat.png").size == (SIZE, SIZE)
  # The snippet's score is the model's on the image as predict reads it.
  image = data_images.load_for_prediction(str(tmp_path / "photo.png"), SIZE)["image"]
  want = float(jax.jit(exportable.fn)(image[None], np.zeros(1, np.int32))["image_score"][0])
  assert _snippet_score(done) == pytest.approx(want, abs=TOL + 5e-5)   # printed to 4 places


def _empty_batch_outputs(path: Path, inputs: list[str]) -> list:
  """[[shape, dtype]] of each output on a batch of 0 images, run by
  onnxruntime in a child process (a SIGFPE there fails the test, not the suite)."""
  code = textwrap.dedent(f"""
      import json, numpy as np, onnxruntime as ort
      sess = ort.InferenceSession({str(path)!r})
      feed = {{"images": np.zeros((0, {SIZE}, {SIZE}, 3), np.uint8),
               "object_index": np.zeros(0, np.int32)}}
      outs = sess.run(None, {{k: feed[k] for k in {inputs!r}}})
      print(json.dumps([[list(o.shape), str(o.dtype)] for o in outs]))""")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, (done.returncode, done.stderr[-500:])
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_empty_batch_guard_returns_empty_outputs(tmp_path):
  """`guard_empty_batch` on a graph that cannot run a batch of 0 (a reshape to
  [B, -1]): empty outputs of the declared shapes and types for B = 0, the
  graph's own outputs (bit for bit) for B = 2.
  Fails if the guard is dropped or passes an empty batch to the graph."""
  onnx = pytest.importorskip("onnx")
  pytest.importorskip("onnxruntime")
  from onnx import TensorProto, helper, numpy_helper
  const = {"st": [0], "en": [1], "m1": [-1], "ax": [1]}
  graph = helper.make_graph(
      [helper.make_node("Shape", ["images"], ["s"]),
       helper.make_node("Slice", ["s", "st", "en"], ["n"]),
       helper.make_node("Concat", ["n", "m1"], ["flat_shape"], axis=0),
       helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
       helper.make_node("Reshape", ["f", "flat_shape"], ["flat"]),
       helper.make_node("ReduceMax", ["flat", "ax"], ["image_score"], keepdims=0),
       helper.make_node("ReduceMean", ["f", "ax3"], ["anomaly_map"], keepdims=0)],
      "probe", [helper.make_tensor_value_info("images", TensorProto.UINT8,
                                              ["B", SIZE, SIZE, 3])],
      [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["B", SIZE, SIZE]),
       helper.make_tensor_value_info("image_score", TensorProto.FLOAT, ["B"])],
      [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in const.items()]
      + [numpy_helper.from_array(np.array([3], np.int64), "ax3")])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
  model.ir_version = 8
  onnx.save(model, str(tmp_path / "plain.onnx"))
  export.guard_empty_batch(model)
  onnx.checker.check_model(model)
  onnx.save(model, str(tmp_path / "guarded.onnx"))
  assert _empty_batch_outputs(tmp_path / "guarded.onnx", ["images"]) == [
      [[0, SIZE, SIZE], "float32"], [[0], "float32"]]
  images = _inputs(2, seed=4)[0]
  plain, guarded = (_ort_session(tmp_path / n).run(None, {"images": images})
                    for n in ("plain.onnx", "guarded.onnx"))
  for a, b in zip(plain, guarded):
    np.testing.assert_array_equal(a, b)


def _run_snippet(folder: Path, model: str, image: str) -> subprocess.CompletedProcess:
  """docs/deploy.md's onnxruntime snippet, as a user runs it, in `folder`."""
  (folder / "snippet.py").write_text(ORT_SNIPPET)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run([sys.executable, "snippet.py", model, image, "heat.png"],
                        cwd=folder, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  return done


def _snippet_score(done: subprocess.CompletedProcess) -> float:
  return float(re.search(r": image score (-?[0-9.]+),", done.stdout).group(1))


def _pixel_probe_onnx(path: Path, size: int, names: list[str]) -> np.ndarray:
  """A stand-in ONNX file with the exported model's inputs, outputs and
  metadata whose image score is a fixed random linear function of every input
  pixel and channel: any change in what the pixels are (channel order,
  resampling, orientation) changes it. Returns the weights [size, size, 3]."""
  onnx = pytest.importorskip("onnx")
  from onnx import TensorProto, helper, numpy_helper
  w = np.random.default_rng(5).normal(size=(1, size, size, 3)).astype(np.float32) / 300
  graph = helper.make_graph(
      [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
       helper.make_node("Mul", ["x", "w"], ["xw"]),
       helper.make_node("ReduceSum", ["xw", "ax3"], ["anomaly_map"], keepdims=0),
       helper.make_node("ReduceSum", ["anomaly_map", "ax12"], ["image_score"], keepdims=0)],
      "probe",
      [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size, size, 3]),
       helper.make_tensor_value_info("object_index", TensorProto.INT32, ["N"])],
      [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", size, size]),
       helper.make_tensor_value_info("image_score", TensorProto.FLOAT, ["N"])],
      [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([3]), "ax3"),
       numpy_helper.from_array(np.array([1, 2]), "ax12")])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  model.ir_version = 8
  helper.set_model_props(model, {"image_size": json.dumps(size),
                                 "object_names": json.dumps(names)})
  onnx.save(model, str(path))
  return w[0]


def test_docs_snippet_feeds_what_predict_feeds(tmp_path):
  """docs/deploy.md's onnxruntime snippet gives the ONNX file the pixels predict
  gives the model: RGB order, PIL bilinear resize, EXIF orientation applied.

  Fails if the snippet feeds BGR, resizes with another filter (nearest), or
  ignores a photo's EXIF orientation (a portrait phone photo stored landscape).
  """
  pytest.importorskip("onnxruntime")
  w = _pixel_probe_onnx(tmp_path / "probe.onnx", SIZE, ["bottle"])
  rng = np.random.default_rng(2)
  pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "photo.png")
  exif = Image.Exif()
  exif[0x0112] = 6                 # stored landscape, seen rotated by 90 degrees
  Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
  for name in ("photo.png", "phone.jpg"):
    done = _run_snippet(tmp_path, "probe.onnx", name)
    fed = data_images.load_for_prediction(str(tmp_path / name), SIZE)["image"]
    want = float(np.sum(fed.astype(np.float64) * w))
    # Printed to 4 decimal places; the float32 sum's rounding is far below that.
    assert _snippet_score(done) == pytest.approx(want, abs=1e-4), name
    assert Image.open(tmp_path / "heat.png").size == (SIZE, SIZE)


def test_decision_output_from_thresholds_json(run_dir, exportable, tmp_path):
  images, idx = _inputs(3)
  scores = np.asarray(jax.jit(exportable.fn)(images, idx)["image_score"])
  cut = float(np.median(scores))
  good = dict(dataset="unit", image_score="mean", checkpoint_step=0,
              model=exportable.metadata["model"], image=cut)
  thresholds.write(run_dir, **good)
  try:
    exp = export.build(run_dir, NAMES)
    assert exp.image_threshold == [cut, cut] and exp.metadata["outputs"][-1] == "decision"
    assert exp.metadata["threshold_sources"] == ["top-level", "top-level"]
    out = jax.jit(exp.fn)(images, idx)
    np.testing.assert_array_equal(np.asarray(out["decision"]), scores >= cut)
    # Made for another image-score mode, or another head: refused, saying why.
    thresholds.write(run_dir, **dict(good, image_score="max"))
    with pytest.raises(export.ExportError, match="image_score='max'"):
      export.build(run_dir, NAMES)
    thresholds.write(run_dir, **dict(good, model=dict(good["model"], head_sha256="0" * 64)))
    with pytest.raises(export.ExportError, match="another model .*head_sha256"):
      export.build(run_dir, NAMES)
  finally:
    (run_dir / THRESHOLDS_FILE).unlink()


def test_decision_output_per_object_threshold(run_dir, exportable, tmp_path):
  """Two objects with different thresholds (per category, as an evaluation
  writes them): each image is decided with its own object_index's
  threshold, as thresholds.resolve gives it to predict.
  Fails if the file indexes the threshold vector otherwise (one threshold for all)."""
  images, _ = _inputs(4, seed=11)
  idx = np.array([0, 1, 1, 0], np.int32)
  scores = np.asarray(jax.jit(exportable.fn)(images, idx)["image_score"])
  limits = {"bottle": float(scores[0]) + 1.0, "screw": float(scores[1]) - 1.0}
  thresholds.write(run_dir, dataset="unit", image_score="mean", checkpoint_step=0,
                   model=exportable.metadata["model"], image=0.5,
                   details={"per_category": {"unit": {n: {"image": t}
                                                      for n, t in limits.items()}}})
  try:
    exp = export.build(run_dir, NAMES)
    assert exp.image_threshold == [limits["bottle"], limits["screw"]]
    assert exp.metadata["threshold_sources"] == ["category:unit/bottle", "category:unit/screw"]
    out = jax.jit(exp.fn)(images, idx)
    want = scores >= np.array([limits[NAMES[i]] for i in idx])
    np.testing.assert_array_equal(np.asarray(out["decision"]), want)
    assert want.tolist() == [False, True, True, False]
  finally:
    (run_dir / THRESHOLDS_FILE).unlink()


def test_baked_threshold_decides_as_predict_at_a_hair_above_a_score():
  """A float64 threshold a hair above a float32 score: predict (float64
  compare) says normal, and so must the float32 file: its threshold is
  rounded up to the next float32, never to the nearest.
  Fails if the baked threshold is the nearest float32 (`return f`)."""
  rng = np.random.default_rng(0)
  scores = rng.random(2000).astype(np.float32)
  for s in scores:
    for t in (float(s) + float(np.spacing(s)) / 4, float(s), float(s) - 1e-12):
      assert (s >= export._f32_at_least(t)) == (float(s) >= t)


def _nothing_written(tmp_path):
  assert not (tmp_path / "m.onnx").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.onnx")]


def test_bad_object_names_refused(run_dir, tmp_path, capsys):
  rc = export.main(["--workdir", str(run_dir), "--object-names", "bottle,,screw",
                    "--format", "stablehlo", "--out", str(tmp_path / "m.onnx")])
  err = capsys.readouterr().err
  assert rc == 2 and "non-empty" in err and err.count("\n") == 1
  with pytest.raises(export.ExportError, match=r"\['bottle'\] given more than once"):
    export.export(run_dir, ["bottle", "bottle"], "stablehlo", tmp_path / "m.onnx")
  _nothing_written(tmp_path)


def test_missing_extra_named(run_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "jax2onnx", None)     # import fails
  with pytest.raises(export.ExportError, match=r"pip install 'adjax\[export\]'"):
    export.export(run_dir, NAMES, "onnx", tmp_path / "m.onnx")
  _nothing_written(tmp_path)


def test_workdir_without_checkpoint_refused(run_dir, tmp_path, capsys):
  empty = tmp_path / "fresh"
  empty.mkdir()
  (empty / "config.json").write_text((run_dir / "config.json").read_text())
  pytest.importorskip("flatbuffers")
  rc = export.main(["--workdir", str(empty), "--object-names", "bottle",
                    "--format", "stablehlo", "--out", str(tmp_path / "m.onnx")])
  err = capsys.readouterr().err
  assert rc == 2 and "no trained checkpoint" in err and err.count("\n") == 1
  assert not (empty / "checkpoints").exists()
  rc = export.main(["--workdir", str(tmp_path / "nowhere"), "--object-names", "bottle",
                    "--format", "stablehlo", "--out", str(tmp_path / "m.onnx")])
  assert rc == 2 and "no such directory" in capsys.readouterr().err
  _nothing_written(tmp_path)


def _cut_in_widest_gap(values):
  """A threshold halfway across the widest gap between sorted values (robust to
  the <= 1e-4 difference between onnxruntime and JAX scores)."""
  v = np.sort(np.asarray(values, np.float64))
  i = int(np.argmax(np.diff(v)))
  return float((v[i] + v[i + 1]) / 2), float(v[i + 1] - v[i])


@pytest.mark.slow
def test_export_decides_as_predict(run_dir, exportable, tmp_path):
  """An object whose category threshold differs from the top-level one: the
  ONNX file (onnxruntime) and mode=predict give the same decisions on the
  same images, and both name the threshold's source."""
  pytest.importorskip("jax2onnx")
  import csv
  from adjax import experiment
  images, _ = _inputs(8, seed=21)
  src = tmp_path / "imgs"
  src.mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im).save(src / f"{i}.png")
  scores = {n: np.asarray(jax.jit(exportable.fn)(images, np.full(8, k, np.int32))[
      "image_score"]) for k, n in enumerate(NAMES)}
  # bottle: its own threshold in the upper half; the top-level one in the lower
  # half, so the two give different decisions for bottle.
  b = np.sort(scores["bottle"])
  own, gap_own = _cut_in_widest_gap(b[3:])
  top, gap_top = _cut_in_widest_gap(b[:4])
  assert min(gap_own, gap_top) > 1e-3
  assert ((scores["bottle"] >= own) != (scores["bottle"] >= top)).any()
  thresholds.write(run_dir, dataset="unit", image_score="mean", checkpoint_step=0,
                   model=exportable.metadata["model"], image=top, pixel=0.5,
                   details={"per_category": {"unit": {"bottle": {"image": own,
                                                                 "pixel": 0.25}}}})
  try:
    out = tmp_path / "model.onnx"
    # screw has no category of its own: the top-level threshold, by choice.
    meta = export.export(run_dir, NAMES, "onnx", out, allow_new_objects=True)
    assert meta["threshold_sources"] == ["category:unit/bottle", "top-level"]
    assert meta["pixel_thresholds"] == [0.25, 0.5]
    sess = _ort_session(out)
    assert sess.get_outputs()[-1].name == "decision"
    cfg = run_config.from_workdir(run_dir)
    cfg.mode = "predict"
    cfg.predict.input = str(src)
    for k, name in enumerate(NAMES):
      _, onnx_score, onnx_decision = sess.run(
          None, {"images": images, "object_index": np.full(8, k, np.int32)})
      cfg.predict.object_name = name
      experiment.run(cfg, str(run_dir))
      with open(run_dir / "predictions" / "scores.csv") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
      predicted = np.array([int(rows[f"{i}.png"]["decision"]) for i in range(8)])
      np.testing.assert_array_equal(predicted, onnx_decision.astype(int))
      want = own if name == "bottle" else top
      np.testing.assert_array_equal(predicted, scores[name] >= want)
      assert {r["threshold_source"] for r in rows.values()} == {
          meta["threshold_sources"][k]}
  finally:
    (run_dir / THRESHOLDS_FILE).unlink()


def test_out_refused_unless_new_or_overwrite(run_dir, tmp_path, capsys):
  """An existing --out needs --overwrite; a directory or a missing folder is one
  line; nothing is built or written."""
  existing = tmp_path / "m.shlo"
  existing.write_bytes(b"keep me")
  cases = [(existing, "exists; pass --overwrite"), (tmp_path, "is a directory"),
           (tmp_path / "nowhere" / "m.shlo", "does not exist")]
  for out, said in cases:
    rc = export.main(["--workdir", str(run_dir), "--object-names", "bottle",
                      "--format", "stablehlo", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and said in err and err.count("\n") == 1, err
  assert existing.read_bytes() == b"keep me"


def test_unknown_object_names_refused_unless_allowed(run_dir, exportable):
  thresholds.write(run_dir, dataset="unit", image_score="mean", checkpoint_step=0,
                   model=exportable.metadata["model"], image=0.5,
                   details={"per_category": {"unit": {"bottle": {"image": 0.4,
                                                                 "pixel": None}}}})
  try:
    with pytest.raises(export.ExportError, match=r"\['botle'\] not among the categories"):
      export.build(run_dir, ["botle"])
    exp = export.build(run_dir, ["bottle", "screw"], allow_new_objects=True)
    assert exp.metadata["threshold_sources"] == ["category:unit/bottle", "top-level"]
  finally:
    (run_dir / THRESHOLDS_FILE).unlink()


# ---- few-shot: a memory bank baked in (--references) ----------------------
@pytest.fixture(scope="module")
def few_shot(run_dir, tmp_path_factory):
  """A head-free workdir (config only), a folder of 3 normal images, the
  few-shot Exportable and the Detector scoring the same way."""
  from adjax.detector import Detector
  tmp = tmp_path_factory.mktemp("few_shot")
  bare = tmp / "bare"
  bare.mkdir()
  (bare / "config.json").write_text((run_dir / "config.json").read_text())
  refs = tmp / "normal"
  refs.mkdir()
  for i in range(3):
    Image.fromarray(_inputs(1, seed=20 + i)[0][0]).save(refs / f"good_{i}.png")
  exp = export.build_few_shot(bare, refs, threshold=0.5)
  det = Detector.from_workdir(bare, predict__scoring="few_shot")
  assert det.use_references(str(refs)) == 3
  return bare, refs, exp, det


def _detector_few_shot(det, images):
  pred = det.predict([im for im in images], scoring="few_shot")
  return np.stack(pred.maps), np.asarray(pred.scores)


def test_few_shot_function_matches_detector(few_shot):
  """The baked bank scores as Detector.predict(scoring="few_shot") after
  use_references: maps at the model size and image scores."""
  _, _, exp, det = few_shot
  assert exp.metadata["scoring"] == "few_shot"
  assert exp.metadata["references"] == ["good_0.png", "good_1.png", "good_2.png"]
  assert exp.metadata["reference_count"] == 3
  assert exp.metadata["r_list"] == list(det.r_list)
  assert exp.metadata["outputs"] == ["anomaly_map", "image_score", "decision"]
  images = _inputs(3, seed=7)[0]
  got = jax.jit(exp.fn)(images)
  maps, scores = _detector_few_shot(det, images)
  assert got["anomaly_map"].shape == (3, SIZE, SIZE)
  assert _max_err(got["anomaly_map"], maps) <= 1e-5 * max(1.0, float(np.abs(maps).max()))
  assert _max_err(got["image_score"], scores) <= 1e-5 * max(1.0, float(np.abs(scores).max()))
  np.testing.assert_array_equal(np.asarray(got["decision"]), np.asarray(got["image_score"]) >= 0.5)
  # A reference itself is (nearly) normal: its own patches are in the bank.
  ref = np.asarray(Image.open(few_shot[1] / "good_0.png"))[None]
  assert float(jax.jit(exp.fn)(ref)["image_score"][0]) < 1e-2 * float(scores.max())


@pytest.mark.slow
def test_few_shot_onnx_matches_detector(few_shot, tmp_path, capsys, monkeypatch):
  pytest.importorskip("jax2onnx")
  import onnx

  from adjax.common import quiet
  monkeypatch.setattr(quiet, "ANNOUNCE_AFTER_S", 0)    # every wait announced
  bare, refs, _, det = few_shot
  out = tmp_path / "few.onnx"
  rc = export.main(["--workdir", str(bare), "--references", str(refs), "--format", "onnx",
                    "--out", str(out)])
  said = capsys.readouterr()
  assert rc == 0 and "few-shot against 3 references" in said.out
  # A "doing X" line for each long wait, and nothing else.
  assert said.err.splitlines() == [f"loading {bare} (towers and head)",
                                   "tracing the model into onnx (the longest step)"]
  model = onnx.load(str(out))
  meta = {p.key: json.loads(p.value) for p in model.metadata_props}
  assert meta["scoring"] == "few_shot" and meta["reference_count"] == 3
  assert meta["references"] == ["good_0.png", "good_1.png", "good_2.png"]
  assert export.drop_unused_initializers(model) == 0
  sess = _ort_session(out)
  assert [i.name for i in sess.get_inputs()] == ["images"]
  assert [o.name for o in sess.get_outputs()] == ["anomaly_map", "image_score"]
  for b in (1, 3):
    images = _inputs(b, seed=30 + b)[0]
    amap, score = sess.run(None, {"images": images})
    maps, scores = _detector_few_shot(det, images)
    assert amap.shape == (b, SIZE, SIZE)
    assert _max_err(amap, maps) <= TOL and _max_err(score, scores) <= TOL
  assert _empty_batch_outputs(out, ["images"]) == [[[0, SIZE, SIZE], "float32"],
                                                   [[0], "float32"]]


@pytest.mark.slow
def test_few_shot_stablehlo_round_trip(few_shot, run_dir, tmp_path):
  """StableHLO reloads and gives the JAX function's numbers; a workdir with a
  trained head exports the same few-shot maps (the head is not used)."""
  pytest.importorskip("flatbuffers")
  _, refs, exp, _ = few_shot
  out = tmp_path / "few.shlo"
  meta = export.export(run_dir, None, "stablehlo", out, references=refs, threshold=0.5)
  assert json.loads((tmp_path / "few.shlo.json").read_text())["scoring"] == "few_shot"
  assert meta["outputs"] == ["anomaly_map", "image_score", "decision"]
  loaded = jax.export.deserialize(out.read_bytes())
  for b in (1, 3):
    images = _inputs(b, seed=40 + b)[0]
    got, want = loaded.call(images), jax.jit(exp.fn)(images)
    for k in ("anomaly_map", "image_score"):
      assert _max_err(got[k], want[k]) <= 1e-5
    np.testing.assert_array_equal(got["decision"], want["decision"])


def test_few_shot_references_refused(few_shot, tmp_path, capsys):
  bare = few_shot[0]
  empty = tmp_path / "empty"
  empty.mkdir()
  for refs, needle in ((tmp_path / "missing", "no such folder"),
                       (empty, "no readable images")):
    rc = export.main(["--workdir", str(bare), "--references", str(refs),
                      "--format", "stablehlo", "--out", str(tmp_path / "m.shlo")])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and f"--references {refs}" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
  rc = export.main(["--workdir", str(bare), "--object-names", "bottle", "--threshold", "1",
                    "--format", "stablehlo", "--out", str(tmp_path / "m.shlo")])
  assert rc == 2 and "--threshold: only with --references" in capsys.readouterr().err
  rc = export.main(["--workdir", str(bare), "--references", str(few_shot[1]),
                    "--object-names", "bottle", "--format", "stablehlo",
                    "--out", str(tmp_path / "m.shlo")])
  assert rc == 2 and "--object-names: not used with --references" in capsys.readouterr().err
  for bad in ("nan", "inf"):        # a NaN threshold would decide every image normal
    rc = export.main(["--workdir", str(bare), "--references", str(few_shot[1]),
                      "--threshold", bad, "--format", "stablehlo",
                      "--out", str(tmp_path / "m.shlo")])
    assert rc == 2 and "expected a finite number" in capsys.readouterr().err
  assert not (tmp_path / "m.shlo").exists()


def test_few_shot_agrees_with_the_detector_on_its_references(few_shot):
  """On images that are themselves references (nearest distance ~0, where a
  square root magnifies float32 rounding of |a|^2 + |b|^2 - 2 a.b: 1.5e-4
  measured before the nearest patch was measured exactly) the file and the
  Detector agree to 1e-5, and both score the references ~0.
  Fails if either path takes the square root of the expanded distance."""
  _, refs, exp, det = few_shot
  images = np.stack([np.asarray(Image.open(refs / f"good_{i}.png")) for i in range(3)])
  got = jax.jit(exp.fn)(images)
  maps, scores = _detector_few_shot(det, images)
  assert _max_err(got["anomaly_map"], maps) <= 1e-5
  assert _max_err(got["image_score"], scores) <= 1e-5
  assert float(np.max(scores)) <= 1e-5


def _png_bytes(im) -> bytes:
  import io
  buf = io.BytesIO()
  Image.fromarray(im).save(buf, format="PNG")
  return buf.getvalue()


@pytest.mark.slow
def test_every_path_decides_alike_at_the_threshold(run_dir, exportable, few_shot, tmp_path):
  """The images whose scores define a threshold (the F1-optimal one for
  zero-shot, a normal quantile for few-shot) get the same decision from
  mode=predict (scores.csv), Detector.predict, the page's JSON and the ONNX
  file: the threshold lies between them, not on one of them."""
  pytest.importorskip("jax2onnx")
  import csv
  import shutil
  from adjax import experiment, metrics
  from adjax.detector import Detector
  from adjax.serve import App
  images, _ = _inputs(8, seed=51)
  src = tmp_path / "imgs"
  src.mkdir()
  paths = []
  for i, im in enumerate(images):
    paths.append(src / f"{i}.png")
    Image.fromarray(im).save(paths[-1])
  uploads = [(p.name, _png_bytes(im)) for p, im in zip(paths, images)]

  def csv_decisions(workdir):
    with open(workdir / "predictions" / "scores.csv") as f:
      rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    return np.array([int(rows[p.name]["decision"]) for p in paths], bool)

  # Zero-shot: labels that make the F1-optimal threshold fall in the widest gap.
  scores = np.asarray(jax.jit(exportable.fn)(images, np.zeros(8, np.int32))["image_score"])
  order = np.sort(scores)
  cut = int(np.argmax(np.diff(order[2:6]))) + 2       # a split that leaves both sides
  labels = scores > order[cut]
  f1 = metrics.f1_optimal(scores, labels)
  assert f1.f1 == 1.0 and order[cut] < f1.threshold < order[cut + 1]
  thresholds.write(run_dir, dataset="unit", image_score="mean", checkpoint_step=0,
                   model=exportable.metadata["model"], image=f1.threshold, pixel=0.5)
  try:
    out = tmp_path / "zero.onnx"
    export.export(run_dir, ["bottle"], "onnx", out)
    onnx_dec = _ort_session(out).run(None, {"images": images,
                                            "object_index": np.zeros(8, np.int32)})[2]
    det = Detector.from_workdir(run_dir)
    got = det.predict([str(p) for p in paths], object_name="bottle")
    page = App(det).predict_set(uploads, "bottle", "zero_shot")["results"]
    cfg = run_config.from_workdir(run_dir)
    cfg.mode, cfg.predict.input, cfg.predict.object_name = "predict", str(src), "bottle"
    experiment.run(cfg, str(run_dir))
    for decisions in (onnx_dec, got.decisions, [a["decision"] for a in page],
                      csv_decisions(run_dir)):
      np.testing.assert_array_equal(np.asarray(decisions, bool), labels)
  finally:
    (run_dir / THRESHOLDS_FILE).unlink()

  # Few-shot: calibrated on the images themselves at a quantile; the record
  # is baked into the export (no --threshold) and decides alike everywhere.
  bare, refs, _, _ = few_shot
  work = tmp_path / "few"
  shutil.copytree(bare, work)
  det = Detector.from_workdir(work, predict__scoring="few_shot")
  det.use_references(str(refs))
  image_t, _ = det.calibrate(str(src), 0.5, scoring="few_shot")
  det.save_thresholds()
  assert (work / "thresholds.few_shot.json").is_file()
  got = det.predict([str(p) for p in paths], scoring="few_shot")
  s = np.sort(got.scores.astype(np.float64))
  v = s[int(np.ceil(0.5 * 7))]                           # the "higher" quantile
  assert v < image_t < s[s > v].min()
  want = got.scores > v
  assert want.any() and not want.all()
  out = tmp_path / "few.onnx"
  meta = export.export(work, None, "onnx", out, references=refs)
  assert meta["threshold_source"] == "top-level" and meta["image_threshold"] == image_t
  onnx_dec = _ort_session(out).run(None, {"images": images})[2]
  page = App(det).predict_set(uploads, "", "few_shot")["results"]
  cfg = run_config.from_workdir(work)
  cfg.mode, cfg.predict.input = "predict", str(src)
  cfg.predict.scoring, cfg.predict.references = "few_shot", str(refs)
  experiment.run(cfg, str(work))
  for decisions in (onnx_dec, got.decisions, [a["decision"] for a in page],
                    csv_decisions(work)):
    np.testing.assert_array_equal(np.asarray(decisions, bool), want)
  # Another bank: the record is refused in one line naming both banks.
  other = tmp_path / "other_refs"
  shutil.copytree(refs, other)
  (other / "good_0.png").unlink()
  with pytest.raises(export.ExportError, match="made with bank .* references in use are bank"):
    export.build_few_shot(work, other)


@pytest.mark.slow
def test_few_shot_coreset_bank_matches_detector(run_dir, tmp_path):
  """eval.coreset: the baked bank is the Detector's coreset (the same patches
  per layer and r), recorded in the metadata; its maps are the Detector's.
  Fails if the export bakes the whole bank or another selection."""
  from adjax import coreset
  from adjax.detector import Detector
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / "config.json").write_text((run_dir / "config.json").read_text())
  refs = tmp_path / "normal"
  refs.mkdir()
  for i in range(3):
    Image.fromarray(_inputs(1, seed=20 + i)[0][0]).save(refs / f"good_{i}.png")
  exp = export.build_few_shot(bare, refs, overrides=["eval.coreset=0.2"])
  det = Detector.from_workdir(bare, predict__scoring="few_shot", eval__coreset=0.2)
  assert det.coreset == coreset.settings(0.2, 0)
  assert exp.metadata["coreset"] == det.coreset
  det.use_references(str(refs))
  assert det.bank["coreset"] == det.coreset == exp.metadata["bank"]["coreset"]
  patches = 3 * det.model.grid[0] * det.model.grid[1]
  assert exp.metadata["bank_shape"][2] == coreset.coreset_size(patches, 0.2) < patches
  images = _inputs(3, seed=7)[0]
  got = jax.jit(exp.fn)(images)
  maps, scores = _detector_few_shot(det, images)
  assert _max_err(got["anomaly_map"], maps) <= 1e-5 * max(1.0, float(np.abs(maps).max()))
  assert _max_err(got["image_score"], scores) <= 1e-5 * max(1.0, float(np.abs(scores).max()))
  again, _ = _detector_few_shot(det, images)      # the coreset bank kept from the first call
  np.testing.assert_array_equal(again, maps)
  assert det.references.features.shape == tuple(exp.metadata["bank_shape"])


# ---- the bank as an artifact ----------------------------------------------
def _one_line_refusal(fn, needle):
  from adjax.common.errors import UserError
  with pytest.raises(UserError) as e:
    fn()
  text = str(e.value)
  assert needle in text and "\n" not in text, text
  return text


def test_stored_bank_is_loaded_not_recomputed_and_scores_alike(few_shot, tmp_path, monkeypatch):
  """use_references stores the bank in the workdir; a later Detector of the
  same images loads it (no backbone pass, no bank build) and scores exactly
  as the one that built it, as does use_bank(file); the export bakes that
  bank. A damaged file, or a bank for another image size, is refused in one
  line. Fails if the stored bank is not used, differs, or is trusted unchecked."""
  from adjax.detector import Detector
  from adjax.workdir import banks
  bare, refs, exp, _ = few_shot
  stored = sorted((bare / "banks").glob("*" + banks.SUFFIX))
  assert len(stored) == 1
  det = Detector.from_workdir(bare, predict__scoring="few_shot")
  det.use_references(str(refs), store=False)              # built here, not loaded
  assert det._reference_tokens is not None
  images = _inputs(3, seed=9)[0]
  maps, scores = _detector_few_shot(det, images)

  def no_build(*a, **k):
    raise AssertionError("the bank was built again")
  monkeypatch.setattr(banks, "build", no_build)
  again = Detector.from_workdir(bare, predict__scoring="few_shot")
  monkeypatch.setattr(again, "_tokens", lambda batch: no_build())
  assert again.use_references(str(refs)) == 3
  np.testing.assert_array_equal(again.references.features, det.references.features)
  monkeypatch.undo()
  got_maps, got_scores = _detector_few_shot(again, images)
  np.testing.assert_array_equal(got_maps, maps)
  np.testing.assert_array_equal(got_scores, scores)
  third = Detector.from_workdir(bare, predict__scoring="few_shot")
  assert third.use_bank(stored[0]) == 3 and third.bank == det.bank
  np.testing.assert_array_equal(_detector_few_shot(third, images)[0], maps)
  from_file = export.build_few_shot(bare, stored[0])
  assert from_file.metadata["bank_content_sha256"] == det.references.content_digest()
  assert _max_err(jax.jit(from_file.fn)(images)["anomaly_map"], maps) <= 1e-5

  damaged = tmp_path / ("damaged" + banks.SUFFIX)
  data = bytearray(stored[0].read_bytes())
  data[len(data) // 2] ^= 0xFF
  damaged.write_bytes(bytes(data))
  _one_line_refusal(lambda: banks.load(damaged), "damaged bank file")
  truncated = tmp_path / ("short" + banks.SUFFIX)
  truncated.write_bytes(stored[0].read_bytes()[:1000])
  _one_line_refusal(lambda: third.use_bank(truncated), "damaged bank file")
  other = Detector.from_workdir(bare, predict__scoring="few_shot", image_size=48)
  _one_line_refusal(lambda: other.use_bank(stored[0]), "image_size 32 (expected 48)")
  bank = banks.load(stored[0])
  moved = banks.Bank(bank.features, bank.origin, dict(bank.identity, backbone="elsewhere"))
  _one_line_refusal(lambda: third.use_bank(moved), "backbone 'elsewhere'")


def test_page_scores_with_a_stored_bank_as_the_detector(few_shot):
  """The page started on a stored bank file (`--references FILE.bank.npz`,
  `Detector.references_from`) answers the scores of the Detector that built it."""
  from adjax.detector import Detector
  from adjax.serve import App
  from adjax.workdir import banks
  bare, refs, _, _ = few_shot
  stored = sorted((bare / "banks").glob("*" + banks.SUFFIX))[0]
  page_det = Detector.from_workdir(bare, predict__scoring="few_shot")
  assert page_det.references_from(str(stored)) == 3
  built = Detector.from_workdir(bare, predict__scoring="few_shot")
  built.use_references(str(refs), store=False)           # built here, not loaded
  assert built._reference_tokens is not None
  images = _inputs(3, seed=13)[0]
  uploads = [(f"{i}.png", _png_bytes(im)) for i, im in enumerate(images)]
  answers = App(page_det).predict_set(uploads, "", "few_shot")["results"]
  want = built.predict([im for im in images], scoring="few_shot").scores
  np.testing.assert_array_equal(np.float32([a["score"] for a in answers]), want)


def test_export_refuses_a_damaged_or_foreign_bank_in_one_line(few_shot, tmp_path, capsys):
  from adjax.workdir import banks
  bare = few_shot[0]
  stored = sorted((bare / "banks").glob("*" + banks.SUFFIX))[0]
  damaged = tmp_path / ("damaged" + banks.SUFFIX)
  data = bytearray(stored.read_bytes())
  data[len(data) // 2] ^= 0xFF
  damaged.write_bytes(bytes(data))
  for bank, args, needle in ((damaged, [], "damaged bank file"),
                             (stored, ["--image-size", "48"], "another model")):
    rc = export.main(["--workdir", str(bare), "--references", str(bank), "--format",
                      "stablehlo", "--out", str(tmp_path / "m.shlo")] + args)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1, err
  assert not (tmp_path / "m.shlo").exists()


@pytest.mark.slow
def test_stored_bank_onnx_with_external_data_matches_detector(few_shot, tmp_path,
                                                             monkeypatch):
  """The ONNX file made from the stored bank file scores as the Detector
  (1e-5). Over the external-data size (lowered here from 2 GiB) its tensors
  go to <out>.data beside a small model file, which onnxruntime reads back.
  Fails if a large model is written as one protobuf or its data is lost."""
  pytest.importorskip("jax2onnx")
  import onnx
  from adjax.workdir import banks
  bare, _, _, det = few_shot
  stored = sorted((bare / "banks").glob("*" + banks.SUFFIX))[0]
  monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 2**18)
  out = tmp_path / "bank.onnx"
  meta = export.export(bare, None, "onnx", out, references=stored)
  data = tmp_path / "bank.onnx.data"
  assert meta["external_data"] == data.name and data.is_file()
  assert meta["bytes"] == out.stat().st_size + data.stat().st_size
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.onnx", "bank.onnx.data"]
  # No tensor of 1 KiB or more (the bank's among them) stays in the protobuf.
  inline = [t.name for t in onnx.load(str(out), load_external_data=False).graph.initializer
            if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024]
  assert inline == [] and data.stat().st_size >= det.references.nbytes
  assert onnx.load(str(out)).ByteSize() > 2**18     # the tensors read back from the data
  images = _inputs(3, seed=11)[0]
  amap, score = _ort_session(out).run(None, {"images": images})
  maps, scores = _detector_few_shot(det, images)
  assert _max_err(amap, maps) <= 1e-5 and _max_err(score, scores) <= 1e-5
