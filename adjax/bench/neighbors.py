"""Benchmark: MuSc mutual scoring (`adjax.neighbors.mutual_maps`).

  python -m adjax.bench neighbors [--cases vits16@224,vitl16@512] [--n 100,500]
                                  [--layers 4] [--r 1,3,5] [--blocks 3]
                                  [--budget 120]

For each case (a variant's patch grid and width at a size) and batch size N:
random tokens of L layers are written to per-layer float16 `.npy` files and
read back through `np.load(mmap_mode="r")`, as a disk cache would give them.
Each (case, N) runs in its own process, so its peak memory (ru_maxrss) is
its own. Mutual scoring computes, per layer and r, N x N' distance blocks as
matmuls of 2 * N * N' * P^2 * D FLOPs (N' = N rounded up to the key block;
the self-pairs are computed and discarded), in blocks of
`neighbors.block_sizes(P)` query x key images.

When the whole run (L * len(r) layers of N query images) is estimated to
take longer than `--budget` seconds, only `--blocks` query blocks of one
layer and one r are timed (after a compile call) at the full N (so the
memory is that of the full run: every key image's features are held) and
the time is extrapolated linearly to all blocks, layers and r (the work per
block does not depend on which block it is); the table says "extrapolated".
The LNAMD step (reading the layer and normalising it) is timed in full for
one layer and counted len(r) * L times.

The ceiling is `adjax.bench.backbone.matmul_gflops`: the fastest of two
square float32 matmuls, measured in the same process right before and after
the timed blocks (their mean), so that load from other programs affects
both alike.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from adjax.bench import bank

CEILING_SIZES = (1024, 2048)


def ceiling_gflops() -> float:
  """The float32 matmul ceiling now: the fastest of CEILING_SIZES square matmuls."""
  import jax.numpy as jnp  # deferred: the measured worker loads it

  from adjax.bench import backbone as backbone_bench  # deferred: the measured worker loads it
  return max(backbone_bench.matmul_gflops(s, jnp.float32, 5) for s in CEILING_SIZES)


def run_one(spec: str, n: int, layers: int, r_list: tuple[int, ...], blocks: int,
            budget: float) -> dict:
  """One (case, N) in this process -> a result row."""
  import jax  # deferred: the measured worker loads it
  import jax.numpy as jnp  # deferred: the measured worker loads it

  from adjax import neighbors  # deferred: the measured worker loads it
  variant, size, side, dim = bank.case_shape(spec)
  p = side * side
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory(prefix="adjax_bench_neighbors_") as tmp:
    paths = []
    for l in range(layers):
      path = Path(tmp) / f"layer{l}.npy"
      arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                      shape=(n, side, side, dim))
      for s in range(0, n, 16):
        arr[s:s + 16] = rng.standard_normal((min(16, n - s), side, side, dim), np.float32)
      arr.flush()
      del arr
      paths.append(path)
    tokens = [np.load(path, mmap_mode="r") for path in paths]
    lo, hi = neighbors.rank_window(n, (0.0, 0.3))
    qb, kb = neighbors.block_sizes(p)
    qb = min(qb, n)
    n_pad = -(-n // kb) * kb
    q_blocks = -(-n // qb)
    flops_block = 2.0 * qb * n_pad * p * p * dim

    start = time.perf_counter()
    z = neighbors._features(tokens[0], r_list[-1], 32, None, kb)
    jax.block_until_ready(z)
    lnamd_s = time.perf_counter() - start
    # The query-block function compiled ahead (no block run untimed), then
    # `blocks` query blocks timed, with the matmul ceiling measured right
    # before and after them (the machine may be shared).
    keys, kid = neighbors._key_blocks(z, n, kb)
    fn = neighbors._scorer("mutual", lo, hi, jax.lax.Precision.HIGHEST, None)
    timed = max(1, min(blocks, n // qb))         # whole blocks only
    queries = [(z[s:s + qb], jnp.arange(s, s + qb, dtype=jnp.int32))
               for s in range(0, timed * qb, qb)]
    compiled = fn.lower(*queries[0], keys, kid).compile()
    ceiling = ceiling_gflops()
    start = time.perf_counter()
    for q, qid in queries:
      jax.block_until_ready(compiled(q, qid, keys, kid))
    block_s = (time.perf_counter() - start) / timed
    ceiling = 0.5 * (ceiling + ceiling_gflops())
    del z, keys, queries
    runs = layers * len(r_list)
    estimate = runs * (lnamd_s + q_blocks * block_s)
    measured = estimate <= budget
    if measured:
      start = time.perf_counter()
      maps = neighbors.mutual_maps(tokens, r_list)
      total_s = time.perf_counter() - start
      assert np.all(np.isfinite(maps)) and maps.shape == (n, side, side)
    else:
      total_s = estimate
  return dict(case=spec, variant=variant, size=size, patches=p, dim=dim, n=n,
              layers=layers, r=list(r_list), measured=measured, total_s=total_s,
              images_per_s=n / total_s, block_gflops=flops_block / block_s / 1e9,
              lnamd_s=lnamd_s, blocks_timed=timed, query_blocks=q_blocks, ceiling=ceiling,
              peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              device=str(jax.devices()[0].device_kind), devices=jax.device_count(),
              blocks=[qb, kb])


def _cpu_name() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown CPU"


def _avx512() -> bool:
  try:
    return " avx512f" in Path("/proc/cpuinfo").read_text()
  except OSError:
    return False


def _subprocess(args: list[str]) -> dict | None:
  """One benchmark row in a process of its own (its own peak memory)."""
  cmd = [sys.executable, "-m", "adjax.bench", "neighbors"] + args
  proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
  if proc.returncode:
    print(proc.stderr[-3000:], file=sys.stderr)
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m adjax.bench neighbors",
                              description=__doc__.split("\n")[0])
  p.add_argument("--cases", default="vits16@224,vitl16@512")
  p.add_argument("--n", default="100,500", help="batch sizes (images scored together)")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--r", default="1,3,5", help="LNAMD neighbourhood sizes")
  p.add_argument("--blocks", type=int, default=3,
                 help="query blocks timed when the full run is extrapolated")
  p.add_argument("--budget", type=float, default=120.0,
                 help="run the whole mutual_maps when estimated below this many seconds")
  p.add_argument("--parts", default="mutual",
                 help="mutual (MuSc scoring), coreset (selection against anomalib's "
                      "algorithm), subsets (batch scoring in subsets), scoring (few-shot "
                      "scoring time against the bank size): see adjax/bench/bank.py")
  p.add_argument("--coreset", default="100000:384,100000:1024", help="N:D cases")
  p.add_argument("--fraction", type=float, default=0.1, help="coreset fraction")
  p.add_argument("--steps", type=int, default=500,
                 help="coreset steps timed when a whole selection is over --budget")
  p.add_argument("--subset-n", default="1000,5000", help="images scored in subsets")
  p.add_argument("--subset", type=int, default=50, help="eval.batch_subset")
  p.add_argument("--subsets-timed", type=int, default=3)
  p.add_argument("--bank-cases", default="vits16@224:1960,vits16@224:19600,"
                 "vits16@224:78400,vitl16@512:1024,vitl16@512:10240,vitl16@512:40960",
                 help="scoring: variant@size:K, K bank patches per layer and r")
  p.add_argument("--bank-queries", type=int, default=8, help="scoring: images scored")
  p.add_argument("--bank-r", default="1", help="scoring: r_list")
  p.add_argument("--one", default="", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  r_list = tuple(int(r) for r in a.r.split(",") if r)
  if a.one:
    kind, _, what = a.one.partition("=")
    if kind == "coreset":
      n, d = what.split(":")
      row = bank.run_coreset(int(n), int(d), a.fraction, a.steps, a.budget)
    elif kind == "subsets":
      row = bank.run_subsets(int(what), a.subset, a.subsets_timed)
    elif kind == "scoring":
      spec, k = what.rsplit(":", 1)
      row = bank.run_scoring(spec, int(k), a.bank_queries, a.layers,
                             tuple(int(r) for r in a.bank_r.split(",") if r))
    else:
      spec, n = a.one.split(":")
      row = run_one(spec, int(n), a.layers, r_list, a.blocks, a.budget)
    print(json.dumps(row))
    return 0
  import jax  # deferred: the measured worker loads it
  parts = [x for x in a.parts.split(",") if x]
  print(f"machine: {os.cpu_count()} CPU cores, {_cpu_name()}, "
        f"AVX-512 {'yes' if _avx512() else 'no'}; device: {jax.devices()[0].platform} "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}", flush=True)
  common = ["--budget", str(a.budget), "--fraction", str(a.fraction), "--steps", str(a.steps),
            "--subset", str(a.subset), "--subsets-timed", str(a.subsets_timed),
            "--bank-queries", str(a.bank_queries), "--bank-r", a.bank_r,
            "--layers", str(a.layers)]
  if {"coreset", "subsets", "scoring"} & set(parts):
    found = {"coreset": [], "subsets": [], "scoring": []}
    for part, cases in (("coreset", a.coreset), ("subsets", a.subset_n),
                        ("scoring", a.bank_cases)):
      if part not in parts:
        continue
      for case in [c for c in cases.split(",") if c]:
        row = _subprocess(["--one", f"{part}={case}"] + common)
        if row is None:
          return 1
        found[part].append(row)
        print(f"{part} {case}: done", flush=True)
    if found["coreset"]:
      bank.print_coreset(found["coreset"], a.fraction)
    if found["subsets"]:
      bank.print_subsets(found["subsets"])
    if found["scoring"]:
      bank.print_scoring(found["scoring"])
  if "mutual" not in parts:
    return 0
  rows = []
  for spec in [c for c in a.cases.split(",") if c]:
    for n in [int(x) for x in a.n.split(",") if x]:
      cmd = [sys.executable, "-m", "adjax.bench", "neighbors", "--one", f"{spec}:{n}",
             "--layers", str(a.layers), "--r", a.r, "--blocks", str(a.blocks),
             "--budget", str(a.budget)]
      proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
      if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
      rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
      r = rows[-1]
      print(f"{spec} N={n}: {r['images_per_s']:.2f} images/s "
            f"({'measured' if r['measured'] else 'extrapolated'}), "
            f"{r['block_gflops']:.1f} GFLOP/s in the distance blocks, "
            f"peak {r['peak_rss_gb']:.2f} GB", flush=True)
  print(f"\ndevice: {jax.devices()[0].platform} x{jax.device_count()}; ceiling: float32 "
        f"matmul (fastest of {CEILING_SIZES} square), the mean of right before and "
        "after the timed blocks")
  print(f"{'case':12s} {'N':>4s} {'L':>2s} {'r':>6s} {'images/s':>9s} {'total s':>9s} "
        f"{'GFLOP/s':>8s} {'ceiling':>8s} {'of ceiling':>10s} {'peak GB':>8s}  how")
  for r in rows:
    print(f"{r['case']:12s} {r['n']:4d} {r['layers']:2d} {','.join(map(str, r['r'])):>6s} "
          f"{r['images_per_s']:9.3f} {r['total_s']:9.1f} {r['block_gflops']:8.1f} "
          f"{r['ceiling']:8.1f} {r['block_gflops'] / r['ceiling']:10.1%} "
          f"{r['peak_rss_gb']:8.2f}  "
          + ("measured" if r["measured"] else
             f"extrapolated from {r['blocks_timed']} of {r['query_blocks']} query blocks"))
  return 0
