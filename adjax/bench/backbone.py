"""Backbone forward throughput against the machine's matmul ceiling.

  python -m adjax.bench backbone [--variants vits16,vitl16] [--sizes 224,512]
                                 [--batch 2] [--dtype float32] [--iters 3]
                                 [--versus torch]

Variants of any family (DINOv3 `vitl16`, DINOv2 `vitl14_reg`, ...). For each
variant and square input size (a multiple of its patch): compile time of the jitted
`get_intermediate_layers` (default blocks, random weights of the real
architecture), images/s, and achieved GFLOP/s from an analytic FLOP count
(patch embedding + per block qkv, attention logits and values, output
projection, FFN; 2 FLOPs per multiply-add; norms and elementwise work not
counted). The ceiling is the fastest of a few large square matmuls in the
same dtype, timed in the same run before and after the models; the fraction
printed is forward GFLOP/s / ceiling GFLOP/s. Times are the best of
`--iters` calls.

`--versus torch` also runs transformers' PyTorch `DINOv3ViTModel` (random
weights of the same variant, truncated after the deepest tapped block like
ours; `torch.no_grad()`, `torch.set_num_threads` = the cores JAX uses) on
the same batch, and taps the same blocks (`output_hidden_states` + the final
norm). The two alternate call by call (the machine may be shared), and the
table gives both images/s (best call) and adjax/torch, the speed ratio
(> 1: adjax is faster), from the best calls and as the median of the
ratios of neighbouring calls (robust to load that changes during the run).
PyTorch's CPU kernels can be capped at AVX2 with ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2, XLA's generated code
with XLA_FLAGS=--xla_cpu_max_isa=AVX2 (its matmul library, YNNPACK, picks
kernels from the CPU it finds; on AMD Zen 4, AVX-512 and AVX2 have the same
FMA throughput anyway).

No XLA flag is set by adjax: with jax 0.10's defaults, dots already run in
YNNPACK (`--xla_cpu_experimental_ynn_fusion_type` defaults to dots), and
the alternatives measured on ViT-L/16 at 512 were no faster or slower
(Eigen dots via `--xla_cpu_experimental_ynn_fusion_type=`, XNNPACK or oneDNN
dot fusions, `--xla_cpu_use_onednn`, `--xla_cpu_use_xnnpack`, XNN graph
fusion, `--xla_cpu_multi_thread_eigen=false`, `--xla_cpu_prefer_vector_width=512`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from adjax.models import backbones, dinov3
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def forward_flops(config: dinov3.DinoV3Config, height: int, width: int,
                  blocks: int | None = None) -> float:
  """Matmul FLOPs of one image through `blocks` blocks (default: all)."""
  p, d, f = config.patch_size, config.dim, config.ffn_hidden
  patches = (height // p) * (width // p)
  t = 1 + config.num_registers + patches
  ffn_mats = 2 if config.ffn == "mlp" else 3
  per_block = 2 * t * d * (3 * d + d + ffn_mats * f) + 2 * 2 * t * t * d
  return 2 * patches * p * p * 3 * d + (blocks or config.depth) * per_block


def _time(fn, *args, iters: int) -> float:
  """Seconds per call, best of `iters` (the machine may be shared)."""
  best = float("inf")
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_gflops(n: int, dtype, iters: int) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  fn = jax.jit(jnp.dot)
  jax.block_until_ready(fn(a, b))
  return 2 * n ** 3 / _time(fn, a, b, iters=iters) / 1e9


def cpu_threads() -> int:
  """Cores this process may run on (what XLA's CPU thread pool sizes itself to)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def import_torch():
  """(torch, transformers), or SystemExit with the install hint."""
  try:
    import torch  # deferred: the PyTorch peer, optional
    import transformers  # deferred: the PyTorch peer, optional
  except ImportError as e:
    raise SystemExit(f"--versus torch needs torch and transformers ({e.name} is missing): "
                     "pip install -e '.[convert]'") from e
  return torch, transformers


def torch_backbone(config: dinov3.DinoV3Config, layers, threads: int):
  """transformers' DINOv3ViTModel of `config` (random weights), truncated after
  the deepest of `layers`; returns f(images [B, H, W, 3] numpy) -> list of
  normed block outputs, the PyTorch counterpart of `get_intermediate_layers`
  (the model itself is `f.model`)."""
  torch, transformers = import_torch()
  torch.set_num_threads(threads)
  depth = max(layers) + 1
  hf_config = transformers.DINOv3ViTConfig(
      hidden_size=config.dim, intermediate_size=config.ffn_hidden, num_hidden_layers=depth,
      num_attention_heads=config.num_heads, patch_size=config.patch_size,
      num_register_tokens=config.num_registers, rope_theta=config.rope_base,
      layer_norm_eps=config.layer_norm_eps, query_bias=config.qkv_bias, key_bias=False,
      value_bias=config.qkv_bias, use_gated_mlp=config.ffn == "swiglu",
      hidden_act="silu" if config.ffn == "swiglu" else "gelu")
  model = transformers.DINOv3ViTModel(hf_config).eval()

  def forward(images):
    with torch.no_grad():
      x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
      hidden = model(x, output_hidden_states=True).hidden_states
      return [model.norm(hidden[i + 1]) for i in layers]

  forward.model = model       # the random weights, for tests to compare against
  return forward


def versus_torch(variant: str, size: int, batch: int, iters: int, jax_fn=None) -> dict:
  """Seconds per batch of adjax's jitted forward and PyTorch's, alternating.

  `jax_fn(images)`, if given, is the adjax side (default: the jitted
  `get_intermediate_layers` of random weights, float32, default blocks)."""
  config = dinov3.VARIANTS[variant]
  layers = dinov3.default_layers(config.depth)
  threads = cpu_threads()
  torch_fn = torch_backbone(config, layers, threads)
  if jax_fn is None:
    graphdef, state = nnx.split(dinov3.init_random(variant))
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s).get_intermediate_layers(x, layers))
    jax_fn = lambda x: jitted(state, x)  # noqa: E731
  images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
  jax_images = jnp.asarray(images)
  for _ in range(2):  # compile / warm-up (oneDNN and MKL pick kernels on first calls)
    jax.block_until_ready(jax_fn(jax_images))
    torch_fn(images)
  times = {"adjax": [], "torch": []}
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(jax_fn(jax_images))
    times["adjax"].append(time.perf_counter() - start)
    start = time.perf_counter()
    torch_fn(images)
    times["torch"].append(time.perf_counter() - start)
  best = {k: min(v) for k, v in times.items()}
  return dict(variant=variant, size=size, batch=batch, threads=threads,
              adjax_images_per_s=batch / best["adjax"], torch_images_per_s=batch / best["torch"],
              ratio_best=best["torch"] / best["adjax"],
              ratio_median=statistics.median(
                  t / a for t, a in zip(times["torch"], times["adjax"])))


