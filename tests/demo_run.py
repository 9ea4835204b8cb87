"""A small trained demo workdir shared by the Detector and page tests.

The demo config (random ViT-S/16 and tiny text towers) trained for one epoch
on a few generated 64 px images, then evaluated on the other family, which
writes thresholds.json with per-category thresholds.
"""

import contextlib
import importlib.util
import io
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo_config():
  spec = importlib.util.spec_from_file_location("demo_cfg", ROOT / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def train(tmp: Path) -> tuple[object, Path, Path]:
  """(config, workdir, data root): trains and evaluates a tiny demo run in `tmp`."""
  from adjax import experiment
  from adjax.data import synthetic
  data = tmp / "gen"
  synthetic.generate(data, image_size=64, per_category=4, seed=1)
  c = demo_config()
  c.data.demo.root = ""
  c.data.train = str(data / "family_a")
  c.data.targets = str(data / "family_b")
  c.data.data_dir = str(tmp / "tfds")
  c.text.cache_dir = str(tmp / "text_cache")
  c.image_size = 64
  c.batch_size = 8
  c.epochs = 1
  c.optimizer.learning_rate = 1e-5   # a few small steps: maps stay far from 0 and 1
  c.eval.batch_size = 8
  c.eval.heatmaps_per_category = 0
  with contextlib.redirect_stdout(io.StringIO()):
    experiment.run(c, str(tmp / "work"))
  return c, tmp / "work", data
