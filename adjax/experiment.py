"""One run, from a resolved config: set up devices, towers and data; dispatch.

Modes: `train` (then evaluate on the targets), `evaluate` (a trained
workdir, or `init_from`), `predict` (a folder or glob of images).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
from flax import nnx

from adjax import atomic, checkpointing, sharding, targets, train, train_step
from adjax import towers as towers_lib

MODES = ("train", "evaluate", "predict")


def resolve_workdir(cfg, workdir_flag: str | None) -> Path:
  return Path(workdir_flag or cfg.workdir or Path("runs") / cfg.name)


def trained_params(cfg, workdir: Path, towers, mesh):
  """The head parameters of this workdir's latest checkpoint (else `init_from`)."""
  _, params = nnx.split(train.new_head(cfg, towers))
  tx, _ = train_step.make_optimizer(cfg, 1)
  abstract = checkpointing.abstract_like(
      jax.device_put(train_step.init_state(params, tx), sharding.replicated(mesh)))
  for source in (workdir, Path(cfg.init_from) if cfg.init_from else None):
    if source is None:
      continue
    ckpts = checkpointing.RunCheckpoints(source, cfg.checkpoints_to_keep)
    try:
      if ckpts.latest_step() is not None:
        state, step = ckpts.restore_params(abstract)
        logging.info("loaded the head from %s (step %d)", source, step)
        return state["params"]
    finally:
      ckpts.close()
  raise FileNotFoundError(
      f"no trained checkpoint in {workdir}"
      + (f" or init_from={cfg.init_from}" if cfg.init_from else "")
      + "; train first (mode=train) or point init_from at a trained workdir")


def _results_complete(workdir: Path) -> bool:
  results = workdir / "results"
  return results.is_dir() and any(results.glob("*.json"))


def run(cfg, workdir_flag: str | None = None) -> dict:
  if cfg.mode not in MODES:
    raise ValueError(f"mode={cfg.mode!r}; expected one of {MODES}")
  if cfg.distributed:
    kwargs = {}
    if cfg.coordinator_address:
      kwargs = dict(coordinator_address=cfg.coordinator_address,
                    num_processes=cfg.num_processes, process_id=cfg.process_id)
    jax.distributed.initialize(**kwargs)
  workdir = resolve_workdir(cfg, workdir_flag)
  main_process = jax.process_index() == 0
  if main_process:
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {workdir}", flush=True)
    # The training config stays in config.json; other modes keep their own.
    name = "config.json" if cfg.mode == "train" else f"config_{cfg.mode}.json"
    atomic.write_text(workdir / name, cfg.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
  if cfg.data.demo.root:
    _ensure_demo_data(cfg.data.demo)
  towers = towers_lib.build(cfg, workdir)

  if cfg.mode == "predict":
    from adjax import predict
    return predict.run(cfg, workdir, towers, mesh, trained_params(cfg, workdir, towers, mesh))

  from adjax import evaluate
  if cfg.mode == "train":
    handle = targets.prepare(cfg, cfg.data.train)
    state, steps_run = train.train(cfg, workdir, towers, mesh, handle)
    if not cfg.eval.enabled:
      return {"state": state}
    if steps_run == 0 and _results_complete(workdir) and not cfg.eval.force:
      if main_process:
        print(f"{workdir} is already trained and evaluated (results/); pass "
              "--config.eval.force=True to evaluate it again")
      return {"state": state}
    results = evaluate.evaluate_targets(cfg, workdir, towers, mesh, state["params"])
    return {"state": state, "results": results}

  params = trained_params(cfg, workdir, towers, mesh)
  return {"results": evaluate.evaluate_targets(cfg, workdir, towers, mesh, params)}


def _ensure_demo_data(demo) -> None:
  """Writes the generated demo families on first use (process 0 only)."""
  from adjax.data import synthetic
  root = Path(demo.root)
  missing = [f for f in ("a", "b") if not (root / f"family_{f}").is_dir()]
  if missing and jax.process_index() == 0:
    print(f"generating demo data (families {', '.join(missing)}) in {root}", flush=True)
    synthetic.generate(root, seed=demo.seed, image_size=demo.image_size,
                       per_category=demo.per_category, families=missing)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("demo data")