def print_versus(rows) -> None:
  print(f"{'variant':10s} {'size':>5s} {'batch':>5s} {'threads':>7s} {'adjax img/s':>11s} "
        f"{'torch img/s':>11s} {'adjax/torch best':>16s} {'paired median':>13s}")
  for r in rows:
    print(f"{r['variant']:10s} {r['size']:5d} {r['batch']:5d} {r['threads']:7d} "
          f"{r['adjax_images_per_s']:11.3f} {r['torch_images_per_s']:11.3f} "
          f"{r['ratio_best']:16.3f} {r['ratio_median']:13.3f}", flush=True)


def bench_backbone(variant: str, size: int, batch: int, dtype, iters: int) -> dict:
  family, config = backbones.find_variant(variant)
  model = backbones.family_module(family).init_random(config, dtype=dtype)
  layers = backbones.describe(family, config).default_layers()
  graphdef, state = nnx.split(model)

  def features(state, images):
    return nnx.merge(graphdef, state).get_intermediate_layers(images, layers)

  images = jax.random.normal(jax.random.key(2), (batch, size, size, 3), jnp.float32)
  start = time.perf_counter()
  compiled = jax.jit(features).lower(state, images).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(state, images))  # warm-up
  seconds = _time(compiled, state, images, iters=iters)
  flops = batch * forward_flops(config, size, size, max(layers) + 1)
  return dict(variant=variant, size=size, batch=batch, compile_s=compile_s,
              images_per_s=batch / seconds, gflops=flops / seconds / 1e9)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m adjax.bench backbone",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--variants", default="vits16,vitl16")
  parser.add_argument("--sizes", default="224,512")
  parser.add_argument("--cases", default="",
                      help="variant@size pairs instead of --variants x --sizes, e.g. "
                           "vitl16@512,vitl14_reg@518")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  parser.add_argument("--iters", type=int, default=3, help="timed calls (best is kept)")
  parser.add_argument("--matmul-sizes", default="1024,2048,4096",
                      help="square matmul sizes; the fastest one is the ceiling")
  parser.add_argument("--versus", choices=["torch"], default=None,
                      help="also time transformers' PyTorch DINOv3ViTModel, alternating "
                           "call by call (float32 only)")
  args = parser.parse_args(argv)
  if args.versus and args.dtype != "float32":
    parser.error("--versus torch compares float32 forwards; drop --dtype")
  if args.versus:
    import_torch()  # fail before any timing
  dtype = DTYPES[args.dtype]
  if args.cases:
    cases = [(c.split("@")[0], int(c.split("@")[1])) for c in args.cases.split(",") if c]
  else:
    cases = [(v, int(s)) for v in args.variants.split(",") if v
             for s in args.sizes.split(",") if s]
  variants = sorted({v for v, _ in cases})
  for v in variants:
    try:
      family, _ = backbones.find_variant(v)
    except backbones.BackboneError as e:
      parser.error(f"--variants: {e}")
    if args.versus and family != "dinov3":
      parser.error(f"--versus torch compares DINOv3 variants; {v} is {family}")

  device = jax.devices()[0]
  print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}, "
        f"dtype {args.dtype}, batch {args.batch}")
  # The ceiling is the fastest of several square matmuls, each best of a few
  # calls, timed before and after the models (the machine may be shared).
  matmul_sizes = [int(n) for n in args.matmul_sizes.split(",") if n]

  def ceiling_now(when):
    rates = {n: matmul_gflops(n, dtype, max(args.iters, 5)) for n in matmul_sizes}
    print(f"matmul {args.dtype} GFLOP/s {when}: "
          + ", ".join(f"{n}^3 {g:.1f}" for n, g in rates.items()), flush=True)
    return max(rates.values())

  ceiling = ceiling_now("before")
  rows = []
  for variant, size in cases:
    rows.append(bench_backbone(variant, size, args.batch, dtype, args.iters))
    r = rows[-1]
    print(f"{variant:10s} {size:5d} compile {r['compile_s']:6.2f} s  "
          f"{r['images_per_s']:8.2f} images/s  {r['gflops']:7.1f} GFLOP/s", flush=True)
  ceiling = max(ceiling, ceiling_now("after"))
  print(f"ceiling: {ceiling:.1f} GFLOP/s")
  print(f"{'variant':10s} {'size':>5s} {'batch':>5s} {'compile s':>9s} {'images/s':>9s} "
        f"{'GFLOP/s':>8s} {'of ceiling':>10s}")
  for r in rows:
    print(f"{r['variant']:10s} {r['size']:5d} {r['batch']:5d} {r['compile_s']:9.2f} "
          f"{r['images_per_s']:9.2f} {r['gflops']:8.1f} {r['gflops'] / ceiling:10.1%}")
  if args.versus:
    print(f"\nversus torch (transformers DINOv3ViTModel, no_grad), alternating calls, "
          f"{args.iters} each:", flush=True)
    print_versus([versus_torch(v, size, args.batch, args.iters) for v, size in cases])
  return 0
