"""Benchmark: input-pipeline images/s beside the backbone's images/s.

Generates MVTec-sized images (900x900 PNG by default) with
`adjax.data.synthetic`, prepares them with the `folder` builder, and times
the training pipeline (decode, PIL bilinear resize to 512x512, normalise,
mask resize and threshold, batch) with 0, 1 and 2 grain worker processes.
The first batch of each run (worker start-up) is not timed. Then, unless
`--backbone none`, it times the frozen DINOv3 backbone (random weights,
same architecture) at the same size, batch 1, after compilation, so one can
see whether input would be the bottleneck on this machine.

Run:
  python -m adjax.bench.pipeline
  python -m adjax.bench.pipeline --workers 0,2 --num-batches 8 --backbone none
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence
from adjax import data
import jax
import jax.numpy as jnp
from flax import nnx
from adjax.models import dinov3
from adjax.data import synthetic


def _pipeline_rate(handle, *, image_size, batch_size, workers, threads,
                   num_batches) -> float:
  loader = data.make_loader(handle, image_size=image_size, batch_size=batch_size,
                            train=True, seed=0, worker_count=workers,
                            num_threads=threads, prefetch=max(2, threads))
  it = iter(loader)
  next(it)  # start-up (worker processes, first reads) is not timed
  t0 = time.perf_counter()
  for _ in range(num_batches):
    b = next(it)
  dt = time.perf_counter() - t0
  assert b["image"].shape == (batch_size, image_size, image_size, 3)
  close = getattr(it, "close", None)
  if close is not None:
    close()
  return num_batches * batch_size / dt


def _backbone_rate(variant: str, image_size: int, iters: int) -> float:
  model = dinov3.init_random(variant)
  depth = model.config.depth
  layers = [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]

  @nnx.jit
  def run(m, x):
    return m.get_intermediate_layers(x, layers)

  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  jax.block_until_ready(run(model, x))  # compile
  t0 = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(run(model, x))
  return iters / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m adjax.bench.pipeline",
                              description=__doc__.split("\n")[0])
  p.add_argument("--image-size", type=int, default=512)
  p.add_argument("--source-size", type=int, default=900)
  p.add_argument("--num-images", type=int, default=48,
                 help="generated images (the pipeline repeats over them)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--num-batches", type=int, default=12, help="timed batches per run")
  p.add_argument("--workers", default="0,1,2", help="worker counts to time")
  p.add_argument("--threads", type=int, default=2,
                 help="decode threads (per worker process)")
  p.add_argument("--backbone", default="vitl16",
                 help="DINOv3 variant to time beside the pipeline, or 'none'")
  p.add_argument("--backbone-iters", type=int, default=2)
  p.add_argument("--work-dir", default=None,
                 help="keep generated and prepared data here (default: temporary)")
  a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
  logging.basicConfig(level=logging.WARNING)


  with tempfile.TemporaryDirectory(prefix="adjax-bench-") as tmp:
    work = Path(a.work_dir or tmp)
    raw = work / f"raw-{a.source_size}-{a.num_images}"
    t0 = time.perf_counter()
    if not (raw / "family_a").is_dir():
      synthetic.generate(raw, image_size=a.source_size, families=["a"],
                         per_category=max(2, a.num_images // 4))
    handle = data.prepare("folder", manual_dir=raw / "family_a", data_dir=work / "prepared")
    print(f"data: {handle.num_examples} PNG images of {a.source_size}x{a.source_size} "
          f"(generated and prepared in {time.perf_counter() - t0:.1f} s)")
    print(f"machine: {os.cpu_count()} CPU cores visible")
    print(f"pipeline at {a.image_size}x{a.image_size}, batch {a.batch_size}, "
          f"{a.threads} decode thread(s) per process, {a.num_batches} timed batches:")
    rates = {}
    for w in [int(x) for x in a.workers.split(",") if x.strip()]:
      rates[w] = _pipeline_rate(handle, image_size=a.image_size,
                                batch_size=a.batch_size, workers=w,
                                threads=a.threads, num_batches=a.num_batches)
      print(f"  workers={w}: {rates[w]:7.1f} images/s")
  if a.backbone != "none":
    try:
      rate = _backbone_rate(a.backbone, a.image_size, a.backbone_iters)
    except ImportError as e:
      print(f"backbone: not measured ({e})")
    else:
      best = max(rates.values()) if rates else float("nan")
      print(f"backbone {a.backbone} at {a.image_size}x{a.image_size}, batch 1, "
            f"float32: {rate:7.2f} images/s")
      print(f"input/backbone ratio (best pipeline): {best / rate:.1f}x "
            f"({'input keeps up' if best >= rate else 'input is the bottleneck'})")


if __name__ == "__main__":
  main()
