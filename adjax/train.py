"""The training loop: data -> sharded jitted step -> logs and checkpoints.

A plain function over a resolved config. The run resumes from the newest
complete checkpoint in its workdir (parameters, optimiser state, step and
each process's data-iterator state), so a killed run restarted with the same
command ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from flax import nnx
import jax
import jax.numpy as jnp

from adjax import steps
from adjax.common import sharding
from adjax.common.errors import UserError
from adjax.data import targets as datasets
from adjax.workdir import Workdir, checkpoints, feature_cache, run_log


class NonFiniteLossError(UserError, FloatingPointError):
  """Training produced a NaN or infinite loss."""


def train(cfg, workdir: Path, towers, mesh, handle) -> tuple[dict, int]:
  """Trains the head on `handle` (a prepared data set).

  Returns the final state and the number of steps this call ran (0 for a
  run that had already finished).
  """
  model = towers.model(cfg.model)
  steps_per_epoch, total_steps = _run_length(cfg, handle)
  text_table = jax.device_put(jnp.asarray(towers.text_embed(handle.categories)),
                              sharding.replicated(mesh))
  state, tx, schedule = _new_state_and_optimizer(cfg, model, mesh, total_steps)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  ckpts = checkpoints.RunCheckpoints(workdir, cfg.checkpoints_to_keep)
  state, start, data_state = _restore_or_start(cfg, ckpts, state, total_steps)
  if start >= total_steps:
    ckpts.close()
    return state, 0

  backbone_def, backbone_state, backbone_sharding = sharding.place_frozen(
      towers.backbone, mesh, cfg.mesh.backbone_sharding)
  cache = _open_feature_cache(cfg, workdir, towers, model, handle)
  step_images, step_cached = _build_train_steps(
      cfg, model, backbone_def, backbone_sharding, tx, schedule, mesh, state_sharding, cache)
  iterator = _training_iterator(cfg, handle, model, data_state)
  log = run_log.RunLog(workdir, total_steps, start, cfg.batch_size)
  try:
    state = _epoch_loop(
        cfg, mesh, state, backbone_state, text_table, iterator, cache,
        step_images, step_cached, ckpts, log, start=start,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  finally:
    log.close()
    ckpts.close()
  return state, total_steps - start


def _run_length(cfg, handle) -> tuple[int, int]:
  """Steps per epoch and in all; refuses a data set smaller than one batch."""
  steps_per_epoch = handle.num_examples // cfg.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{handle.name} has {handle.num_examples} examples, fewer than "
                     f"batch_size={cfg.batch_size}")
  return steps_per_epoch, steps_per_epoch * cfg.epochs


def _new_state_and_optimizer(cfg, model, mesh, total_steps: int):
  """A fresh head's training state (replicated over `mesh`), its optimiser
  and learning-rate schedule."""
  _, params = nnx.split(model.new_head(cfg.seed))
  tx, schedule = steps.make_optimizer(
      cfg.optimizer, total_steps, first_step_zero=model.behaviour.first_update_lr_zero)
  state = jax.device_put(steps.init_state(params, tx), sharding.replicated(mesh))
  return state, tx, schedule


def _restore_or_start(cfg, ckpts, state, total_steps: int):
  """Resumes from the newest intact checkpoint, or starts at step 0 (from
  `cfg.init_from`'s trained head when set).

  Returns the state, the step it is at and the data-iterator state to
  resume (None when starting).
  """
  # The newest intact step (a damaged one is reported and skipped).
  start, restored, data_state = ckpts.restore_newest(checkpoints.abstract_like(state))
  if start is not None:
    ckpts.discard_damaged()
    if jax.process_index() == 0:
      print(f"resuming from step {start} of {total_steps}", flush=True)
    return restored, start, data_state
  if cfg.init_from:
    # Starts from another run's trained head; the optimiser state starts fresh.
    params, source, from_step = checkpoints.restore_head_params(
        checkpoints.abstract_like(state["params"]), Path(cfg.init_from),
        keep=cfg.checkpoints_to_keep)
    state = dict(state, params=params)
    logging.info("initialised the head from %s (step %d)", source, from_step)
  return state, 0, None


def _build_train_steps(cfg, model, backbone_def, backbone_sharding, tx, schedule, mesh,
                       state_sharding, cache):
  """The jitted step from images (also returning backbone features when a
  feature cache is open) and the step from cached features (None without a
  cache)."""
  cache_dtype = jnp.bfloat16 if cfg.feature_cache_dtype == "bfloat16" else jnp.float32
  builder = steps.StepBuilder(model, backbone_def, tx=tx, schedule=schedule, mesh=mesh,
                              state_sharding=state_sharding,
                              backbone_sharding=backbone_sharding)
  step_images = builder.train_step(from_features=False, return_features=cache is not None,
                                   cache_dtype=cache_dtype)
  step_cached = builder.train_step(from_features=True) if cache is not None else None
  return step_images, step_cached


def _training_iterator(cfg, handle, model, data_state):
  """The training batches, resumed at `data_state` when given."""
  iterator = iter(datasets.loader(cfg, handle, model, batch_size=cfg.batch_size,
                                 train=True))
  if data_state is not None:
    iterator.set_state(data_state)
  return iterator


def _epoch_loop(cfg, mesh, state, backbone_state, text_table, iterator, cache,
                step_images, step_cached, ckpts, log, *, start: int, total_steps: int,
                steps_per_epoch: int):
  """Runs steps `start + 1 .. total_steps`: each one logged, checked finite,
  and checkpointed on schedule. Returns the final state."""
  config_json = json.loads(cfg.to_json())
  for step in range(start, total_steps):
    local = next(iterator)
    state, metrics, cached = _step_with_feature_cache(
        mesh, state, backbone_state, text_table, local, cache, step_images, step_cached)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics["from_cache"] = float(cached)
    _check_finite(cfg, metrics, step, ckpts, cache, cached)
    done = step + 1
    log.step(done, metrics, write=done % cfg.log_every_steps == 0 or done == total_steps)
    if cache is not None and done % steps_per_epoch == 0:
      cache.finish_epoch()
    if done % cfg.checkpoint_every_steps == 0 or done == total_steps:
      ckpts.save(done, state, iterator.get_state(), config_json)
  return state


def _step_with_feature_cache(mesh, state, backbone_state, text_table, local, cache,
                             step_images, step_cached):
  """One training step on the local batch `local`, dispatched on the feature
  cache (`feature_cache.run_batch`, shared with evaluation): from cached
  features when every row of the global batch is stored, else from images
  (storing their features when a cache is open).

  Returns the new state, the step's metrics and whether it ran from the cache.
  """
  batch = sharding.global_batch({k: local[k] for k in steps.TARGET_KEYS}, mesh)
  cached = cache is not None and cache.has(sharding.all_rows(local["index"]))

  def from_features(features):
    return step_cached(state, backbone_state, text_table, dict(batch, **features))

  def from_images(images):
    out = step_images(state, backbone_state, text_table, dict(batch, **images))
    return ((out[0], out[1]), out[2]) if cache is not None else out

  state, metrics = feature_cache.run_batch(cache, local, mesh, cached, from_features,
                                           from_images)
  return state, metrics, cached


def _check_finite(cfg, metrics: dict, step: int, ckpts, cache, cached: bool) -> None:
  """Raises NonFiniteLossError (before the step is saved) when the loss or
  the parameter norm is NaN or infinite."""
  if math.isfinite(metrics["loss"]) and math.isfinite(metrics["param_norm"]):
    return
  last = ckpts.latest_step()
  kept = (f"the last good checkpoint (step {last}) in {ckpts.dir} is kept"
          if last is not None else "no checkpoint had been saved yet")
  source = (f"from the feature cache in {cache.dir}; if the data and config are "
            "right, delete that cache" if cached and cfg.feature_cache == "disk"
            else "from images")
  raise NonFiniteLossError(
      f"non-finite training at step {step + 1}: loss {metrics['loss']}, parameter "
      f"norm {metrics['param_norm']} (the step ran {source}); stopping without "
      f"saving it; {kept}")


def _open_feature_cache(cfg, workdir: Path, towers, model, handle):
  """Opens the configured feature cache (None for `feature_cache="none"`)
  and says what it holds."""
  if cfg.feature_cache == "none":
    return None
  directory = (Path(cfg.feature_cache_dir) if cfg.feature_cache_dir
               else Workdir(workdir).feature_cache)
  cache = feature_cache.open_cache(cfg.feature_cache, directory, towers.backbone_id, model,
                                   handle, dtype=cfg.feature_cache_dtype,
                                   backbone_dtype=cfg.backbone.dtype)
  if jax.process_index() == 0:
    where = f" in {cache.dir}" if cfg.feature_cache == "disk" else ""
    stored = int(cache.filled.sum())
    plan = ("every step runs the head only" if stored == handle.num_examples else
            "the backbone runs for the others until they are stored (first epoch); "
            "later steps run the head only")
    print(f"feature cache ({cfg.feature_cache}{where}): backbone features of {stored} of "
          f"{handle.num_examples} training examples stored; {plan}", flush=True)
  return cache
