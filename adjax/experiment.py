"""One run, from a resolved config: set up devices, towers and data; dispatch.

Modes: `train` (then evaluate on the targets), `evaluate` (a trained
workdir, or `init_from`), `predict` (a folder or glob of images),
`build_bank` (the few-shot banks of the targets, stored in the workdir).
"""

from __future__ import annotations

from pathlib import Path

import jax
from jax.experimental import multihost_utils
import numpy as np

from adjax import evaluate, fetch, loading, modes, predict, scoring_modes
from adjax import towers as towers_lib
from adjax import train
from adjax.common import atomic, sharding
from adjax.config import check as config_check
from adjax.config import schema
from adjax.data import synthetic
from adjax.data import targets as datasets
from adjax.workdir import Workdir, identity
from adjax.workdir.lock import WorkdirLock


def run(config, workdir_flag: str | None = None) -> dict:
  """The public entry: resolves the user's `ConfigDict` (every problem in
  one message) into the typed run config, starts the processes and devices,
  resolves and locks the workdir, then `_run_locked`."""
  cfg = config_check.resolve(config)     # before jax.distributed and the devices
  processes = cfg.processes
  if processes.distributed:
    kwargs = {}
    if processes.coordinator_address:
      kwargs = dict(coordinator_address=processes.coordinator_address,
                    num_processes=processes.num_processes, process_id=processes.process_id)
    jax.distributed.initialize(**kwargs)
  config_check.check(config, device_count=jax.device_count(),
                     process_count=jax.process_count())
  # Benchmarks missing (with consent), then converted towers missing with a
  # hub id set: fetched, verified and unpacked or converted now, after every
  # other check and before any training; the towers are then checked like
  # any converted folder.
  if jax.process_index() == 0:
    fetch.ensure_datasets(cfg)
  if fetch.ensure_weights(cfg, text=not modes.head_free(cfg)):
    config_check.check(config, device_count=jax.device_count(),
                       process_count=jax.process_count())
  workdir = loading.resolve_workdir(cfg, workdir_flag)
  if workdir.exists() and not workdir.is_dir():
    raise config_check.ConfigError(
        f"--workdir {workdir}: is a file, not a folder; pass a folder (it is created "
        "when missing)")
  if (cfg.mode != "train" and not cfg.init_from and not Workdir(workdir).has_checkpoints()
      and not modes.head_free(cfg)):
    raise config_check.ConfigError(
        f"mode={cfg.mode}: {workdir} holds no trained checkpoint; pass the trained "
        "run's --workdir, or --config.init_from=<trained workdir>")
  main_process = jax.process_index() == 0
  if main_process:
    workdir.mkdir(parents=True, exist_ok=True)
  # One run per workdir (process 0 holds the lock for a multi-host run).
  with WorkdirLock(workdir, is_primary=main_process):
    return _run_locked(cfg, workdir, main_process)


def _run_locked(cfg: schema.RunConfig, workdir: Path, main_process: bool) -> dict:
  """The run inside its locked workdir: records the mode's config, builds the
  mesh and towers, and dispatches to train / evaluate / predict."""
  wd = Workdir(workdir)
  if main_process:
    print(f"workdir: {workdir}", flush=True)
    if cfg.mode == "train":
      identity.check_run_identity(cfg, workdir, resuming=wd.has_checkpoints())
    # The training config stays in config.json; other modes keep their own.
    atomic.write_text(wd.mode_config(cfg.mode), cfg.to_json(indent=2))
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
  if cfg.data.demo.root and cfg.mode != "predict":   # predict reads no data set
    _ensure_demo_data(cfg.data.demo)
  towers = towers_lib.build(cfg, workdir, text=not modes.head_free(cfg))

  if cfg.mode == "predict":
    head = None
    if not modes.head_free(cfg):
      # Thresholds being calibrated anew replace the record, which is then
      # not read (nor refused) first.
      head = loading.load_head(cfg, workdir, towers=towers, mesh=mesh,
                               read_thresholds=not cfg.predict.calibrate_normals)
    return predict.run(cfg, workdir, towers, mesh, head)

  if cfg.mode == "build_bank":
    return {"banks": scoring_modes.build_banks(cfg, workdir, towers, mesh)}

  if cfg.mode == "train":
    handle = datasets.prepare(cfg, cfg.data.train)
    _check_anomalies(cfg, handle, main_process)
    state, steps_run = train.train(cfg, workdir, towers, mesh, handle)
    if not cfg.eval.enabled:
      return {"state": state}
    if steps_run == 0 and wd.results_complete() and not cfg.eval.force:
      if main_process:
        print(f"{workdir} is already trained and evaluated (results/); pass "
              "--config.eval.force=True to evaluate it again")
      return {"state": state}
    results, absent = evaluate.evaluate_modes(
        cfg, workdir, towers, mesh, state["params"],
        source=(workdir, int(jax.device_get(state["step"]))))
    return {"state": state, "results": results, "absent": absent}

  if modes.head_free(cfg):
    results, absent = evaluate.evaluate_modes(cfg, workdir, towers, mesh, None, source=None)
    return {"results": results, "absent": absent}
  head = loading.load_head(cfg, workdir, towers=towers, mesh=mesh, read_thresholds=False)
  results, absent = evaluate.evaluate_modes(cfg, workdir, towers, mesh, head.params,
                                            source=(head.source, head.step))
  return {"results": results, "absent": absent}


def _check_anomalies(cfg, handle, main_process: bool) -> None:
  """A training set without anomalous images teaches no defect: refused
  unless train.allow_no_anomalies=True."""
  if int(np.sum(np.asarray(handle.example_label) > 0)):
    return
  what = (f"data.train={cfg.data.train!r}: none of its {handle.num_examples} images is "
          "anomalous, so the adapters and the global head see only \"normal\" (the losses "
          "push every image and pixel toward it; no defect is learned)")
  if not cfg.train.allow_no_anomalies:
    raise config_check.ConfigError(
        f"{what}; add anomalous images with masks, or pass "
        "--config.train.allow_no_anomalies=True to train anyway")
  if main_process:
    print(f"warning: {what}; training anyway (train.allow_no_anomalies=True)", flush=True)


def _ensure_demo_data(demo) -> None:
  """Writes the generated demo families on first use (process 0 only)."""
  root = Path(demo.root)
  missing = [f for f in ("a", "b") if not (root / f"family_{f}").is_dir()]
  if missing and jax.process_index() == 0:
    print(f"generating demo data (families {', '.join(missing)}) in {root}", flush=True)
    synthetic.generate(root, seed=demo.seed, image_size=demo.image_size,
                       per_category=demo.per_category, families=missing,
                       train_per_category=demo.train_per_category)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("demo data")
