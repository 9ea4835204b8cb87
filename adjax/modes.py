"""The scoring modes and what each needs, with no JAX in sight.

The config check, the thresholds records, the reports and the scorers all
name the modes from here (`adjax.scoring_modes` scores them in evaluation,
`adjax.detector` on a call):
- `zero_shot`: the trained head alone;
- `few_shot`: each image against a memory bank of normal images;
- `batch`: MuSc, each image against the other unlabeled images scored with it;
- `zero_shot+few_shot`, `zero_shot+batch`: the head's map and the neighbour
  map, each normalised over its category (`COMBINES`), averaged.
"""

from __future__ import annotations

# Every mode evaluation scores in (eval.scoring), and the ones a call to the
# Detector, the page and mode=predict score in (predict.scoring): the
# combined modes normalise maps over a whole category.
SCORINGS = ("zero_shot", "few_shot", "batch", "zero_shot+few_shot", "zero_shot+batch")
PREDICT_SCORINGS = ("zero_shot", "few_shot", "batch")
COMBINES = ("zscore", "minmax")
# The head's image-score rules (eval.image_score).
IMAGE_SCORES = ("global", "max", "mean")


# In eval.references_dir and predict.references: the category's (object's) name.
CATEGORY = "{category}"

# What each mode needs besides the images scored (the modes table).
NEEDS = {
    "zero_shot": "a head trained on another data set",
    "few_shot": "normal images of each object",
    "batch": "no training, no labels: the images scored together",
    "zero_shot+few_shot": "a trained head and normal images",
    "zero_shot+batch": "a trained head; the images scored together",
}


def needs_head(scoring: str) -> bool:
  """Modes that use the trained head (and so the text tower)."""
  return scoring.startswith("zero_shot")


def neighbour_kind(scoring: str) -> str | None:
  """"batch", "few_shot" or None (zero-shot only)."""
  return scoring.split("+")[-1] if scoring != "zero_shot" else None


def uses_bank(scoring: str) -> bool:
  """Modes whose scores depend on a bank of reference images."""
  return neighbour_kind(scoring) == "few_shot"


def evaluated(run) -> tuple[str, ...]:
  """The modes an evaluation of `run` scores in: eval.scoring, then the
  others of eval.compare."""
  return (run.eval.scoring, *(m for m in run.eval.compare if m != run.eval.scoring))


def head_free(run) -> bool:
  """A resolved run that needs neither the head nor the text tower: building
  few-shot banks, evaluation or prediction in neighbour modes only."""
  return head_free_for(run.mode, run.eval.scoring, run.eval.compare, run.predict.scoring)


def head_free_for(mode: str, scoring: str, compare, predict_scoring: str) -> bool:
  """`head_free` from the fields themselves (the config check's, before resolution)."""
  if mode == "build_bank":
    return True
  if mode == "predict":
    return predict_scoring != "zero_shot"
  return mode == "evaluate" and not any(needs_head(m) for m in (scoring, *compare))
