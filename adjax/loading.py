"""A trained head, loaded once for every consumer: the run, the Detector, export.

    head = loading.load_head(cfg, workdir)
    head.towers, head.mesh, head.params, head.step, head.source
    head.record, head.known_objects      # the checked thresholds.json

`load_head` builds the mesh and the towers (unless given), restores the
newest intact checkpoint of the workdir (else of `init_from`), checks that
its training config describes the configured model
(`identity.check_head_model`), and reads and checks the zero-shot
deployment record (`thresholds.deployment_path`, `thresholds.check`) against
this head at the size it will score at. `resolve_workdir` is the one rule
for where a run's files live.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax

from adjax import towers as towers_lib
from adjax.common import sharding
from adjax.workdir import checkpoints, identity, thresholds


def resolve_workdir(cfg, workdir_flag: str | None = None) -> Path:
  """`--workdir`, else `workdir` of the config, else runs/<name>."""
  return Path(workdir_flag or cfg.workdir or Path("runs") / cfg.name)


def trained_params(cfg, workdir: Path, towers, mesh):
  """The head parameters of this workdir's latest checkpoint (else `init_from`).

  Returns (params, source workdir, step). The source's recorded training
  config must describe the configured model (identity.check_head_model).
  """
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
      towers.model(cfg.model).abstract_params())
  params, source, step = checkpoints.restore_head_params(
      abstract, workdir, Path(cfg.init_from) if cfg.init_from else None,
      keep=cfg.checkpoints_to_keep)
  identity.check_head_model(cfg, source)
  if jax.process_index() == 0:
    print(f"head: {source} checkpoint step {step}", flush=True)
  return params, source, step


@dataclasses.dataclass(frozen=True)
class Head:
  """A trained head on its towers, with the deployment record it decides with.

  model: the `ADModel` at the size it scores at. params: the head's
  parameters, replicated over `mesh`. step: the checkpoint step; source: the
  workdir it was restored from. record: the checked zero-shot deployment
  record (None: none, or not read), from `record_path`.
  """
  towers: Any
  mesh: Any
  model: Any
  params: Any
  step: int
  source: Path
  reference_quirks: bool
  record: dict | None = None
  record_path: Path | None = None

  @functools.cached_property
  def threshold_model(self) -> dict:
    """What a zero-shot record of this head must have been made for
    (`threshold_model`), computed once (it hashes the parameters)."""
    return threshold_model(self.towers, self.model, self.params, self.reference_quirks)

  @property
  def known_objects(self) -> tuple[str, ...]:
    """The object names with their own thresholds in the record (sorted)."""
    if self.record is None:
      return ()
    return tuple(sorted({n for cats in self.record.get("details", {})
                         .get("per_category", {}).values() for n in cats}))


def threshold_model(towers, model, params, reference_quirks: bool) -> dict:
  """What a zero-shot record of this head must have been made for
  (`thresholds.threshold_model`): these towers and parameters at this size."""
  return thresholds.threshold_model(
      backbone_id=towers.backbone_id, text_id=towers.text_embed.model_id,
      layers=model.layers, image_size=model.image_size,
      reference_quirks=bool(reference_quirks),
      head_sha256=thresholds.params_sha256(jax.device_get(params)))


def load_head(cfg, workdir: Path, *, towers=None, mesh=None, image_size: int | None = None,
              read_thresholds: bool = True) -> Head:
  """The head of `workdir` (else `init_from`) on the configured towers.

  `towers`, `mesh`: built from `cfg` when not given (the text tower too).
  `image_size`: the size it scores at (default `cfg.image_size`); a model
  that does not fit it raises ValueError. `read_thresholds=False`: no
  record is read (evaluation writes one; calibration replaces it). Raises
  `checkpoints`' errors for a missing or damaged head, `identity`'s for a
  head of another model and `thresholds.ThresholdError` for a record of
  another head.
  """
  workdir = Path(workdir)
  if mesh is None:
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
  if towers is None:
    towers = towers_lib.build(cfg, workdir)
  model = towers.model(cfg.model)
  if image_size is not None and int(image_size) != model.image_size:
    model = dataclasses.replace(model, image_size=int(image_size))
  params, source, step = trained_params(cfg, workdir, towers, mesh)
  path = (thresholds.deployment_path(workdir, cfg.init_from or None, "zero_shot")
          if read_thresholds else None)
  head = Head(towers=towers, mesh=mesh, model=model, params=params, step=step,
              source=Path(source), reference_quirks=bool(cfg.reference_quirks),
              record=None if path is None else thresholds.read(path), record_path=path)
  if head.record is not None:
    thresholds.check(head.record, image_score=model.image_score, model=head.threshold_model,
                     scoring="zero_shot", head_step=step)
  return head
