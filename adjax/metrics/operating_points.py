"""Decision thresholds from scores: F1-optimal (with labels) or a quantile of normals.

- `f1_optimal(scores, labels)`: the threshold that maximises F1 when
  `score >= threshold` is called anomalous, with its precision and recall.
  It runs the same `curves.RankingSweep` that gives the evaluation's F1-max
  and its thresholds (`MetricAccumulator.result(details=True)`), so both
  choose the same threshold; ties go to the highest threshold (fewest alarms).
- `quantile_threshold(normal_scores, q)`: from normal images only (no
  anomalous examples), e.g. q=0.99 flags about 1% of normal images.

Both return a threshold strictly between the two observed scores it
separates (`curves.separating`: their float32 midpoint), never an observed
score: paths whose scores differ by rounding (ONNX and JAX, batch padding,
bfloat16) decide alike unless a score falls inside that gap.

Recording, checking and resolving thresholds for a model is
`adjax.workdir.thresholds`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adjax.metrics import curves


@dataclasses.dataclass(frozen=True)
class F1Threshold:
  threshold: float      # anomalous when value >= threshold
  f1: float
  precision: float
  recall: float


def f1_optimal(scores, labels) -> F1Threshold:
  """The threshold with the largest F1 of `score >= threshold` (label 1 = anomalous).

  Ties go to the highest such threshold (fewest alarms).
  """
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel().astype(bool)
  if scores.shape != labels.shape:
    raise ValueError(f"{scores.size} scores but {labels.size} labels")
  if not labels.any():
    raise ValueError("F1 needs at least one anomalous example; use quantile_threshold "
                     "for normal-only data")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or infinity")
  sweep = curves.RankingSweep(np.sort(scores[~labels]), int(labels.sum()))
  sweep.feed(*curves.distinct_descending(scores[labels]))
  return F1Threshold(*sweep.f1_point())


def quantile_threshold(normal_scores, q: float = 0.99) -> float:
  """The q-quantile of scores from normal images only (a false-alarm budget of 1 - q).

  The empirical quantile that never interpolates upwards past an observed
  value ("higher"), v; the threshold lies between v and the next higher
  observed score (`curves.separating`; beyond v by `curves.OPEN_SIDE_MARGIN`
  when v is the largest), so the normals called anomalous (score >=
  threshold) are exactly those above v: at most a fraction 1 - q of them.
  """
  scores = np.asarray(normal_scores, np.float64).ravel()
  if scores.size == 0:
    raise ValueError("quantile_threshold needs at least one normal score")
  if not 0.0 < q <= 1.0:
    raise ValueError(f"q={q}: expected 0 < q <= 1")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or infinity")
  v = float(np.quantile(scores, q, method="higher"))
  above = scores[scores > v]
  return curves.separating(v, float(above.min()) if above.size else None)


separating = curves.separating
