"""`adjax.workdir.Workdir` names a run folder's parts, and is the only module
that does: the names below are the on-disk layout runs, the docs and
earlier run folders rely on, so they are spelt out here."""

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adjax.workdir import Workdir

REPO = Path(__file__).resolve().parent.parent


def test_every_part_is_where_the_layout_says(tmp_path):
  run = Workdir(tmp_path / "run")
  layout = {
      "config": "config.json", "run_identity": "run_identity.json",
      "imported_from": "imported_from.json", "thresholds": "thresholds.json",
      "metrics": "metrics.jsonl", "unreadable": "unreadable.txt", "lock": ".adjax.lock",
      "checkpoints": "checkpoints", "data_state": "data_state", "results": "results",
      "heatmaps": "heatmaps", "predictions": "predictions", "tensorboard": "tensorboard",
      "feature_cache": "feature_cache", "text_cache": "text_cache", "tokenizer": "tokenizer",
      "banks": "banks",
  }
  for part, name in layout.items():
    assert getattr(run, part) == tmp_path / "run" / name, part
  properties = {k for k, v in vars(Workdir).items() if isinstance(v, property)}
  assert properties == set(layout)          # a new part gets a line above
  assert run.mode_config("train") == run.config
  assert run.mode_config("evaluate") == tmp_path / "run" / "config_evaluate.json"
  assert run.mode_config("predict") == tmp_path / "run" / "config_predict.json"
  assert run.evaluation_thresholds("family_b@0123456789") == (
      tmp_path / "run" / "results" / "family_b@0123456789.thresholds.json")
  assert run.evaluation_page("family_b") == tmp_path / "run" / "results" / "family_b.html"
  assert run.evaluation_heatmaps("family_b") == tmp_path / "run" / "heatmaps" / "family_b"
  assert run.category_bank("family_b", "tile") == (
      tmp_path / "run" / "banks" / "family_b" / "tile.bank.npz")
  assert run.reference_bank("0123abcd") == tmp_path / "run" / "banks" / "0123abcd.bank.npz"
  for bad in (("", "tile"), ("family_b", "../x"), (".hidden", "tile")):
    with pytest.raises(ValueError):
      run.category_bank(*bad)
  assert not (tmp_path / "run").exists()    # naming creates nothing


def test_value_semantics():
  run = Workdir("runs/demo")
  assert run.root == Path("runs/demo") and isinstance(run.root, Path)
  assert run == Workdir(Path("runs/demo")) and hash(run) == hash(Workdir("runs/demo"))
  assert os.fspath(run) == os.fspath(Path("runs/demo"))
  assert Workdir(run) == run and Path(run) == Path("runs/demo")
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.root = Path("elsewhere")


def test_has_checkpoints_needs_a_numbered_step(tmp_path):
  run = Workdir(tmp_path)
  assert not run.has_checkpoints()                       # no checkpoints/
  run.checkpoints.mkdir()
  assert not run.has_checkpoints()                       # empty
  (run.checkpoints / "3.orbax-checkpoint-tmp-17").mkdir()   # an unfinished save
  (run.checkpoints / "notes.txt").write_text("x")
  assert not run.has_checkpoints()
  (run.checkpoints / "3").mkdir()
  assert run.has_checkpoints()


def test_has_checkpoints_on_a_saved_run(tmp_path):
  """What adjax.workdir.checkpoints writes is where Workdir looks for it."""
  from adjax.workdir import checkpoints
  state = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
           "opt_state": {"mu": np.zeros((2, 3), np.float32)}, "step": np.asarray(2, np.int32)}
  run = Workdir(tmp_path / "run")
  ck = checkpoints.RunCheckpoints(run, keep=2)
  assert ck.dir == run.checkpoints.absolute() and ck.data_dir == run.data_state.absolute()
  assert not run.has_checkpoints()
  ck.save(2, state, {"epoch": 0}, {"k": 1})
  ck.close()
  assert run.has_checkpoints() and (run.checkpoints / "2").is_dir()
  assert (run.data_state / "step_2").is_dir()
  assert not Workdir(tmp_path / "other").has_checkpoints()


def test_results_complete_needs_a_results_json(tmp_path):
  run = Workdir(tmp_path)
  assert not run.results_complete()
  run.results.mkdir()
  (run.results / "family_b.md").write_text("| x |")
  (run.results / "family_b.csv").write_text("x")
  assert not run.results_complete()
  (run.results / "family_b.json").write_text("{}")
  assert run.results_complete()


