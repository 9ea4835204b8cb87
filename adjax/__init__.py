"""adjax: AD-DINOv3 zero-shot anomaly detection in JAX/Flax NNX.

`from adjax import Detector` is the Python API (adjax.detector); it is loaded
on first use, so `import adjax.data` and the like do not pull in JAX.
"""

__version__ = "0.1.0"

_LAZY = {"Detector": "adjax.detector", "Prediction": "adjax.detector"}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'adjax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
