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

The cached step's achieved GFLOP/s counts its matmul FLOPs analytically
(`cached_step_flops`: adapters, text adapters, the per-layer map and logit
products and the bilinear upsampling, forward and backward; elementwise work,
the losses and the optimiser are not counted) and is compared with the
float32 matmul ceiling of `adjax.bench.backbone` (fastest square matmul),
measured in the same run before and after the cases.

`--versus torch` also times, for each case, adjax's jitted backbone forward
(the part of the image-fed steps that dominates them) against transformers'
PyTorch DINOv3ViTModel on the same batch (see `adjax.bench.backbone`).
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adjax import steps as step_lib
from adjax.bench import backbone as backbone_bench
from adjax.config import schema
from adjax.ad_model import ADModel, Behaviour
from adjax.models import backbones, dinov3

MVTEC_IMAGES = 1725
EPOCHS = 100
TEXT_DIM = 768
PARTS = ("train_images", "train_cached", "eval")


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


def cached_step_flops(config: dinov3.DinoV3Config, size: int, batch: int,
                      text_dim: int = TEXT_DIM, num_layers: int = 4,
                      text_rows: int = 15) -> float:
  """Matmul FLOPs (2 per multiply-add) of one train step on cached features.

  Forward: per layer the patch adapter [B N, D] x [D, E], the cls adapter,
  the two [B, N, E] x [B, E] map products, the [B, E] x [B, E, 2] logits and
  the align-corners upsampling of the [B, h, w, 2] planes (rows then
  columns); once per step the two text adapters on the [K, E] table.
  Backward: only the adapters' kernels are differentiated (the features and
  the text table are constants), so each adapter costs one more matmul
  (dW = X^T dY) and each product between two differentiated operands two.
  """
  d, e = config.dim, text_dim
  h = w = size // config.patch_size
  n = h * w
  up = 2 * batch * 2 * (size * h * w + size * size * w)  # [H,h] then [W,w]
  per_layer_fwd = (2 * batch * n * d * e + 2 * batch * d * e     # adapters
                   + 2 * 2 * batch * n * e + 2 * batch * e * 2    # maps, logits
                   + up)
  per_layer_bwd = (2 * batch * n * d * e + 2 * batch * d * e     # dW
                   + 2 * (2 * 2 * batch * n * e + 2 * batch * e * 2)
                   + up)                                          # d input of up
  text = 2 * 2 * text_rows * e * e
  return num_layers * (per_layer_fwd + per_layer_bwd) + 2 * text


def bench_case(variant: str, size: int, batch: int, steps: int, dtype,
               parts=PARTS) -> dict:
  config = dinov3.VARIANTS[variant]
  info = backbones.describe("dinov3", config)
  model = ADModel(info, info.default_layers(), size, TEXT_DIM, Behaviour(True, True, True, True))
  backbone = dinov3.init_random(variant, dtype=dtype)
  backbone_def, backbone_state = nnx.split(backbone)
  _, params = nnx.split(model.new_head(0))
  tx, schedule = step_lib.make_optimizer(schema.OptimizerConfig(), 1000,
                                        first_step_zero=model.behaviour.first_update_lr_zero)
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
    if name not in parts:
      continue
    compile_s, step_s = _timeit(fn, steps)
    out[name] = {"compile_s": compile_s, "images_per_s": batch / step_s}
  if "train_cached" in out:
    out["train_cached"]["gflops"] = (cached_step_flops(config, size, batch)
                                   * out["train_cached"]["images_per_s"] / batch / 1e9)
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m adjax.bench train", description=__doc__)
  p.add_argument("--cases", default="vits16@224,vitl16@512")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--parts", default=",".join(PARTS),
                 help=f"comma-separated subset of {','.join(PARTS)}")
  p.add_argument("--matmul-sizes", default="1024,2048",
                 help="square float32 matmuls; the fastest is the ceiling")
  p.add_argument("--versus", choices=["torch"], default=None,
                 help="also time the backbone forward against PyTorch (float32)")
  a = p.parse_args(argv)
  parts = [x for x in a.parts.split(",") if x]
  if any(x not in PARTS for x in parts):
    p.error(f"--parts: {parts}; choose from {PARTS}")
  if a.versus:
    backbone_bench.import_torch()
  dtype = jnp.float32 if a.dtype == "float32" else jnp.bfloat16
  print(f"devices: {jax.devices()}  batch {a.batch}  dtype {a.dtype}")
  matmul_sizes = [int(n) for n in a.matmul_sizes.split(",") if n]

  def ceiling_now() -> float:
    return max(backbone_bench.matmul_gflops(n, jnp.float32, 5) for n in matmul_sizes)

  ceiling = ceiling_now()
  results = []
  for case in a.cases.split(","):
    variant, size = case.split("@")
    r = bench_case(variant, int(size), a.batch, a.steps, dtype, parts)
    results.append((variant, size, r))
    print(f"\n{variant} @ {size}px")
    for name, v in r.items():
      print(f"  {name:13s} {v['images_per_s']:9.2f} img/s   (first call incl. compile "
            f"{v['compile_s']:.1f} s)")
    if "train_images" not in r or "train_cached" not in r:
      continue
    uncached_h = EPOCHS * MVTEC_IMAGES / r["train_images"]["images_per_s"] / 3600
    cached_h = (MVTEC_IMAGES / r["train_images"]["images_per_s"]
                + (EPOCHS - 1) * MVTEC_IMAGES / r["train_cached"]["images_per_s"]) / 3600
    print(f"  paper schedule ({EPOCHS} epochs x {MVTEC_IMAGES} images), extrapolated: "
          f"{uncached_h:.1f} h without the cache, {cached_h:.2f} h with it "
          f"({uncached_h / cached_h:.0f}x)")
  ceiling = max(ceiling, ceiling_now())
  print(f"\nfloat32 matmul ceiling (fastest of {matmul_sizes} square, before and after): "
        f"{ceiling:.1f} GFLOP/s")
  for variant, size, r in results:
    if "train_cached" not in r:
      continue
    c = r["train_cached"]
    print(f"  {variant} @ {size}px cached train step: {c['gflops']:.1f} GFLOP/s of matmul "
          f"(forward + backward) = {c['gflops'] / ceiling:.1%} of the ceiling")
  if a.versus:
    print("\nbackbone forward versus torch (same batch, alternating calls):")
    backbone_bench.print_versus([
        backbone_bench.versus_torch(v, int(s), a.batch, max(a.steps, 3)) for v, s, _ in results])
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"\npeak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
  main()
