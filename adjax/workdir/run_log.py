"""Run logging: metrics.jsonl, TensorBoard scalars, and a progress bar.

Only process 0 writes, so a multi-host run logs once.

A resumed run logs again the steps that came after its checkpoint; so that
metrics.jsonl holds each step once, `RunLog` first drops the lines past the
step it resumes from (`truncate_metrics`, an atomic rewrite).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax

from adjax.common import atomic
from adjax.workdir import Workdir


def truncate_metrics(path: str | Path, step: int) -> int:
  """Keeps the lines of `path` (metrics.jsonl) with "step" <= `step`.

  Call it with the step a run resumes from (0 for a fresh start) before
  appending. Lines after that step, and a torn last line (a run killed
  mid-write), are dropped; the file is rewritten atomically, and only when
  something is dropped. Returns the number of lines dropped.
  """
  path = Path(path)
  try:
    lines = path.read_text().splitlines(keepends=True)
  except FileNotFoundError:
    return 0
  keep = []
  for line in lines:
    try:
      record = json.loads(line)
      logged = int(record["step"])
    except (ValueError, TypeError, KeyError):
      continue
    if logged <= step:
      keep.append(line if line.endswith("\n") else line + "\n")
  dropped = len(lines) - len(keep)
  if keep != lines:  # also a kept last line that lacks its newline
    atomic.write_text(path, "".join(keep))
  return dropped


class RunLog:

  def __init__(self, workdir: Path, total_steps: int, initial_step: int,
               images_per_step: int, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.images_per_step = images_per_step
    # Rates and ETAs are measured from the end of the first step, so the
    # compilation in it does not skew them.
    self._t0, self._step0 = None, initial_step
    self._jsonl = self._tb = self._bar = None
    if not self.enabled:
      return
    run = Workdir(workdir)
    run.root.mkdir(parents=True, exist_ok=True)
    truncate_metrics(run.metrics, initial_step)
    self._jsonl = open(run.metrics, "a")
    try:
      from tensorboardX import SummaryWriter  # deferred: optional package
      self._tb = SummaryWriter(str(run.tensorboard))
    except ImportError:  # optional: metrics.jsonl still has everything
      self._tb = None
    self.total_steps = total_steps
    if sys.stderr.isatty():
      from tqdm import tqdm  # deferred: optional package
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                       dynamic_ncols=True, desc="train")

  def step(self, step: int, metrics: dict[str, float], write: bool) -> None:
    if not self.enabled:
      return
    now = time.perf_counter()
    if self._t0 is None:
      self._t0, self._step0 = now, step
    done = step - self._step0
    elapsed = now - self._t0
    ips = done * self.images_per_step / elapsed if done and elapsed > 0 else float("nan")
    if self._bar is not None:
      self._bar.update(1)
      self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{ips:.1f}")
    elif write:  # not a terminal (a log file): one line per logged step
      eta = (f"eta {(self.total_steps - step) * elapsed / done / 60:.1f} min" if done
             else "eta after the next step (this one compiled)")
      print(f"train step {step}/{self.total_steps}  loss {metrics['loss']:.4f}  "
            f"{ips:.1f} img/s  {eta}", flush=True)
    if write:
      record = {"step": step, "images_per_s": ips if math.isfinite(ips) else None,
                **metrics}
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
      if self._tb is not None:
        for k, v in record.items():
          if k != "step" and v is not None and math.isfinite(v):
            self._tb.add_scalar(f"train/{k}", v, step)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Progress of one pass over `total` images (evaluation, prediction).

  A bar on a terminal; otherwise a line about every `every_s` seconds and at
  the end, with images/s and an ETA measured after the first batch (which
  compiles).
  """

  def __init__(self, label: str, total: int, enabled: bool = True, every_s: float = 10.0):
    self.label, self.total, self.enabled, self.every_s = label, total, enabled, every_s
    self.done = 0
    self._t0 = self._first = self._last = None
    self._bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm  # deferred: optional package
      self._bar = tqdm(total=total, unit="img", dynamic_ncols=True, desc=label)

  def update(self, n: int) -> None:
    if not self.enabled:
      return
    now = time.perf_counter()
    self.done += n
    if self._t0 is None:
      self._t0, self._first, self._last = now, self.done, now
    if self._bar is not None:
      self._bar.update(n)
      return
    if now - self._last >= self.every_s or self.done >= self.total:
      self._last = now
      print(f"{self.label}: {self.done}/{self.total} images  {self._rate(now)}", flush=True)

  def _rate(self, now: float) -> str:
    n, dt = self.done - self._first, now - self._t0
    if n <= 0 or dt <= 0:
      return "(first batch, compiling)"
    ips = n / dt
    return f"{ips:.1f} img/s  eta {(self.total - self.done) / ips / 60:.1f} min"

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
