"""Benchmark: train and eval throughput of the full AD-DINOv3 step.

  python -m adjax.bench train [--cases vits16@224,vitl16@512] [--batch 4] [--steps 3]

For each case (random weights, real sizes) it measures images/s of:
  - the train step from images (backbone forward + head + loss + update),
  - the train step from cached features (what later epochs run with
    feature_cache=memory|disk),
  - the eval step (backbone + head + maps + image scores),
and extrapolates the wall time of the paper's schedule (100 epochs over the
1725 MVTec AD test images) without and with the cache (first epoch from
images, the other 99 from features). Peak resident memory is printed last.
Numbers only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adjax import config_defaults
from adjax import steps as step_lib
from adjax.model import ADModel, Behaviour
from adjax.models import backbones, dinov3

MVTEC_IMAGES = 1725
EPOCHS = 100
TEXT_DIM = 768


def _timeit(fn, steps: int) -> tuple[float, float]:
  """(first-call seconds including compile, mean seconds of the next `steps`)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return first, (time.perf_counter() - t0) / steps


def bench_case(variant: str, size: int, batch: int, steps: int, dtype) -> dict:
  config = dinov3.VARIANTS[variant]
  info = backbones.describe("dinov3", config)
  model = ADModel(info, info.default_layers(), size, TEXT_DIM, Behaviour(True, True, True, True))
  backbone = dinov3.init_random(variant, dtype=dtype)
  backbone_def, backbone_state = nnx.split(backbone)
  _, params = nnx.split(model.new_head(0))
  cfg = config_defaults.base_config()
  tx, schedule = step_lib.make_optimizer(cfg, 1000)
  builder = step_lib.StepBuilder(model, backbone_def, tx=tx, schedule=schedule)
  from_images = builder.train_step(from_features=False)
  from_cache = builder.train_step(from_features=True)
  evaluate = builder.eval_step()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, size=(batch, size, size, 3)), jnp.uint8)
  mask = jnp.asarray(rng.random((batch, size, size)) > 0.9, jnp.float32)
  label = jnp.arange(batch, dtype=jnp.int32) % 2
  cat = jnp.zeros((batch,), jnp.int32)
  text = jnp.asarray(rng.normal(size=(15, 2, TEXT_DIM)), jnp.float32)
  has_mask = jnp.ones((batch,), bool)
  batch_img = {"image": images, "mask": mask, "label": label, "category_index": cat,
               "has_mask": has_mask}
  patches, cls = jax.jit(lambda s, x: model.features(nnx.merge(backbone_def, s), x))(
      backbone_state, images)
  batch_feat = {"patches": patches.astype(jnp.bfloat16).astype(jnp.float32),
                "cls": cls.astype(jnp.bfloat16).astype(jnp.float32),
                "mask": mask, "label": label, "category_index": cat, "has_mask": has_mask}
  holder = {"state": step_lib.init_state(params, tx)}

  def run(step_fn, b):
    def call():
      holder["state"], m = step_fn(holder["state"], backbone_state, text, b)
      return m["loss"]
    return call

  out = {}
  for name, fn in (("train_images", run(from_images, batch_img)),
                   ("train_cached", run(from_cache, batch_feat)),
                   ("eval", lambda: evaluate(holder["state"]["params"], backbone_state,
                                             text, images, cat))):
    compile_s, step_s = _timeit(fn, steps)
    out[name] = {"compile_s": compile_s, "images_per_s": batch / step_s}
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m adjax.bench train", description=__doc__)
  p.add_argument("--cases", default="vits16@224,vitl16@512")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  a = p.parse_args(argv)
  dtype = jnp.float32 if a.dtype == "float32" else jnp.bfloat16
  print(f"devices: {jax.devices()}  batch {a.batch}  dtype {a.dtype}")
  for case in a.cases.split(","):
    variant, size = case.split("@")
    r = bench_case(variant, int(size), a.batch, a.steps, dtype)
    print(f"\n{variant} @ {size}px")
    for name, v in r.items():
      print(f"  {name:13s} {v['images_per_s']:9.2f} img/s   (first call incl. compile "
            f"{v['compile_s']:.1f} s)")
    uncached_h = EPOCHS * MVTEC_IMAGES / r["train_images"]["images_per_s"] / 3600
    cached_h = (MVTEC_IMAGES / r["train_images"]["images_per_s"]
                + (EPOCHS - 1) * MVTEC_IMAGES / r["train_cached"]["images_per_s"]) / 3600
    print(f"  paper schedule ({EPOCHS} epochs x {MVTEC_IMAGES} images), extrapolated: "
          f"{uncached_h:.1f} h without the cache, {cached_h:.2f} h with it "
          f"({uncached_h / cached_h:.0f}x)")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"\npeak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
  main()
