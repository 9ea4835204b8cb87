"""The jitted train and eval steps, built from an `ADModel`, and the optimiser.

Each step is one `jax.jit` over the device mesh: the batch arrives split on
the "data" axis, the head's parameters and optimiser state are replicated,
the frozen backbone's weights are placed by the config rule, and the train
state is donated. Only the head's parameters are differentiated and only
they get optimiser state; the towers enter as constants (the backbone under
`stop_gradient`, the text tower only through its precomputed table).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from adjax.ad_model import ADModel, Features
from adjax.common import sharding as shd

# The per-example fields every train step reads besides its inputs.
TARGET_KEYS = ("mask", "label", "category_index", "has_mask")


def lr_schedule(base_lr: float, total_steps: int, warmup_fraction: float,
                first_step_zero: bool) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up from 0 over the first `warmup_fraction` of steps, then constant.

  `first_step_zero` reproduces the release (SPEC section 9, quirk 4): the
  warm-up starts at step 0, so the first update has learning rate 0. Without
  it the warm-up's first value is base / warmup_steps.
  """
  warmup = int(warmup_fraction * total_steps)
  offset = 0 if first_step_zero else 1

  def schedule(step):
    if warmup <= 0:
      return jnp.asarray(base_lr, jnp.float32)
    frac = jnp.minimum(1.0, (step + offset) / warmup)
    return base_lr * frac.astype(jnp.float32)
  return schedule


def make_optimizer(opt, total_steps: int, first_step_zero: bool):
  """AdamW over an `OptimizerConfig` (`run.optimizer`) with the warm-up
  schedule; `first_step_zero` is the release's quirk (`Behaviour`)."""
  schedule = lr_schedule(opt.learning_rate, total_steps,
                         opt.warmup_fraction, first_step_zero=first_step_zero)
  tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2,
                   eps=1e-8, weight_decay=opt.weight_decay)
  return tx, schedule


def init_state(params: nnx.State, tx) -> dict[str, Any]:
  return {"params": params, "opt_state": tx.init(params),
          "step": jnp.zeros((), jnp.int32)}


@dataclasses.dataclass
class StepBuilder:
  """Builds the jitted steps of one model.

  `mesh=None` gives plain `jax.jit` steps (tests, benchmarks); with a mesh,
  `state_sharding` and `backbone_sharding` are the placed trees' shardings.
  """
  model: ADModel
  backbone_def: nnx.GraphDef
  tx: Any = None
  schedule: Callable | None = None
  mesh: Any = None
  state_sharding: Any = None
  backbone_sharding: Any = None

  def train_step(self, *, from_features: bool, return_features: bool = False,
                 cache_dtype=jnp.bfloat16):
    """step(state, backbone_state, text_table, batch) -> (state, metrics[, features]).

    `batch` holds TARGET_KEYS and either `image` [B, H, W, 3] or, when
    `from_features`, the cached `patches` [L, B, N, D] and `cls` [L, B, D].
    With `return_features` the step also returns the features it computed
    (cast to `cache_dtype`) for the cache, and trains on those rounded
    features too.
    """
    model, tx, schedule = self.model, self.tx, self.schedule

    def step(state, backbone_state, text_table, batch):
      if from_features:
        feats = Features(batch["patches"], batch["cls"])
      else:
        feats = model.features(nnx.merge(self.backbone_def, backbone_state), batch["image"])
        if return_features:
          # With a cache, every step sees the stored precision, whether its
          # features come from the cache or were just computed; so a resumed
          # run (whose cache starts empty) retraces the uninterrupted one.
          feats = Features(*(x.astype(cache_dtype).astype(jnp.float32) for x in feats))

      (loss, terms), grads = jax.value_and_grad(model.loss, has_aux=True)(
          state["params"], feats, text_table, batch)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      metrics = {"loss": loss, **terms, "lr": schedule(state["step"]),
                 "grad_norm": optax.tree.norm(grads),
                 "param_norm": optax.tree.norm(params)}
      new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
      if return_features:
        return new_state, metrics, tuple(x.astype(cache_dtype) for x in feats)
      return new_state, metrics

    if self.mesh is None:
      return jax.jit(step, donate_argnums=(0,))
    mesh = self.mesh
    rep = shd.replicated(mesh)
    batch_spec = {k: shd.batch_sharding(mesh) for k in TARGET_KEYS}
    if from_features:
      batch_spec.update(patches=shd.batch_sharding(mesh, 1), cls=shd.batch_sharding(mesh, 1))
    else:
      batch_spec.update(image=shd.batch_sharding(mesh))
    out = (self.state_sharding, rep)
    if return_features:
      out = out + ((shd.batch_sharding(mesh, 1), shd.batch_sharding(mesh, 1)),)
    return jax.jit(step, donate_argnums=(0,),
                   in_shardings=(self.state_sharding, self.backbone_sharding, rep, batch_spec),
                   out_shardings=out)

  def eval_step(self, *, return_features: bool = False, cache_dtype=jnp.float32):
    """step(params, backbone_state, text_table, images, category_index)
    -> (anomaly_map [B, H, W], image_score [B][, features]).

    With `return_features` the backbone features are returned too (cast to
    `cache_dtype`) for the evaluation feature cache, and the maps are
    computed from those stored-precision features, as a later cached
    evaluation will.
    """
    model = self.model

    def step(params, backbone_state, text_table, images, category_index):
      feats = model.features(nnx.merge(self.backbone_def, backbone_state), images)
      if not return_features:
        return model.maps(params, feats, text_table, category_index)
      stored = Features(*(x.astype(cache_dtype) for x in feats))
      feats = Features(*(x.astype(jnp.float32) for x in stored))
      return model.maps(params, feats, text_table, category_index) + (tuple(stored),)

    if self.mesh is None:
      return jax.jit(step)
    rep = shd.replicated(self.mesh)
    b = shd.batch_sharding(self.mesh)
    out = (b, b)
    if return_features:
      out = out + ((shd.batch_sharding(self.mesh, 1), shd.batch_sharding(self.mesh, 1)),)
    return jax.jit(step, in_shardings=(rep, self.backbone_sharding, rep, b, b),
                   out_shardings=out)

  def eval_features_step(self):
    """step(params, text_table, patches, cls, category_index) -> (map, score):
    the head alone, on cached features."""
    model = self.model

    def step(params, text_table, patches, cls, category_index):
      return model.maps(params, Features(patches, cls), text_table, category_index)

    if self.mesh is None:
      return jax.jit(step)
    rep = shd.replicated(self.mesh)
    b = shd.batch_sharding(self.mesh)
    b1 = shd.batch_sharding(self.mesh, 1)
    return jax.jit(step, in_shardings=(rep, rep, b1, b1, b), out_shardings=(b, b))
