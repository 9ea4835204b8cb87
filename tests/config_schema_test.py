"""The typed run config: declared once, equal to the user's ConfigDict, frozen,
and the only form of the config below the commands."""

import ast
import contextlib
import dataclasses
import importlib.util
import io
import json
import sys
from pathlib import Path

import ml_collections
import pytest

from adjax.config import check as config_check
from adjax.config import defaults, schema
from adjax.workdir import identity

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
import demo_run  # noqa: E402

CONFIGS = [("demo", None), ("mvtec", None), ("visa", None)] + [
    ("mvtec", v) for v in defaults.VARIANTS] + [("mvtec", "dinov2+gpu8")]


def _load(name, arg):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_every_config_file_resolves_to_the_same_fields_and_files(name, arg):
  """Fails if a declared field and the ConfigDict differ (a field missing on
  either side, another default or order), i.e. if config.json or
  run_identity.json would change when written from the resolved config."""
  cfg = _load(name, arg)
  run = schema.from_configdict(cfg)
  assert run.to_json(indent=2) == cfg.to_json_best_effort(indent=2)
  # Key order too: the results files store these dicts as they come.
  for fields in (identity.flatten, identity.training_fields, identity.model_fields):
    assert list(fields(run).items()) == list(fields(cfg).items())


def test_base_config_is_the_declarations():
  declared = {name for name, _ in schema.declared()}
  flat = set(identity.flatten(defaults.base_config()))
  mappings = {n for n, f in schema.declared() if f.metadata.get("mapping")}
  assert {n for n in flat if not any(n.startswith(m + ".") for m in mappings)} == (
      declared - mappings)
  assert schema.from_configdict(defaults.base_config()) == schema.RunConfig()


def test_every_field_has_a_meaning_and_the_reference_shows_bounds():
  from adjax.config import doc
  missing = [n for n, f in schema.declared() if not f.metadata["doc"].strip()]
  assert not missing
  docs = doc.field_docs()
  assert "one of: float32 | bfloat16" in docs["backbone.dtype"]
  assert "an integer >= 1" in docs["epochs"]


@pytest.mark.parametrize("name,f", [(n, f) for n, f in schema.declared()
                                    if f.metadata.get("choices") or
                                    f.metadata.get("minimum") is not None])
def test_every_declared_bound_is_checked(name, f):
  """Fails if the config check stops enforcing a bound declared with a field."""
  cfg = defaults.base_config()
  bad = "no-such-choice" if f.metadata.get("choices") else f.metadata["minimum"] - 1
  demo_run.apply_overrides(cfg, {name: bad})
  assert any(p.startswith(f"{name}=") for p in config_check.problems(cfg)), name


def test_resolved_config_is_frozen_and_variants_are_replacements():
  run = schema.RunConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.image_size = 3
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.eval.scoring = "batch"
  with pytest.raises(TypeError):
    run.data.manual_dirs["visa"] = "elsewhere"
  other = schema.replace(run, **{"eval.scoring": "batch", "image_size": 224})
  assert (other.eval.scoring, other.image_size) == ("batch", 224)
  assert (run.eval.scoring, run.image_size) == ("zero_shot", 512)
  assert other.eval.r_list == run.eval.r_list


def test_resolve_lists_every_problem_before_freezing():
  cfg = defaults.base_config()
  cfg.epochs = 0
  cfg.backbone.dtype = "float16"
  with pytest.raises(config_check.ConfigError) as e:
    config_check.resolve(cfg)
  assert "epochs=0" in str(e.value) and "backbone.dtype='float16'" in str(e.value)


# ---- below the commands, nothing touches the ConfigDict -----------------------
ENTRY_POINTS = ("adjax/config/", "adjax/main.py")
CONFIGDICT_ONLY = {"to_json_best_effort", "copy_and_resolve_references", "unlocked",
                   "ignore_type", "get_ref"}


