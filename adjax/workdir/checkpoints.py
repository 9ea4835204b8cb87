"""Orbax checkpoints of a training run.

A checkpoint holds the trainable state (head parameters, optimiser state,
step) and the resolved config, written by Orbax's `CheckpointManager` (which
coordinates the processes of a multi-host run and only publishes complete
steps), plus one small JSON per process with that process's data-iterator
state, written atomically beside it, and `digest.json`: a SHA-256 over the
saved parameter arrays and one over the optimiser-state arrays (paths,
shapes, dtypes and bytes, in sorted path order). Restoring takes the newest
step for which the files are present, checks its digest, and when that step
cannot be read or its arrays differ from the digest says so in one line and
takes the next older intact step; when none is intact, one line names the
folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

import jax
import orbax.checkpoint as ocp

from adjax.common import atomic
from adjax.common import quiet as _quiet
from adjax.common.errors import UserError
from adjax.workdir import Workdir

_quiet.drop_library_noise()   # orbax's missing-metadata warning on every restore


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint that does not fit the configured model."""


class CheckpointDamagedError(UserError, ValueError):
  """No checkpoint of a run can be read intact."""


DIGEST_FILE = "digest.json"


def _key_name(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _host_array(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    from jax.experimental import multihost_utils  # deferred: JAX; a workdir is read without it
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def tree_digest(tree) -> str:
  """SHA-256 over a pytree's arrays: each leaf's path (key names joined by
  '/', so a restored plain dict hashes as the saved state did), shape, dtype
  and bytes, in sorted path order."""
  leaves = sorted(("/".join(_key_name(k) for k in path), leaf)
                  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0])
  return _digest_of(leaves)


def _digest_of(named_leaves) -> str:
  h = hashlib.sha256()
  for name, leaf in sorted(named_leaves, key=lambda kv: kv[0]):
    a = _host_array(leaf)
    h.update(name.encode())
    h.update(f"{a.shape}{a.dtype.str}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def state_digests(state) -> dict:
  """{"params": ..., "opt_state": ...}: digests of the parameters and of
  everything else in the training state (optimiser state, step)."""
  rest = {k: v for k, v in state.items() if k != "params"}
  return {"params": tree_digest(state["params"]), "opt_state": tree_digest(rest)}


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


class RunCheckpoints:

  def __init__(self, workdir: Path | Workdir, keep: int = 2):
    run = Workdir(workdir)
    self.dir = run.checkpoints.absolute()
    self.data_dir = run.data_state.absolute()
    self.damaged: list[int] = []     # newer steps the last restore skipped
    self.manager = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False))

  def _data_file(self, step: int, process: int | None = None) -> Path:
    process = jax.process_index() if process is None else process
    return self.data_dir / f"step_{step}" / f"process_{process}.json"

  def _digest_file(self, step: int) -> Path:
    return self.data_dir / f"step_{step}" / DIGEST_FILE

  def complete_steps(self) -> list[int]:
    """Steps with both the Orbax checkpoint and this process's data state, newest first."""
    return [s for s in sorted(self.manager.all_steps(), reverse=True)
            if self._data_file(s).exists()]

  def latest_step(self) -> int | None:
    steps = self.complete_steps()
    return steps[0] if steps else None

  def save(self, step: int, state, data_state: dict, config: dict) -> None:
    atomic.write_text(self._data_file(step), json.dumps(data_state))
    digests = state_digests(state)
    if jax.process_index() == 0:
      atomic.write_text(self._digest_file(step), json.dumps(
          dict(digests, step=int(step), algorithm="sha256"), indent=2, sort_keys=True))
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

  def _recorded(self, step: int) -> dict | None:
    """The step's recorded digests; None for a checkpoint saved without them."""
    path = self._digest_file(step)
    if not path.exists():
      return None
    try:
      return json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise _Damaged(f"{path} unreadable ({e})") from None

  def _newest_intact(self, load):
    """Tries `load(step)` from the newest complete step down; a step that
    fails to load or to match its digest is reported in one line and the
    next older one is tried. Returns (step, loaded) or (None, None) when
    there is no checkpoint at all."""
    steps = self.complete_steps()
    if not steps:
      return None, None
    damaged = []
    for step in steps:
      try:
        loaded = load(step)
      except (UserError, KeyboardInterrupt):
        raise
      except Exception as e:          # noqa: BLE001  (Orbax, TensorStore, OS, our digest)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        damaged.append(step)
        _say(f"checkpoint step {step} in {self.dir} is damaged ({why[:300]}); "
             "trying the previous one")
        continue
      if damaged:
        _say(f"using checkpoint step {step} (newest intact; damaged: "
             f"{', '.join(map(str, damaged))})")
      self.damaged = damaged
      return step, loaded
    raise CheckpointDamagedError(
        f"{self.dir}: no intact checkpoint (steps {', '.join(map(str, damaged))} are "
        "damaged: unreadable or not matching their recorded digest); train again or "
        "restore the folder from a backup")

  def restore(self, step: int, abstract_state) -> tuple[object, dict]:
    """One step, checked against its digest (raises on damage)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    recorded = self._recorded(step)
    if recorded is not None:
      got = state_digests(restored["state"])
      bad = [k for k in ("params", "opt_state") if recorded.get(k) != got[k]]
      if bad:
        raise _Damaged(f"{' and '.join(bad)} differ from the digest recorded at save")
    data_state = json.loads(self._data_file(step).read_text())
    return restored["state"], data_state

  def restore_newest(self, abstract_state):
    """(step, state, data state) of the newest intact step, (None, None, None)
    when there is none at all; raises CheckpointDamagedError when every step
    is damaged."""
    step, loaded = self._newest_intact(lambda s: self.restore(s, abstract_state))
    if step is None:
      return None, None, None
    return step, loaded[0], loaded[1]

  def discard_damaged(self) -> None:
    """Removes the damaged steps the last restore skipped (a resumed run
    saves those steps again)."""
    for step in self.damaged:
      self.manager.delete(step)
      if jax.process_index() == 0:
        shutil.rmtree(self.data_dir / f"step_{step}", ignore_errors=True)
    if self.damaged:
      _say(f"removed the damaged checkpoint steps {', '.join(map(str, self.damaged))}")
    self.damaged = []

  def restore_head(self, abstract_params) -> tuple[object, int]:
    """The head parameters of the newest intact step, and that step.

    Only the parameters are taken; no optimiser needs to exist. Each leaf is
    matched by its path and checked against `abstract_params`' shape, so a
    checkpoint of another head size is refused with the parameter named.
    """
    step, params = self._newest_intact(lambda s: self._load_head(s, abstract_params))
    if step is None:
      raise FileNotFoundError(f"{self.dir}: no complete checkpoint to load")
    return params, step

  def _load_head(self, step: int, abstract_params):
    whole = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(self._local_target(step))))["state"]
    recorded = self._recorded(step)
    if recorded is not None:
      # The whole step is checked: a step with damaged optimiser state is
      # damaged too (resuming from it would fail).
      got = state_digests(whole)
      bad = [k for k in ("params", "opt_state") if recorded.get(k) != got[k]]
      if bad:
        raise _Damaged(f"{' and '.join(bad)} differ from the digest recorded at save")
    stored = whole["params"]
    leaves = []
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    for path, want in paths:
      node = stored
      for key in path:
        name = _key_name(key)
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
    return jax.tree_util.tree_unflatten(treedef, leaves)

  def _local_target(self, step: int):
    """A restore target for every saved array on this process's first device.

    Orbax restores without a target only onto the device layout it saved
    with; a head trained on 8 devices (or processes) must load in a process
    with 1, so each array is read whole onto one local device and placed
    afterwards.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta = ocp.StandardCheckpointer().metadata(self.dir / str(step) / "state")
    meta = getattr(meta, "item_metadata", meta)
    tree = getattr(meta, "tree", meta)
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))

  def close(self) -> None:
    self.manager.close()


class _Damaged(Exception):
  """A checkpoint step that does not match its digest (caught: the next older is tried)."""


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
    if not Workdir(source).checkpoints.is_dir():
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
