"""adjax: AD-DINOv3 zero-shot anomaly detection in JAX/Flax NNX.

`from adjax import Detector` is the Python API (adjax.detector); it is loaded
on first use, so `import adjax.data` and the like do not pull in JAX.
`from adjax import config_defaults` (the name config files used before the
config package) is `adjax.config.defaults`.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"Detector": "adjax.detector", "Prediction": "adjax.detector"}
_RENAMED = {"config_defaults": "adjax.config.defaults"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  if name in _RENAMED:
    return importlib.import_module(_RENAMED[name])
  raise AttributeError(f"module 'adjax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY) + list(_RENAMED))
