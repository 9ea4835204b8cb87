"""The jitted train and eval steps and the optimiser.

Each step is one `jax.jit` over the device mesh: the batch arrives split on
the "data" axis, the head's parameters and optimiser state are replicated,
the frozen backbone's weights are placed by the config rule, and the train
state is donated. Only the head's parameters are differentiated and only
they get optimiser state; the towers enter as constants (the backbone under
`stop_gradient`, the text tower only through its precomputed table).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from adjax import features, losses


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


def make_optimizer(cfg, total_steps: int):
  schedule = lr_schedule(cfg.optimizer.learning_rate, total_steps,
                         cfg.optimizer.warmup_fraction,
                         first_step_zero=cfg.reference_quirks)
  tx = optax.adamw(schedule, b1=cfg.optimizer.b1, b2=cfg.optimizer.b2,
                   eps=1e-8, weight_decay=cfg.optimizer.weight_decay)
  return tx, schedule


def init_state(params: nnx.State, tx) -> dict[str, Any]:
  return {"params": params, "opt_state": tx.init(params),
          "step": jnp.zeros((), jnp.int32)}


def _head_outputs(head_def, params, patches, cls, text_table, category_index,
                  grid, out_hw, quirk):
  head = nnx.merge(head_def, params)
  tmat = head.text_features(text_table, quirk)[category_index]
  return head(patches, cls, tmat, grid, out_hw)


def make_train_step(*, head_def, backbone_def, tx, schedule, layers, grid, out_hw,
                    quirk: bool, from_features: bool, return_features: bool = False,
                    cache_dtype=jnp.bfloat16, mesh=None, state_sharding=None,
                    backbone_sharding=None):
  """Returns step(state, backbone_state, text_table, batch) -> (state, metrics[, feats]).

  `batch` holds `mask` [B, H, W], `label` [B], `category_index` [B],
  `has_mask` [B] (whether the mask is known) and either
  `image` [B, H, W, 3] or, when `from_features`, the cached `patches`
  [L, B, N, D] and `cls` [L, B, D]. With `return_features` the step also
  returns the features it computed (cast to `cache_dtype`) for the cache, and
  trains on those rounded features too.
  """

  def step(state, backbone_state, text_table, batch):
    if from_features:
      patches, cls = batch["patches"], batch["cls"]
    else:
      backbone = nnx.merge(backbone_def, backbone_state)
      patches, cls = features.extract(backbone, batch["image"], layers)
      if return_features:
        # With a cache, every step sees the stored precision, whether its
        # features come from the cache or were just computed; so a resumed
        # run (whose cache starts empty) retraces the uninterrupted one.
        patches = patches.astype(cache_dtype).astype(jnp.float32)
        cls = cls.astype(cache_dtype).astype(jnp.float32)

    def loss_fn(params):
      out = _head_outputs(head_def, params, patches, cls, text_table,
                          batch["category_index"], grid, out_hw, quirk)
      return losses.total_loss(out, batch["mask"], batch["label"], batch.get("has_mask"))

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **terms, "lr": schedule(state["step"]),
               "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params)}
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    if return_features:
      return new_state, metrics, (patches.astype(cache_dtype), cls.astype(cache_dtype))
    return new_state, metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=(0,))
  from adjax import sharding as shd
  rep = shd.replicated(mesh)
  batch_spec = {k: shd.batch_sharding(mesh)
                for k in ("mask", "label", "category_index", "has_mask")}
  if from_features:
    batch_spec.update(patches=shd.batch_sharding(mesh, 1), cls=shd.batch_sharding(mesh, 1))
  else:
    batch_spec.update(image=shd.batch_sharding(mesh))
  out = (state_sharding, rep)
  if return_features:
    out = out + ((shd.batch_sharding(mesh, 1), shd.batch_sharding(mesh, 1)),)
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(state_sharding, backbone_sharding, rep, batch_spec),
                 out_shardings=out)


def image_scores(outputs: dict, kind: str) -> jax.Array:
  """Image-level anomaly score [B] from the head outputs (config eval.image_score)."""
  prob = jax.nn.softmax(outputs["logits"], axis=-1)[:, 1]
  peak = jnp.max(outputs["cross"], axis=(1, 2))
  if kind == "global":
    return prob
  if kind == "max":
    return peak
  if kind == "mean":
    return 0.5 * (prob + peak)
  raise ValueError(f"eval.image_score={kind!r}; expected global, max or mean")


def make_eval_step(*, head_def, backbone_def, layers, grid, out_hw, quirk: bool,
                   image_score: str, mesh=None, backbone_sharding=None):
  """Returns step(params, backbone_state, text_table, images, category_index)
  -> (anomaly_map [B, H, W], image_score [B]).

  The map is the cross-modal map's anomalous channel (SPEC section 7).
  """

  def step(params, backbone_state, text_table, images, category_index):
    backbone = nnx.merge(backbone_def, backbone_state)
    patches, cls = features.extract(backbone, images, layers)
    out = _head_outputs(head_def, params, patches, cls, text_table, category_index,
                        grid, out_hw, quirk)
    return out["cross"], image_scores(out, image_score)

  if mesh is None:
    return jax.jit(step)
  from adjax import sharding as shd
  rep = shd.replicated(mesh)
  b = shd.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, backbone_sharding, rep, b, b),
                 out_shardings=(b, b))
