"""Device mesh and placement rules.

Data parallelism as current JAX does it: one `jax.jit` over a
`jax.sharding.Mesh` of all devices, the batch split on the "data" axis, the
trainable head replicated, and the frozen backbone's weights placed by the
config rule (replicated, or split over the "model" axis for towers that do
not fit one device). XLA inserts the collectives; `pmap` is not used.
"""

from __future__ import annotations

from flax import nnx
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA, MODEL = "data", "model"


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
  """A ("data", "model") mesh; data=-1 takes every device not used by model."""
  devices = list(devices if devices is not None else jax.devices())
  if model < 1 or len(devices) % model:
    raise ValueError(f"mesh.model={model} does not divide the {len(devices)} devices")
  if data == -1:
    data = len(devices) // model
  if data * model != len(devices):
    raise ValueError(
        f"mesh.data={data} x mesh.model={model} != {len(devices)} devices; "
        "set mesh.data=-1 to use all of them")
  return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  spec = [None] * (batch_axis + 1)
  spec[batch_axis] = DATA
  return NamedSharding(mesh, P(*spec))


def backbone_rule(mesh: Mesh, mode: str):
  """Returns path, shape -> sharding for the frozen backbone's weights.

  mode "replicated": every weight on every device (ViT-L fits easily).
  mode "model": each matrix is split on its largest axis that the "model"
  axis size divides (the 7B's 4096 x 8192 kernels); vectors stay replicated.
  """
  if mode not in ("replicated", "model"):
    raise ValueError(f"mesh.backbone_sharding={mode!r}; expected replicated or model")
  n = mesh.shape[MODEL]

  def rule(shape: tuple[int, ...]) -> NamedSharding:
    if mode == "replicated" or n == 1 or len(shape) < 2:
      return replicated(mesh)
    axes = sorted(range(len(shape)), key=lambda a: -shape[a])
    for a in axes:
      if shape[a] % n == 0 and shape[a] >= n:
        spec = [None] * len(shape)
        spec[a] = MODEL
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)
  return rule


def place_frozen(module, mesh: Mesh, mode: str):
  """Splits a frozen module and puts its weights on the mesh by `backbone_rule`.

  Returns (graphdef, placed state, the state's shardings) for a jitted step.
  """
  graphdef, state = nnx.split(module)
  rule = backbone_rule(mesh, mode)
  state = jax.tree.map(lambda x: jax.device_put(x, rule(np.shape(x))), state)
  return graphdef, state, jax.tree.map(lambda x: x.sharding, state)


def global_batch(local: dict, mesh: Mesh, batch_axes: dict[str, int] | None = None) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded on "data".

  Each process passes only its own rows; `jax.make_array_from_process_local_data`
  stitches them into one global array (on one process it is a device_put).
  Non-numeric leaves (paths) are dropped.
  """
  batch_axes = batch_axes or {}
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    if v.dtype.kind in "OSU":
      continue
    sharding = batch_sharding(mesh, batch_axes.get(k, 0))
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def all_rows(x, axis: int = 0) -> np.ndarray:
  """Every process's rows on every process, in global order (host numpy).

  `x` is a global jax.Array sharded on `axis`, or this process's own rows as
  numpy (concatenated in process order, which is the order in which
  `global_batch` lays them out). With one process: `x` itself, on the host.
  """
  if jax.process_count() == 1:
    return np.asarray(x)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # process_allgather concatenates along axis 0: move the batch axis there.
    moved = jax.numpy.moveaxis(x, axis, 0) if axis else x
    return np.moveaxis(np.asarray(multihost_utils.process_allgather(moved, tiled=True)),
                       0, axis)
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def local_rows(x: jax.Array, axis: int = 0) -> np.ndarray:
  """This process's rows of a global array sharded on `axis`, in order.

  The inverse of `global_batch`: with one process, the whole array.
  """
  if jax.process_count() == 1:
    return np.asarray(x)
  seen, parts = set(), []
  for shard in sorted(x.addressable_shards, key=lambda s: s.index[axis].start or 0):
    start = shard.index[axis].start or 0
    if start not in seen:     # replicas over the "model" axis hold the same rows
      seen.add(start)
      parts.append(np.asarray(shard.data))
  return np.concatenate(parts, axis=axis)