def _sources():
  for path in sorted((ROOT / "adjax").rglob("*.py")):
    rel = path.relative_to(ROOT).as_posix()
    if not rel.startswith(ENTRY_POINTS):
      yield rel, ast.parse(path.read_text())


def test_no_module_below_the_commands_uses_the_configdict_api():
  """Static half: no ml_collections import and no ConfigDict-only method
  outside adjax/config/ and adjax/main.py."""
  found = []
  for rel, tree in _sources():
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        if any(n.split(".")[0] == "ml_collections" for n in names):
          found.append(f"{rel}:{node.lineno}: imports ml_collections")
      if isinstance(node, ast.Attribute) and node.attr in CONFIGDICT_ONLY:
        found.append(f"{rel}:{node.lineno}: .{node.attr}")
  assert not found, "\n".join(found)


@contextlib.contextmanager
def configdict_reads():
  """Records each place outside the entry points that reads a ConfigDict."""
  sites: set[str] = set()
  cls = ml_collections.ConfigDict
  patched = {}

  def note():
    frame = sys._getframe(2)
    while frame is not None and "ml_collections" in frame.f_code.co_filename:
      frame = frame.f_back
    if frame is None:
      return
    path = Path(frame.f_code.co_filename).resolve()
    if path.is_relative_to(ROOT / "adjax"):
      rel = path.relative_to(ROOT).as_posix()
      if not rel.startswith(ENTRY_POINTS):
        sites.add(f"{rel}:{frame.f_lineno}")

  def wrap(name):
    original = getattr(cls, name)
    patched[name] = original

    def reader(self, *args, **kwargs):
      note()
      return original(self, *args, **kwargs)
    return reader

  for name in ("__getattr__", "__getitem__", "__contains__", "get", "items", "keys",
               "values", "to_dict"):
    setattr(cls, name, wrap(name))
  try:
    yield sites
  finally:
    for name, original in patched.items():
      setattr(cls, name, original)


def test_the_read_monitor_sees_a_raw_read():
  """The monitor below is not blind: a read from an adjax module is caught."""
  from adjax import fetch
  cfg = defaults.base_config()
  cfg.backbone.random_init = cfg.text.random_init = True
  with configdict_reads() as sites:
    fetch.ensure_weights(cfg)              # reads backbone.random_init, text.random_init
  assert any(s.startswith("adjax/fetch/__init__.py") for s in sites), sites


@pytest.mark.slow
def test_a_whole_run_reads_only_the_resolved_config(tmp_path):
  """Dynamic half: train, evaluate (every mode), predict, the Detector and
  export read the ConfigDict only in the entry points."""
  from adjax import experiment, export
  from adjax.data import synthetic
  from adjax.detector import Detector
  data = tmp_path / "gen"
  synthetic.generate(data, image_size=64, per_category=6, seed=1)
  base = demo_run.small_config(data, tmp_path, **{
      "epochs": 1, "checkpoint_every_steps": 100, "eval.heatmaps_per_category": 1})
  work = str(tmp_path / "work")
  images = sorted((data / "family_b").rglob("*.png"))
  with configdict_reads() as sites, contextlib.redirect_stdout(io.StringIO()):
    experiment.run(base, work)
    for scoring in ("few_shot", "batch"):
      c = base.copy_and_resolve_references()
      demo_run.apply_overrides(c, {"mode": "evaluate", "eval.scoring": scoring,
                                   "eval.references": 1})
      experiment.run(c, work)
    c = base.copy_and_resolve_references()
    demo_run.apply_overrides(c, {"mode": "predict", "predict.input": str(data / "family_b"),
                                 "predict.object_name": "chip"})
    experiment.run(c, work)
    det = Detector.from_workdir(work)
    det.predict([str(p) for p in images[:2]], object_name="chip")
    export.build(work, ["chip"])
  assert not sites, "ConfigDict read below the commands:\n" + "\n".join(sorted(sites))
