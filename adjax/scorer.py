"""The compiled eval step over placed weights, shared by evaluation and prediction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adjax import sharding, steps


class Scorer:
  """The compiled eval step over placed weights: images -> (maps, image scores).

  Used by evaluation and by prediction.
  """

  def __init__(self, cfg, towers, mesh, params):
    self.towers, self.mesh = towers, mesh
    self.reference_quirks = bool(cfg.reference_quirks)
    self.model = towers.model(cfg.model)
    self.params = jax.device_put(params, sharding.replicated(mesh))
    backbone_def, self.backbone_state, backbone_sharding = sharding.place_frozen(
        towers.backbone, mesh, cfg.mesh.backbone_sharding)
    self.builder = steps.StepBuilder(self.model, backbone_def, mesh=mesh,
                                     backbone_sharding=backbone_sharding)
    self.step = self.builder.eval_step()

  def maps(self, images: np.ndarray, category_index: np.ndarray, text_table) -> tuple:
    """Local numpy batch -> (maps [B, H, W], scores [B]) for this process's rows."""
    batch = sharding.global_batch({"image": images, "category_index": category_index},
                                  self.mesh)
    amap, score = self.step(self.params, self.backbone_state, text_table,
                            batch["image"], batch["category_index"])
    return sharding.local_rows(amap, 0), sharding.local_rows(score, 0)

  def text_table(self, names: list[str]):
    return jax.device_put(jnp.asarray(self.towers.text_embed(names)),
                          sharding.replicated(self.mesh))


  def threshold_model(self) -> dict:
    """The model a decision threshold belongs to (`thresholds.threshold_model`):
    this head on these towers, at this size."""
    from adjax import thresholds
    return thresholds.threshold_model(
        backbone_id=self.towers.backbone_id, text_id=self.towers.text_embed.model_id,
        layers=self.model.layers, image_size=self.model.image_size,
        reference_quirks=self.reference_quirks,
        head_sha256=thresholds.params_sha256(jax.device_get(self.params)))
