"""Evaluation metrics: exact image- and pixel-level AUROC, AP, F1-max, AUPRO.

`compute(image_scores, image_labels, anomaly_maps, masks, fpr_limit=0.3)`
returns the metrics of one category; `MetricAccumulator` gives the same
numbers from batches as the evaluation runs, with bounded memory. Undefined
metrics (e.g. the pixel metrics of a category without anomalous pixels) are
`None` ("n/a" in reports), never 0 or 0.5. `f1_optimal` and
`quantile_threshold` choose decision thresholds from scores (F1-optimal
from the same sweep as F1-max).
"""

from adjax.metrics.accumulator import METRIC_KEYS
from adjax.metrics.accumulator import MetricAccumulator
from adjax.metrics.accumulator import ZSAD_KEY
from adjax.metrics.accumulator import compute
from adjax.metrics.operating_points import F1Threshold
from adjax.metrics.operating_points import f1_optimal
from adjax.metrics.operating_points import quantile_threshold
from adjax.metrics.operating_points import separating

__all__ = ["METRIC_KEYS", "ZSAD_KEY", "F1Threshold", "MetricAccumulator", "compute",
           "f1_optimal", "quantile_threshold", "separating"]