def test_the_owners_of_parts_use_it(tmp_path):
  """The modules that own a part's contents read and write it at Workdir's path."""
  import ml_collections
  from adjax.workdir import thresholds
  from adjax.config import load as run_config
  from adjax.workdir import identity
  from adjax.workdir.lock import WorkdirLock
  run = Workdir(tmp_path)
  with WorkdirLock(tmp_path, log=lambda *_: None) as lock:
    assert lock.path == run.lock and run.lock.is_file()
  assert not run.lock.exists()
  cfg = ml_collections.ConfigDict({"seed": 1, "eval": {"x": 2}})
  identity.check_run_identity(cfg, tmp_path, resuming=False)
  assert json.loads(run.run_identity.read_text()) == {"training": {"seed": 1}}
  assert identity.read_run_identity(tmp_path) == {"training": {"seed": 1}}
  run.config.write_text(json.dumps({"seed": 7}))
  assert run_config.from_workdir(tmp_path).seed == 7
  written = thresholds.write(tmp_path, dataset="d", image_score="mean", checkpoint_step=1,
                             model={"m": 1}, image=0.5)
  assert written == run.thresholds and thresholds.read(tmp_path)["image_threshold"] == 0.5
  assert thresholds.deployment_path(tmp_path / "none", tmp_path) == run.thresholds


def test_import_is_light():
  """Importing it loads neither JAX nor the modules that use it (no import cycle
  when they move into the package)."""
  code = ("import sys, adjax.workdir\n"
          "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', "
          "'orbax', 'numpy') or m.startswith('adjax.') and m != 'adjax.workdir')\n"
          "print(heavy)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True)
  assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------- one owner

FOLDERS = {"checkpoints", "data_state", "results", "heatmaps", "predictions", "tensorboard",
           "feature_cache", "text_cache", "tokenizer"}
FILES = {"config.json", "run_identity.json", "imported_from.json", "thresholds.json",
         "metrics.jsonl", "unreadable.txt", ".adjax.lock"}
# f-strings (each `{...}` as `{}`) that name per-mode or per-evaluation files.
PATTERNS = ("config_{}.json", "{}.thresholds.json")

# Not run folders: a converted tower's own config.json, the evaluation feature
# cache under data.data_dir.
NOT_RUN_FOLDERS = {
    "adjax/models/weights.py": {"config.json"},
    "adjax/models/backbones.py": {"config.json"},
    "adjax/towers.py": {"config.json"},          # _sha_of: a converted tower's config
    "converters/dinov2.py": {"config.json"},
    "converters/dinov3.py": {"config.json"},
    "converters/clip_text.py": {"config.json"},
    "converters/common.py": {"config.json"},
    "adjax/fetch/hub.py": {"config.json"},   # a Hugging Face model folder's
    "adjax/scorer.py": {"feature_cache"},        # the data set's cache, under data.data_dir
}

_PATH_CALLS = {"Path", "PurePath", "join", "joinpath", "with_name", "SummaryWriter"}


def _call_name(node) -> str:
  f = node.func
  return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def run_folder_names(source: str) -> list[tuple[int, str]]:
  """(line, name) of each run-folder name spelt out in Python `source`: a file
  name as any string, a folder name where a path is built from it, an
  f-string of a per-mode config or an evaluation's thresholds."""
  tree = ast.parse(source)
  parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.JoinedStr):
      shape = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
      found += [(node.lineno, p) for p in PATTERNS if p in shape]
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      parent = parents.get(node)
      if isinstance(parent, ast.JoinedStr):
        continue
      if node.value in FILES:
        found.append((node.lineno, node.value))
      elif node.value in FOLDERS and (
          isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div)
          or isinstance(parent, ast.Call) and _call_name(parent) in _PATH_CALLS):
        found.append((node.lineno, node.value))
  return sorted(found)


def test_the_scanner_sees_path_uses_not_dict_keys():
  src = ('p = workdir / "checkpoints"\nq = Path(w, "results") / "x"\n'
         'r = {"results": 1, "tokenizer": 2}\ns = "thresholds.json"\n'
         't = w / f"config_{mode}.json"\nu = w / f"{stem}.thresholds.json"\n'
         'v = d.get("heatmaps")\n'
         'w = f"--config_help {x}.json"\n')
  assert run_folder_names(src) == [(1, "checkpoints"), (2, "results"), (4, "thresholds.json"),
                                   (5, "config_{}.json"), (6, "{}.thresholds.json")]


def test_no_module_outside_the_package_spells_a_run_folder_name():
  sources = sorted((REPO / "adjax").rglob("*.py")) + sorted((REPO / "converters").rglob("*.py"))
  offenders = []
  for path in sources:
    rel = path.relative_to(REPO).as_posix()
    if rel.startswith("adjax/workdir/"):
      continue
    allowed = NOT_RUN_FOLDERS.get(rel, set())
    offenders += [f"{rel}:{line}: {name!r}"
                  for line, name in run_folder_names(path.read_text()) if name not in allowed]
  assert not offenders, "use adjax.workdir.Workdir:\n" + "\n".join(offenders)
