r"""Train on the VisA test split (12 categories); evaluate zero-shot on MVTec AD.

Same model and schedule as configs/mvtec.py (the paper's). VisA masks are
thresholded at > 0 after resizing while reference_quirks is on (the release
does so).

Run:
  python -m adjax.main --config=configs/visa.py        # also :gpu8, :tpu, :cpu, :dinov2, :exact

Published figures for comparison (SPEC section 7): AnomalyCLIP on MVTec AD
img-AUROC 91.5, px-AUROC 91.1, AUPRO 81.4; AVA-DINO (DINOv3) 93.5 / 92.1.
"""

from adjax.config import defaults as config_defaults


def get_config(arg: str | None = None):
  c = config_defaults.base_config()
  c.name = "visa" if not arg else f"visa_{arg}"
  c.data.train = "visa"
  c.data.targets = "mvtec_ad"
  return config_defaults.apply_variant(c, arg)
