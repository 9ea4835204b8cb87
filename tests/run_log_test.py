"""metrics.jsonl holds each step once after a resume."""

import json

from adjax.workdir import run_log


def _steps(path):
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _log(workdir, start, total):
  log = run_log.RunLog(workdir, total, start, images_per_step=2, enabled=True)
  for done in range(start + 1, total + 1):
    log.step(done, {"loss": 1.0 / done}, write=True)
  log.close()


def test_resume_logs_each_step_once(tmp_path):
  _log(tmp_path, 0, 7)  # killed after step 7; its last checkpoint was step 4
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "loss"')  # torn by the kill
  _log(tmp_path, 4, 10)
  assert _steps(tmp_path / "metrics.jsonl") == list(range(1, 11))
  losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert losses == [1.0 / s for s in range(1, 11)]


def test_fresh_start_drops_everything_and_missing_file_is_fine(tmp_path):
  assert run_log.truncate_metrics(tmp_path / "metrics.jsonl", 3) == 0
  _log(tmp_path, 0, 3)
  _log(tmp_path, 0, 2)
  assert _steps(tmp_path / "metrics.jsonl") == [1, 2]


def test_truncate_keeps_file_untouched_when_nothing_to_drop(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n')
  before = path.stat().st_ino
  assert run_log.truncate_metrics(path, 2) == 0
  assert path.stat().st_ino == before
  assert run_log.truncate_metrics(path, 1) == 1
  assert path.read_text() == '{"step": 1}\n'


def test_complete_last_line_without_newline_gets_one(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}')
  assert run_log.truncate_metrics(path, 5) == 0
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
