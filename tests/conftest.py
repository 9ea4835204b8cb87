"""Test set-up: 8 fake CPU devices for sharding tests, float32 matmuls."""
import os

# Must happen before JAX is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# A shell running the suite in the background starts it with Ctrl-C ignored,
# and its children (the interruption tests') would inherit that and never see
# the SIGINT they are sent: give the children Ctrl-C back.
import signal  # noqa: E402
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory):
  """(config, workdir, data root) of a tiny trained demo run (tests/demo_run.py)."""
  import demo_run
  return demo_run.train(tmp_path_factory.mktemp("demo_run"))
