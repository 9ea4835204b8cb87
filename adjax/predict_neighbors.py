"""Prediction against neighbours: `predict.scoring=few_shot | batch`.

- `few_shot`: every input image against the normal images of
  `predict.references` (a folder or glob), `neighbors.reference_maps`.
- `batch`: the input folder scored as one batch (one object name) with
  MuSc's mutual scoring, `neighbors.mutual_maps` (at least 5 images), image
  scores refined by RsCIN (`eval.rscin_k`).

Neither needs a trained head or the text tower. Features: the tapped blocks'
raw patch tokens (as in `adjax.scoring_modes`), `eval.r_list`. Writes
`<workdir>/predictions/` like `adjax.predict` (scores.csv, heatmap panels at
each image's own resolution, index.html, unreadable.txt); no decision
thresholds are applied (thresholds.json belongs to the zero-shot head).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from adjax import data, neighbors, scoring_modes
from adjax.common import atomic
from adjax.common.errors import UserError
from adjax.predict import _map_at, _output_name
from adjax.report import heatmaps
from adjax.report import html as html_report

PREDICT_SCORINGS = ("zero_shot", "few_shot", "batch")


class PredictError(UserError, ValueError):
  """The inputs cannot be scored in the chosen mode."""


def _token_step(model, backbone):
  graphdef, state = nnx.split(backbone)
  prefix, cls_index = model.backbone.num_prefix_tokens, model.backbone.cls_index

  @jax.jit
  def step(state, images):
    outs = nnx.merge(graphdef, state).get_intermediate_layers(model.normalize(images),
                                                              list(model.layers))
    tokens = jnp.stack(outs).astype(jnp.float32)
    return tokens[:, :, prefix:], tokens[-1, :, cls_index]
  return lambda images: step(state, images)


def _tokens(step, paths, model, batch_size, unreadable):
  """-> (tokens [L, n, h, w, D], global tokens [n, D], batch rows of the n images)."""
  h, w = model.grid
  toks, globs, rows = [], [], []
  for batch in data.prediction_batches(paths, image_size=model.image_size,
                                       batch_size=batch_size):
    raw, glob = (np.asarray(x) for x in step(batch["image"]))
    for i in range(len(batch["image"])):
      path = str(batch["path"][i])
      if not batch["valid"][i]:
        if path:
          unreadable.append((path, str(batch["error"][i])))
        continue
      toks.append(raw[:, i])
      globs.append(glob[i])
      rows.append((path, tuple(int(v) for v in batch["orig_size"][i])))
  if not toks:
    return None, None, rows
  t = np.stack(toks, axis=1)
  return t.reshape(t.shape[:2] + (h, w, t.shape[-1])), np.stack(globs), rows


def run(cfg, workdir: Path, towers, mesh) -> dict:
  del mesh  # one process, the default device
  scoring = cfg.predict.scoring
  model = towers.model(cfg)
  step = _token_step(model, towers.backbone)
  r_list = tuple(int(r) for r in cfg.eval.r_list)
  paths, unreadable = data.read_image_folder(cfg.predict.input)
  if scoring == "batch":
    need = neighbors._min_images((0.0, 0.3))
    if len(paths) < need:
      raise PredictError(f"predict.scoring=batch scores the images of predict.input "
                         f"against each other and needs at least {need}; "
                         f"{cfg.predict.input!r} has {len(paths)} readable images")
  else:
    ref_paths, ref_bad = data.read_image_folder(cfg.predict.references)
    if not ref_paths:
      raise PredictError(f"predict.references={cfg.predict.references!r}: no readable "
                         f"images ({len(ref_bad)} unreadable)")
  tokens, glob, rows = _tokens(step, paths, model, cfg.predict.batch_size, unreadable)
  if tokens is None:
    raise PredictError(f"predict.input={cfg.predict.input!r}: no image could be read")
  if scoring == "batch":
    maps = neighbors.mutual_maps(tokens, r_list)
  else:
    ref_tokens, _, _ = _tokens(step, ref_paths, model, cfg.predict.batch_size, [])
    maps = neighbors.reference_maps(tokens, ref_tokens, r_list)
  maps = scoring_modes.upsample(maps, model.out_hw)
  scores = maps.reshape(len(maps), -1).max(-1)
  if scoring == "batch":
    scores = neighbors.refine_scores(scores, glob, tuple(cfg.eval.rscin_k))
  root = cfg.predict.input if os.path.isdir(cfg.predict.input) else os.path.commonpath(
      [os.path.dirname(p) for p, _ in rows])
  out_dir = workdir / "predictions"
  table = []
  with atomic.atomic_dir(out_dir, overwrite=True) as work:
    for (path, (h, w)), amap, score in zip(rows, maps, scores):
      with Image.open(path) as img:
        rgb = np.asarray(data.images.to_rgb(img))
      name = _output_name(path, root)
      heatmaps.save_png(work / "heatmaps" / name, heatmaps.panel(rgb, _map_at(amap, (h, w))))
      table.append({"path": path, "score": f"{float(score):.6f}",
                    "heatmap": f"heatmaps/{name}"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "score", "heatmap"])
    writer.writeheader()
    writer.writerows(table)
    atomic.write_text(work / "scores.csv", buf.getvalue())
    atomic.write_text(work / "index.html", html_report.gallery_html(
        f"predictions for {cfg.predict.object_name!r} ({scoring})", table))
    if unreadable:
      atomic.write_text(work / "unreadable.txt",
                        "".join(f"{p}\t{why}\n" for p, why in unreadable))
  print(f"predicted {len(table)} images ({scoring}) -> {out_dir / 'scores.csv'}")
  return {"scores": table, "unreadable": unreadable, "scoring": scoring}
