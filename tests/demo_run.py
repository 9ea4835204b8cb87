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


def apply_overrides(c, overrides: dict):
  """Sets each dotted key of `overrides` ("eval.scoring": "batch") on `c`."""
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def small_config(data_root, tmp_dir, **overrides):
  c = demo_config()
  c.data.demo.root = ""
  c.data.train = str(data_root / "family_a")
  c.data.targets = str(data_root / "family_b")
  c.data.data_dir = str(tmp_dir / "tfds")
  c.text.cache_dir = str(tmp_dir / "text_cache")
  c.image_size = 64
  c.batch_size = 8             # the test process has 8 (fake) devices
  c.epochs = 2
  c.checkpoint_every_steps = 4
  c.eval.batch_size = 8
  c.eval.heatmaps_per_category = 1
  return apply_overrides(without_showcase(c), overrides)


# The same on the command line, after --config=configs/demo.py.
WITHOUT_SHOWCASE_FLAGS = ["--config.eval.compare=()", "--config.eval.references_dir=",
                          "--config.eval.references=4", "--config.predict.scoring=zero_shot",
                          "--config.predict.references="]


def without_showcase(c):
  """The demo config without its showcase (every mode after training,
  few_shot against the train split, few_shot predictions), which needs the
  full demo data: tests that want it ask for it."""
  c.eval.compare = ()
  c.eval.references_dir = ""
  c.eval.references = 4
  c.predict.scoring = "zero_shot"
  c.predict.references = ""
  return c


def train(tmp: Path) -> tuple[object, Path, Path]:
  """(config, workdir, data root): trains and evaluates a tiny demo run in `tmp`."""
  from adjax import experiment
  from adjax.data import synthetic
  data = tmp / "gen"
  synthetic.generate(data, image_size=64, per_category=4, seed=1)
  c = small_config(data, tmp, **{
      "epochs": 1, "checkpoint_every_steps": 100, "eval.heatmaps_per_category": 0,
      # a few small steps: maps stay far from 0 and 1
      "optimizer.learning_rate": 1e-5})
  with contextlib.redirect_stdout(io.StringIO()):
    experiment.run(c, str(tmp / "work"))
  return c, tmp / "work", data
