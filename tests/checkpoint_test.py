"""Checkpoints are checked on restore: a damaged newest step is reported in
one line and the newest intact one is used; none intact is one line naming
the folder."""

from pathlib import Path

import jax
import numpy as np
import pytest

from adjax.workdir import checkpoints


def _state(seed):
  rng = np.random.default_rng(seed)
  return {"params": {"a": {"kernel": rng.normal(size=(64, 32)).astype(np.float32)},
                     "b": {"bias": rng.normal(size=(32,)).astype(np.float32)}},
          "opt_state": {"mu": rng.normal(size=(64, 32)).astype(np.float32)},
          "step": np.asarray(seed, np.int32)}


def _abstract(state):
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), state)


def _save(workdir, steps=(1, 2)):
  ck = checkpoints.RunCheckpoints(workdir, keep=5)
  for s in steps:
    ck.save(s, _state(s), {"epoch": s}, {"k": s})
  ck.close()


def _data_files(workdir, step):
  """The checkpoint's array files (largest first), not its metadata."""
  root = workdir / "checkpoints" / str(step) / "state"
  files = [p for p in root.rglob("*") if p.is_file() and "metadata" not in p.name
           and not p.name.startswith("_")]
  return sorted(files, key=lambda p: -p.stat().st_size)


def _truncate(workdir, step):
  for f in _data_files(workdir, step)[:1]:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_bit(workdir, step, which):
  f = _data_files(workdir, step)[0]
  data = bytearray(f.read_bytes())
  pos = (len(data) * which) // 7 + 13
  data[pos] ^= 1 << (which % 8)
  f.write_bytes(bytes(data))


def _restore(workdir):
  ck = checkpoints.RunCheckpoints(workdir, keep=5)
  try:
    return ck.restore_newest(_abstract(_state(0)))
  finally:
    ck.close()


def _head(workdir):
  ck = checkpoints.RunCheckpoints(workdir, keep=5)
  try:
    return ck.restore_head(_abstract(_state(0)["params"]))
  finally:
    ck.close()


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_intact_restores_and_digest_recorded(tmp_path):
  _save(tmp_path)
  step, state, data = _restore(tmp_path)
  assert step == 2 and data == {"epoch": 2}
  _same(state, _state(2))
  digest = (tmp_path / "data_state" / "step_2" / checkpoints.DIGEST_FILE).read_text()
  assert checkpoints.state_digests(_state(2))["params"] in digest


@pytest.mark.parametrize("damage", ["truncate", "flip0", "flip3", "flip5"])
def test_damaged_newest_falls_back_to_previous(tmp_path, capsys, damage):
  _save(tmp_path)
  if damage == "truncate":
    _truncate(tmp_path, 2)
  else:
    _flip_bit(tmp_path, 2, int(damage[-1]))
  step, state, _ = _restore(tmp_path)
  err = capsys.readouterr().err
  assert step == 1, err
  _same(state, _state(1))
  assert "checkpoint step 2" in err and "damaged" in err and "using checkpoint step 1" in err
  assert all(len(line) < 600 for line in err.splitlines())
  params, step = _head(tmp_path)
  assert step == 1
  _same(params, _state(1)["params"])


def test_all_damaged_is_one_line_naming_the_folder(tmp_path):
  _save(tmp_path)
  _truncate(tmp_path, 1)
  _flip_bit(tmp_path, 2, 2)
  with pytest.raises(checkpoints.CheckpointDamagedError) as e:
    _restore(tmp_path)
  assert "\n" not in str(e.value) and str(tmp_path / "checkpoints") in str(e.value)
  with pytest.raises(checkpoints.CheckpointDamagedError):
    _head(tmp_path)


_SAVE_ON_16_DEVICES = """
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from adjax.workdir import checkpoints
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(3)
put = lambda x: jax.device_put(x, NamedSharding(mesh, P()))
state = {"params": {"a": {"kernel": put(rng.normal(size=(64, 32)).astype(np.float32))},
                    "b": {"bias": put(rng.normal(size=(32,)).astype(np.float32))}},
         "opt_state": {"mu": put(rng.normal(size=(64, 32)).astype(np.float32))},
         "step": np.asarray(3, np.int32)}
assert len(jax.devices()) == 16
ck = checkpoints.RunCheckpoints(__import__("pathlib").Path(sys.argv[1]), keep=5)
ck.save(3, state, {"epoch": 3}, {"k": 3})
ck.close()
"""


def test_head_trained_on_more_devices_loads_here(tmp_path):
  """A head saved from a 16-device run loads in a process with another device
  count (Orbax alone refuses a target-less restore on another layout)."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=16",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", _SAVE_ON_16_DEVICES, str(tmp_path)], env=env,
                 check=True, cwd=Path(__file__).resolve().parents[1])
  assert len(jax.devices()) < 16      # the tests run on 8 fake devices
  params, step = _head(tmp_path)
  assert step == 3
  want = _state(3)["params"]
  np.testing.assert_array_equal(np.asarray(params["a"]["kernel"]), want["a"]["kernel"])
  np.testing.assert_array_equal(np.asarray(params["b"]["bias"]), want["b"]["bias"])


def test_restore_prints_no_library_warning(tmp_path, capfd):
  """Orbax's `Metadata file does not exist: .../_CHECKPOINT_METADATA` on every
  restore is dropped (adjax.common.quiet); its other warnings are kept."""
  import logging
  _save(tmp_path, steps=(1,))
  records = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())
  handler = Keep(logging.WARNING)
  absl_logger = logging.getLogger("absl")
  absl_logger.addHandler(handler)
  try:
    ck = checkpoints.RunCheckpoints(tmp_path, keep=5)
    try:                  # the head's restore (evaluate, predict, export, the page)
      params, step = ck.restore_head(_abstract(_state(0))["params"])
    finally:
      ck.close()
    assert step == 1
    np.testing.assert_array_equal(params["b"]["bias"], _state(1)["params"]["b"]["bias"])
    from absl import logging as absl_logging
    absl_logging.warning("a warning of adjax's own stays")
  finally:
    absl_logger.removeHandler(handler)
  assert not [m for m in records if "Metadata file does not exist" in m], records
  assert "a warning of adjax's own stays" in records


def test_a_wait_is_announced_only_when_it_is_long(monkeypatch):
  """adjax.common.quiet.announce_if_slow: nothing for a quick block (a refusal
  stays one line), the line once for a block longer than the delay."""
  import io
  import time

  from adjax.common import quiet
  monkeypatch.setattr(quiet, "ANNOUNCE_AFTER_S", 0.2)
  out = io.StringIO()
  with quiet.announce_if_slow("loading x", stream=out):
    pass
  time.sleep(0.4)
  assert out.getvalue() == ""
  with quiet.announce_if_slow("loading y", stream=out):
    time.sleep(0.6)
  time.sleep(0.3)
  assert out.getvalue() == "loading y\n"
