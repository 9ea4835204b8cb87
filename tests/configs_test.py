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

from adjax.config import schema
from adjax import steps
from adjax.common import sharding
from adjax.ad_model import ADModel
from adjax.models import backbones, clip_text

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CASES = [("mvtec", None), ("mvtec", "gpu"), ("mvtec", "gpu8"), ("mvtec", "tpu"),
         ("mvtec", "tpu_7b"), ("mvtec", "cpu"), ("visa", None), ("visa", "tpu"),
         ("mvtec", "dinov2"), ("mvtec", "exact"), ("mvtec", "dinov2+gpu8"),
         ("visa", "dinov2"), ("demo", None)]


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
  bconf = backbones.variant_config(cfg.backbone.family, cfg.backbone.variant)
  info = backbones.describe(cfg.backbone.family, bconf)
  tconf = clip_text.VARIANTS[cfg.text.variant]
  run = schema.from_configdict(cfg)
  model = ADModel.create(run.model, info, tconf.embed_dim)   # checks size, layers, score
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.backbone.dtype]
  backbone = backbones.abstract_model(cfg.backbone.family, cfg.backbone.variant, dtype)
  backbone_def, backbone_state = nnx.split(backbone)
  params = model.abstract_params()

  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
  assert cfg.batch_size % mesh.shape["data"] == 0
  assert cfg.eval.batch_size % mesh.shape["data"] == 0
  rule = sharding.backbone_rule(mesh, cfg.mesh.backbone_sharding)
  bshard = jax.tree.map(lambda x: rule(x.shape), backbone_state)
  tx, schedule = steps.make_optimizer(run.optimizer, 1000, model.behaviour.first_update_lr_zero)
  state = jax.eval_shape(lambda p: steps.init_state(p, tx), params)
  rep = sharding.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: rep, state)
  step = steps.StepBuilder(model, backbone_def, tx=tx, schedule=schedule, mesh=mesh,
                           state_sharding=state_sharding,
                           backbone_sharding=bshard).train_step(from_features=False)
  b, s = cfg.batch_size, cfg.image_size
  batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
           "mask": jax.ShapeDtypeStruct((b, s, s), jnp.float32),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32),
           "category_index": jax.ShapeDtypeStruct((b,), jnp.int32),
           "has_mask": jax.ShapeDtypeStruct((b,), jnp.bool_)}
  text = jax.ShapeDtypeStruct((15, 2, tconf.embed_dim), jnp.float32)
  new_state, metrics = jax.eval_shape(step, state, backbone_state, text, batch)
  assert metrics["loss"].shape == ()
  assert jax.tree.map(lambda x: x.shape, new_state["params"]) == jax.tree.map(
      lambda x: x.shape, params)
