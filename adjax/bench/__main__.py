"""python -m adjax.bench NAME [options]: runs `main(argv)` of adjax/bench/NAME.py.

Each benchmark is a module of this package with a `main(argv) -> int | None`;
adding one is a module plus a line in BENCHMARKS.
"""

import importlib
import sys

BENCHMARKS = {
    "backbone": "DINOv3 forward: images/s, GFLOP/s vs a matmul ceiling, compile time",
    "text": "CLIP text tower",
    "pipeline": "input pipeline throughput",
    "metrics": "evaluation metrics",
    "train": "train step",
    "heads": "evaluating N heads on one target, with and without the feature cache",
    "neighbors": "MuSc mutual scoring: images/s, GFLOP/s vs a matmul ceiling, peak memory",
    "serve": "the inspection server under load: uploads answered, latency, threads, stalled connections",
}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] not in BENCHMARKS:
    rows = "\n".join(f"  {k:10s} {v}" for k, v in BENCHMARKS.items())
    print(f"usage: python -m adjax.bench NAME [options]\n{rows}", file=sys.stderr)
    return 2
  try:
    module = importlib.import_module(f"adjax.bench.{argv[0]}")
  except ModuleNotFoundError as e:
    if e.name != f"adjax.bench.{argv[0]}":
      raise
    print(f"benchmark {argv[0]!r} is not part of this checkout", file=sys.stderr)
    return 2
  return module.main(argv[1:]) or 0


if __name__ == "__main__":
  sys.exit(main())
