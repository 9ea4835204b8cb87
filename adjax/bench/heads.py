"""Benchmark: evaluating N heads on one target, with and without the feature cache.

  python -m adjax.bench heads [--variant vits16] [--size 224] [--images 32]
                              [--heads 4] [--batch 8]

Researchers score several trained heads (seeds, checkpoints, ablations) on
the same target. Without a cache every head runs the full backbone over every
image; with `eval.feature_cache=disk` the backbone runs once (filling the
cache on disk) and each head then runs alone on the stored features. Both
paths here are the ones evaluation runs: the jitted eval steps from
`adjax.steps` and the on-disk `FeatureCache` (written, published with its
checksums, reopened and verified). Random weights of the real architecture,
random images; the printed maps of both paths are compared. Numbers only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adjax import steps
from adjax.ad_model import ADModel
from adjax.models import backbones
from adjax.workdir import feature_cache

TEXT_DIM = 768


def _run(label: str, fn) -> float:
  start = time.perf_counter()
  fn()
  seconds = time.perf_counter() - start
  print(f"  {label:46s} {seconds:8.2f} s", flush=True)
  return seconds


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m adjax.bench heads", description=__doc__)
  p.add_argument("--family", default="dinov3")
  p.add_argument("--variant", default="vits16")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--images", type=int, default=32)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--batch", type=int, default=8)
  a = p.parse_args(argv)
  module = backbones.family_module(a.family)
  config = backbones.variant_config(a.family, a.variant)
  info = backbones.describe(a.family, config)
  model = ADModel(info, info.default_layers(), a.size, TEXT_DIM)
  backbone_def, backbone_state = nnx.split(module.init_random(config))
  builder = steps.StepBuilder(model, backbone_def)
  full, filling, head_only = (builder.eval_step(),
                              builder.eval_step(return_features=True),
                              builder.eval_features_step())
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (a.images, a.size, a.size, 3), dtype=np.uint8)
  cats = np.zeros(a.images, np.int32)
  text = jnp.asarray(rng.normal(size=(1, 2, TEXT_DIM)), jnp.float32)
  heads = [nnx.split(model.new_head(seed))[1] for seed in range(a.heads)]
  batches = [slice(i, i + a.batch) for i in range(0, a.images, a.batch)]
  print(f"{a.family} {a.variant} @ {a.size}px, {a.images} images, {a.heads} heads, "
        f"batch {a.batch}, devices {jax.devices()}")

  # Compile every step once, outside the timings.
  b0 = batches[0]
  jax.block_until_ready(full(heads[0], backbone_state, text, images[b0], cats[b0]))
  _, _, (pt, ct) = filling(heads[0], backbone_state, text, images[b0], cats[b0])
  jax.block_until_ready(head_only(heads[0], text, pt.astype(jnp.float32),
                                  ct.astype(jnp.float32), cats[b0]))

  maps_full, maps_cached = [], []
  phases: dict[str, float] = {}

  def without_cache():
    for params in heads:
      for b in batches:
        amap, _ = full(params, backbone_state, text, images[b], cats[b])
        maps_full.append(np.asarray(amap))

  def with_cache():
    with tempfile.TemporaryDirectory() as tmp:
      grid = model.grid
      cache = feature_cache.FeatureCache("disk", a.images, len(model.layers), grid[0] * grid[1],
                                         info.dim, "float32", Path(tmp), "bench")
      start = time.perf_counter()
      for b in batches:    # the first head's evaluation fills the cache
        amap, _, (pt, ct) = filling(heads[0], backbone_state, text, images[b], cats[b])
        cache.put(np.arange(a.images)[b], np.asarray(pt), np.asarray(ct))
        maps_cached.append(np.asarray(amap))
      cache.finish_epoch()
      phases["fill"] = time.perf_counter() - start
      cache = feature_cache.FeatureCache("disk", a.images, len(model.layers), grid[0] * grid[1],
                                         info.dim, "float32", Path(tmp), "bench")  # verified
      assert cache.complete
      start = time.perf_counter()
      for params in heads[1:]:
        for b in batches:
          pt, ct = cache.get(np.arange(a.images)[b])
          amap, _ = head_only(params, text, pt, ct, cats[b])
          maps_cached.append(np.asarray(amap))
      phases["heads"] = (time.perf_counter() - start) / max(a.heads - 1, 1)

  t_full = _run(f"{a.heads} heads, backbone every time", without_cache)
  t_cached = _run(f"{a.heads} heads, backbone once (disk cache)", with_cache)
  diff = max(float(np.max(np.abs(x - y))) for x, y in zip(maps_full, maps_cached))
  print(f"  saving: {t_full / t_cached:.1f}x; one head with the backbone "
        f"{t_full / a.heads:.2f} s, filling the cache {phases['fill']:.2f} s, each further "
        f"head from the cache {phases['heads']:.2f} s; maps agree to {diff:.1e}")


if __name__ == "__main__":
  main()
