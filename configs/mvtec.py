r"""Train on the MVTec AD test split (15 categories); evaluate zero-shot on the rest.

The paper's protocol and settings (SPEC sections 1, 5-7): DINOv3 ViT-L/16 at
512 px, blocks 5/11/17/23, CLIP ViT-L/14@336 text tower, batch 64, 100 epochs,
AdamW 1e-5 with 3% warm-up, the release's quirks on. Targets: VisA, MPDD,
BTAD, ISIC, CVC-ClinicDB, CVC-ColonDB, TN3K (those present are evaluated; the
absent ones are listed at the end).

Run:
  python -m adjax.main --config=configs/mvtec.py              # one GPU
  python -m adjax.main --config=configs/mvtec.py:gpu8         # 8 GPUs, one host
  python -m adjax.main --config=configs/mvtec.py:tpu          # each host of a TPU VM slice
  python -m adjax.main --config=configs/mvtec.py:cpu          # a laptop: ViT-S/16, 224 px
  python -m adjax.main --config=configs/mvtec.py:dinov2       # DINOv2 ViT-L/14 (registers), 518 px
  python -m adjax.main --config=configs/mvtec.py:exact        # the release's numbers exactly
  python -m adjax.main --config=configs/mvtec.py:dinov2+gpu8  # variants combine with +

`:exact` sets reference_quirks=True, backbone.dtype=float32 and
feature_cache_dtype=float32: the bfloat16 defaults are faster and change the
metrics only in their last digits, but not bit for bit.

Published figures for comparison (SPEC section 7): AnomalyCLIP on VisA
img-AUROC 82.1, px-AUROC 95.5, AUPRO 87.0; AVA-DINO (DINOv3) VisA 87.2 / 95.9.
"""

from adjax.config import defaults as config_defaults


def get_config(arg: str | None = None):
  c = config_defaults.base_config()
  c.name = "mvtec" if not arg else f"mvtec_{arg}"
  c.data.train = "mvtec_ad"
  c.data.targets = ",".join(config_defaults.MVTEC_TARGETS)
  return config_defaults.apply_variant(c, arg)
