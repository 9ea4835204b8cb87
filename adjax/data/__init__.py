"""Data: TFDS builders, the grain input pipeline, prediction reader, generator.

`prepare(name, manual_dir=..., data_dir=...)` turns a raw download (or a
user's folder in MVTec layout) into an array_record data set on first use
and reuses it afterwards (`adjax.data.preparation`); `make_loader(handle,
...)` serves preprocessed, sharded, checkpointable batches from it
(`adjax.data.pipeline`).
"""

from adjax.data.images import prediction_batches, read_image_folder
from adjax.data.layouts import DataError, DatasetNotFoundError
from adjax.data.pipeline import Loader, make_loader, steps_per_epoch
from adjax.data.preparation import DATASETS, DatasetHandle, prepare

__all__ = [
    "DATASETS", "DataError", "DatasetHandle", "DatasetNotFoundError", "Loader", "make_loader",
    "prediction_batches", "prepare", "read_image_folder", "steps_per_epoch",
]
