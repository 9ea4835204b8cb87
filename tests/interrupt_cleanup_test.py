"""Converters and data preparation leave nothing behind when interrupted.

Each case runs the real entry point in a subprocess, pauses it once its
temporaries exist, and ends it with SIGINT (Ctrl-C), SIGTERM or SIGKILL.
SIGINT and SIGTERM must leave nothing; a SIGKILLed run's leftovers must be
removed by the next run, which then succeeds.
"""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adjax import data

ROOT = Path(__file__).resolve().parents[1]

_CONVERT = """
import sys, time
import orbax.checkpoint as ocp
from converters import dinov3

def paused(self, *a, **k):
  print("READY", flush=True)
  while True:           # until the test's signal, however loaded the machine
    time.sleep(0.05)   # short: a signal taken by another thread runs its handler here
ocp.StandardCheckpointer.save = paused
sys.exit(dinov3.main(["--src", sys.argv[1], "--dst", sys.argv[2]]))
"""

_PREPARE = """
import sys, time
from adjax import data
from adjax.data import builders

real, seen = builders._encode_record, []
def paused(record):
  seen.append(record)
  if len(seen) == 2:  # TFDS's incomplete.* folder exists by now
    print("READY", flush=True)
    while True:         # until the test's signal, however loaded the machine
      time.sleep(0.05)   # short: a signal taken by another thread runs its handler here
  return real(record)
builders._encode_record = paused
data.prepare("folder", manual_dir=sys.argv[1], data_dir=sys.argv[2])
"""


# Only a hung child hits these; a loaded machine (imports of JAX and torch
# taking minutes) does not: the test waits for the child's READY marker, not
# for a fixed start-up time, and the child waits for the signal.
HUNG_S = 900


def _run_until_paused(code, *args):
  import threading
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  watchdog = threading.Timer(HUNG_S, p.kill)
  watchdog.start()
  try:
    for line in p.stdout:
      if line.strip() == "READY":
        return p
  finally:
    watchdog.cancel()
  p.wait()
  raise AssertionError(f"child ended before pausing: {p.stderr.read()[-2000:]}")


def _end(p, sig):
  p.send_signal(sig)
  _, err = p.communicate(timeout=HUNG_S)
  expected = {signal.SIGINT: -signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM,
              signal.SIGKILL: -signal.SIGKILL}[sig]
  assert p.returncode in (expected, 130), err[-2000:]
  return err


def _everything(root: Path):
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def dinov3_source(tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.DINOv3ViTConfig(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_register_tokens=4)
  torch.manual_seed(0)
  src = tmp_path_factory.mktemp("dinov3") / "hf"
  transformers.DINOv3ViTModel(config).save_pretrained(src)
  return src


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_converter_interrupted_leaves_nothing(dinov3_source, tmp_path, sig):
  out = tmp_path / "out"
  out.mkdir()
  p = _run_until_paused(_CONVERT, dinov3_source, out / "converted")
  assert [n for n in os.listdir(out) if n.startswith(".converted.tmp-")]
  _end(p, sig)
  assert _everything(out) == []


def test_converter_killed_leftovers_removed_by_next_run(dinov3_source, tmp_path, caplog):
  from converters import dinov3
  out = tmp_path / "out"
  out.mkdir()
  _end(_run_until_paused(_CONVERT, dinov3_source, out / "converted"), signal.SIGKILL)
  (leftover,) = os.listdir(out)
  assert leftover.startswith(".converted.tmp-")
  with caplog.at_level(logging.WARNING, logger="adjax.common.atomic"):
    assert dinov3.main(["--src", str(dinov3_source), "--dst", str(out / "converted")]) == 0
  assert os.listdir(out) == ["converted"]
  assert [r for r in caplog.records if leftover in r.getMessage()
          and "no longer running" in r.getMessage()]


def _raw_folder(root: Path) -> Path:
  rng = np.random.default_rng(0)
  for kind in ("good", "broken"):
    for i in range(3):
      p = root / "bottle" / "test" / kind / f"{i:03d}.png"
      p.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(p)
  for i in range(3):
    p = root / "bottle" / "ground_truth" / "broken" / f"{i:03d}_mask.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(p)
  return root


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_preparation_interrupted_leaves_nothing(tmp_path, sig):
  raw, data_dir = _raw_folder(tmp_path / "raw"), tmp_path / "prepared"
  p = _run_until_paused(_PREPARE, raw, data_dir)
  during = _everything(data_dir)
  assert any("incomplete." in n for n in during), during
  assert any("/.1.0.0.tmp-" in n for n in during), during
  _end(p, sig)
  assert _everything(data_dir) == []


def test_preparation_killed_leftovers_removed_by_next_run(tmp_path, caplog):
  raw, data_dir = _raw_folder(tmp_path / "raw"), tmp_path / "prepared"
  _end(_run_until_paused(_PREPARE, raw, data_dir), signal.SIGKILL)
  left = [n for n in _everything(data_dir) if "incomplete." in n or ".tmp-" in n]
  assert left
  with caplog.at_level(logging.WARNING):
    handle = data.prepare("folder", manual_dir=raw, data_dir=data_dir)
  assert handle.num_examples == 6
  assert not [n for n in _everything(data_dir) if "incomplete." in n or ".tmp-" in n]
  messages = " ".join(r.getMessage() for r in caplog.records)
  assert "interrupted preparation" in messages and "no longer running" in messages


def test_preparation_refused_while_another_run_prepares(tmp_path):
  raw, data_dir = _raw_folder(tmp_path / "raw"), tmp_path / "prepared"
  p = _run_until_paused(_PREPARE, raw, data_dir)
  try:
    with pytest.raises(data.DataError, match=rf"being prepared by process {p.pid}"):
      data.prepare("folder", manual_dir=raw, data_dir=data_dir)
    assert any("incomplete." in n for n in _everything(data_dir))  # the live one is kept
  finally:
    _end(p, signal.SIGTERM)
  assert _everything(data_dir) == []
