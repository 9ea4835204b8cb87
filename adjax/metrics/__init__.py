"""Evaluation metrics: exact image- and pixel-level AUROC, AP, F1-max, AUPRO.

`compute(image_scores, image_labels, anomaly_maps, masks, fpr_limit=0.3)`
returns the metrics of one category; `MetricAccumulator` gives the same
numbers from batches as the evaluation runs, with bounded memory. Undefined
metrics (e.g. the pixel metrics of a category without anomalous pixels) are
`None` ("n/a" in reports), never 0 or 0.5.
"""

from adjax.metrics.accumulator import METRIC_KEYS
from adjax.metrics.accumulator import MetricAccumulator
from adjax.metrics.accumulator import ZSAD_KEY
from adjax.metrics.accumulator import compute

__all__ = ["METRIC_KEYS", "ZSAD_KEY", "MetricAccumulator", "compute"]
