"""Every config in configs/ builds, and its train step traces, without weights.

`jax.eval_shape` runs the whole jitted step (backbone at the configured size,
head, loss, optimiser) on abstract arrays, so a config whose sizes, layers,
mesh or batch do not fit together fails here, not hours into a run.
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from adjax import sharding, train, train_step
from adjax.models import clip_text, dinov3
from adjax.models import head as head_lib

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CASES = [("mvtec", None), ("mvtec", "gpu"), ("mvtec", "gpu8"), ("mvtec", "tpu"),
         ("mvtec", "tpu_7b"), ("mvtec", "cpu"), ("visa", None), ("visa", "tpu"),
         ("demo", None)]


def load_config(name, arg):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.__doc__ and "python -m adjax.main --config=configs/" in module.__doc__
  return module.get_config(arg)


def test_every_config_file_is_covered():
  files = {p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_")}
  assert files == {name for name, _ in CASES}


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="unknown config variant"):
    load_config("mvtec", "gpu16")


@pytest.mark.parametrize("name,arg", CASES)
def test_config_builds_and_traces(name, arg):
  cfg = load_config(name, arg)
  cfg.lock()
  with pytest.raises(AttributeError):
    cfg.epocs = 3          # locked: misspelt fields are errors
  bconf = dinov3.VARIANTS[cfg.backbone.variant]
  tconf = clip_text.VARIANTS[cfg.text.variant]
  layers = tuple(cfg.backbone.layers)
  assert len(layers) == 4 and all(0 <= l < bconf.depth for l in layers)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.backbone.dtype]
  backbone = nnx.eval_shape(lambda: dinov3.DinoV3(bconf, dtype=dtype, rngs=nnx.Rngs(0)))
  head = nnx.eval_shape(lambda: head_lib.ADHead(bconf.dim, tconf.embed_dim, 4,
                                                rngs=nnx.Rngs(0)))
  backbone_def, backbone_state = nnx.split(backbone)
  head_def, params = nnx.split(head)

  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
  assert cfg.batch_size % mesh.shape["data"] == 0
  assert cfg.eval.batch_size % mesh.shape["data"] == 0
  rule = sharding.backbone_rule(mesh, cfg.mesh.backbone_sharding)
  bshard = jax.tree.map(lambda x: rule(x.shape), backbone_state)
  tx, schedule = train_step.make_optimizer(cfg, 1000)
  state = jax.eval_shape(lambda p: train_step.init_state(p, tx), params)
  rep = sharding.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: rep, state)
  grid = train.grid_of(cfg.image_size)
  step = train_step.make_train_step(
      head_def=head_def, backbone_def=backbone_def, tx=tx, schedule=schedule,
      layers=layers, grid=grid, out_hw=(cfg.image_size,) * 2,
      quirk=cfg.reference_quirks, from_features=False, mesh=mesh,
      state_sharding=state_sharding, backbone_sharding=bshard)
  b, s = cfg.batch_size, cfg.image_size
  batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
           "mask": jax.ShapeDtypeStruct((b, s, s), jnp.float32),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32),
           "category_index": jax.ShapeDtypeStruct((b,), jnp.int32),
           "has_mask": jax.ShapeDtypeStruct((b,), jnp.bool_)}
  text = jax.ShapeDtypeStruct((15, 2, tconf.embed_dim), jnp.float32)
  new_state, metrics = jax.eval_shape(step, state, backbone_state, text, batch)
  assert metrics["loss"].shape == ()
  assert jax.tree.map(lambda x: x.shape, new_state["params"]) == jax.tree.map(
      lambda x: x.shape, params)
