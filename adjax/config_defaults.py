"""Kept so config files' `from adjax import config_defaults` still works.

The module is `adjax.config.defaults`; this name is the same module object
(relayout shim).
"""

import sys

from adjax.config import defaults as _defaults

sys.modules[__name__] = _defaults
