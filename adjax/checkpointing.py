"""Orbax checkpoints of a training run.

A checkpoint holds the trainable state (head parameters, optimiser state,
step) and the resolved config, written by Orbax's `CheckpointManager` (which
coordinates the processes of a multi-host run and only publishes complete
steps), plus one small JSON per process with that process's data-iterator
state, written atomically beside it. Restoring takes the newest step for
which both are present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from adjax import atomic
from adjax.errors import UserError


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint that does not fit the configured model."""


class RunCheckpoints:

  def __init__(self, workdir: Path, keep: int = 2):
    self.dir = (workdir / "checkpoints").absolute()
    self.data_dir = (workdir / "data_state").absolute()
    self.manager = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False))

  def _data_file(self, step: int, process: int | None = None) -> Path:
    process = jax.process_index() if process is None else process
    return self.data_dir / f"step_{step}" / f"process_{process}.json"

  def latest_step(self) -> int | None:
    for step in sorted(self.manager.all_steps(), reverse=True):
      if self._data_file(step).exists():
        return step
    return None

  def save(self, step: int, state, data_state: dict, config: dict) -> None:
    atomic.write_text(self._data_file(step), json.dumps(data_state))
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)),
        force=True)
    self.manager.wait_until_finished()
    self._prune()

  def _prune(self) -> None:
    if jax.process_index() != 0 or not self.data_dir.exists():
      return
    kept = set(self.manager.all_steps())
    for d in self.data_dir.iterdir():
      if d.name.startswith("step_") and int(d.name[5:]) not in kept:
        shutil.rmtree(d, ignore_errors=True)

  def restore(self, step: int, abstract_state) -> tuple[object, dict]:
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    data_state = json.loads(self._data_file(step).read_text())
    return restored["state"], data_state

  def restore_head(self, abstract_params) -> tuple[object, int]:
    """The head parameters of the latest complete step, and that step.

    Only the parameters are taken; no optimiser needs to exist. Each leaf is
    matched by its path and checked against `abstract_params`' shape, so a
    checkpoint of another head size is refused with the parameter named.
    """
    step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f"{self.dir}: no complete checkpoint to load")
    stored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]["params"]
    leaves = []
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    for path, want in paths:
      node = stored
      for key in path:
        name = str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
        if not isinstance(node, dict) or name not in node:
          raise CheckpointMismatchError(
              f"{self.dir} (step {step}) has no head parameter "
              f"{jax.tree_util.keystr(path)}; it was trained for another head")
        node = node[name]
      if tuple(node.shape) != tuple(want.shape):
        raise CheckpointMismatchError(
            f"{self.dir} (step {step}): head parameter {jax.tree_util.keystr(path)} has "
            f"shape {tuple(node.shape)}, this config's head needs {tuple(want.shape)} "
            "(another backbone width, text width or number of tapped layers)")
      leaves.append(jax.device_put(jax.numpy.asarray(node, want.dtype),
                                   getattr(want, "sharding", None)))
    return jax.tree_util.tree_unflatten(treedef, leaves), step

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) for an Orbax restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def restore_head_params(abstract_params, *sources: Path | None, keep: int = 2):
  """Head parameters from the first source workdir that has a checkpoint.

  Returns (params, source, step); raises FileNotFoundError naming the sources
  when none has one.
  """
  tried = []
  for source in sources:
    if source is None:
      continue
    source = Path(source)
    tried.append(str(source))
    if not (source / "checkpoints").is_dir():
      continue
    ckpts = RunCheckpoints(source, keep)
    try:
      if ckpts.latest_step() is not None:
        params, step = ckpts.restore_head(abstract_params)
        return params, source, step
    finally:
      ckpts.close()
  raise FileNotFoundError(
      f"no trained checkpoint in {' or '.join(tried)}; train first (mode=train) or "
      "point init_from at a trained workdir")
