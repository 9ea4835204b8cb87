"""Load on the inspection server over the loopback address.

    python -m adjax.bench serve [--requests 200] [--concurrency 16] [--stalled 50]
                                [--workdir W] [--timeout 10]

Opens `--stalled` connections that send part of a request and then nothing
(half of them stop in the headers, half in the body), then sends
`--requests` image uploads (`POST /predict`, few_shot) from `--concurrency`
client threads, and prints: how many were answered and with which status,
latency percentiles, the server's peak thread count against its bound
(--max-connections), and when and how the stalled connections ended.

Without --workdir the model is the demo's random ViT-S/16 at 32 px with no
head (few_shot against two generated references), so the figures measure the
server, not the backbone.
"""

from __future__ import annotations

import argparse
import io
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
import jax
from adjax import Detector
from adjax.config import load as config_load
from adjax.config import schema
from adjax.workdir import Workdir
from adjax import serve


def _png(seed: int) -> bytes:
  a = np.random.RandomState(seed).randint(0, 256, (48, 40, 3)).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


def tiny_detector(workdir: str | None = None):
  """A Detector for few_shot: the given workdir's, or a head-free 32 px demo one."""


  if workdir is None:
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.py"
    run = schema.from_configdict(config_load.from_file(
        str(demo), ["image_size=32", f"predict.batch_size={jax.device_count()}"]))
    workdir = tempfile.mkdtemp(prefix="bench_serve_")
    Workdir(workdir).config.write_text(run.to_json(indent=2))
  det = Detector.from_workdir(workdir, predict__scoring="few_shot", text__random_init=False,
                              text__checkpoint="/nonexistent/text")
  det.use_references([np.asarray(Image.open(io.BytesIO(_png(s)))) for s in (1, 2)])
  return det


def run(detector, *, requests: int = 200, concurrency: int = 16, stalled: int = 50,
        timeout: float = 10.0, max_connections: int | None = None) -> dict:
  """The load; returns the figures (see the module doc)."""
  lines: list[str] = []
  max_connections = max_connections or serve.DEFAULT_MAX_CONNECTIONS
  server = serve.make_server(detector, "127.0.0.1", 0, timeout=timeout,
                             max_connections=max_connections, log=lines.append)
  port = server.server_address[1]
  base_threads = threading.active_count()
  serving = threading.Thread(target=server.serve_forever, daemon=True)
  serving.start()
  peak = [0]
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], threading.active_count())
      time.sleep(0.01)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  # The stalled connections: part of a request, then silence.
  held, stall_start = [], time.monotonic()
  for i in range(stalled):
    s = socket.create_connection(("127.0.0.1", port))
    if i % 2:
      s.sendall(b"POST /predict?mode=few_shot HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                b"Content-Length: 5000\r\n\r\nabc" % port)
    else:
      s.sendall(b"GET /info HTTP/1.1\r\nHost: 127.0.0.1")
    held.append(s)
  bodies = [_png(s) for s in range(8)]
  url = f"http://127.0.0.1:{port}/predict?mode=few_shot"
  statuses: dict[int, int] = {}
  latencies: list[float] = []
  lock = threading.Lock()
  next_i = [0]

  def client():
    while True:
      with lock:
        i = next_i[0]
        next_i[0] += 1
      if i >= requests:
        return
      start = time.perf_counter()
      req = urllib.request.Request(url, data=bodies[i % len(bodies)])
      try:
        with urllib.request.urlopen(req, timeout=120) as res:
          res.read()
          code = res.status
      except urllib.error.HTTPError as e:
        code = e.code
      except OSError:
        code = 0                     # no answer at all
      with lock:
        statuses[code] = statuses.get(code, 0) + 1
        latencies.append(time.perf_counter() - start)

  load_start = time.perf_counter()
  clients = [threading.Thread(target=client) for _ in range(concurrency)]
  for t in clients:
    t.start()
  for t in clients:
    t.join()
  load_seconds = time.perf_counter() - load_start
  # How the stalled connections end.
  ended: dict[str, int] = {}
  last_end = 0.0
  for s in held:
    s.settimeout(6 * timeout + 5)
    try:
      data = s.recv(4096)
      what = data.split(b"\r\n", 1)[0].decode("latin-1") if data else "closed"
    except OSError as e:
      what = type(e).__name__
    last_end = max(last_end, time.monotonic() - stall_start)
    ended[what] = ended.get(what, 0) + 1
    s.close()
  time.sleep(0.2)
  done.set()
  sampler.join()
  server.shutdown()
  server.server_close()
  lat = np.array(latencies) * 1000
  return {
      "requests": requests, "concurrency": concurrency, "stalled": stalled,
      "statuses": statuses, "seconds": load_seconds,
      "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
      "max_ms": float(lat.max()),
      # server threads: all threads at the peak less this process's others
      # (the client threads and the sampler; the serving loop and the
      # Detector's decode pool counted in)
      "peak_server_threads": peak[0] - base_threads - concurrency - 1,
      "max_connections": max_connections,
      "stalled_ended": ended, "stalled_last_end_s": last_end, "console_lines": len(lines),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m adjax.bench serve", description=__doc__)
  p.add_argument("--requests", type=int, default=200)
  p.add_argument("--concurrency", type=int, default=16)
  p.add_argument("--stalled", type=int, default=50)
  p.add_argument("--timeout", type=float, default=10.0)
  p.add_argument("--max-connections", type=int, default=None)
  p.add_argument("--workdir", default=None)
  args = p.parse_args(argv)
  det = tiny_detector(args.workdir)
  r = run(det, requests=args.requests, concurrency=args.concurrency, stalled=args.stalled,
          timeout=args.timeout, max_connections=args.max_connections)
  print(f"{r['requests']} uploads, {r['concurrency']} at a time, beside {r['stalled']} "
        f"stalled connections: statuses {r['statuses']} in {r['seconds']:.1f} s")
  print(f"latency p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, max {r['max_ms']:.0f} ms")
  print(f"server threads at the peak: {r['peak_server_threads']} (bound: "
        f"{r['max_connections']} connections, the serving loop and the Detector's "
        "4 decode threads)")
  print(f"stalled connections ended: {r['stalled_ended']}, the last after "
        f"{r['stalled_last_end_s']:.1f} s (--timeout {args.timeout:g}); "
        f"{r['console_lines']} console lines")
  return 0
