"""Shared configuration defaults; `configs/*.py` import and override these.

Every field a run reads is declared, with its default, bounds and meaning,
in `adjax.config.schema`; `base_config()` is those declarations as an
`ml_collections.ConfigDict`, so a misspelt command-line override
(`--config.epocs=3`) is an error rather than silently ignored. The defaults
are the paper's settings (SPEC sections 5-7); `apply_variant` holds the
variants the experiment configs share (`configs/mvtec.py:cpu`).
"""

from __future__ import annotations

import ml_collections

from adjax.config import schema

# Data sets the protocol evaluates on after training on MVTec AD (SPEC section 1).
MVTEC_TARGETS = schema.MVTEC_TARGETS


def base_config() -> ml_collections.ConfigDict:
  """Every declared field at its default (`adjax.config.schema.RunConfig`)."""
  return schema.to_configdict()


VARIANTS = ("gpu", "gpu8", "tpu", "tpu_7b", "cpu", "dinov2", "exact")


def apply_variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Variants shared by the experiment configs (`configs/x.py:tpu`).

  Several combine with "+", applied left to right: `configs/mvtec.py:dinov2+gpu8`.
  """
  if not arg:
    return c
  if "+" in arg:
    for part in arg.split("+"):
      apply_variant(c, part)
    return c
  if arg == "gpu":
    return c
  if arg == "dinov2":          # the paper protocol on DINOv2 ViT-L/14 with registers
    c.backbone.family = "dinov2"
    c.backbone.variant = "vitl14_reg"
    c.backbone.checkpoint = "checkpoints/dinov2_vitl14_reg"
    c.backbone.hub_id = "facebook/dinov2-with-registers-large"
    c.backbone.layers = (5, 11, 17, 23)
    c.image_size = 518         # 37 x 37 patches of 14 px: DINOv2's native grid
  elif arg == "exact":         # the release's numbers exactly: its quirks, float32 throughout
    c.reference_quirks = True
    c.backbone.dtype = "float32"
    c.feature_cache_dtype = "float32"
  elif arg == "gpu8":            # one host, 8 GPUs: data parallel, backbone replicated
    c.mesh.data, c.mesh.model = 8, 1
  elif arg == "tpu":           # multi-host TPU VM slice: every chip data parallel
    c.distributed = True
    c.mesh.data, c.mesh.model = -1, 1
  elif arg == "tpu_7b":        # the 7B backbone split over 4 chips per replica
    c.distributed = True
    c.backbone.variant = "vit7b16"
    c.backbone.checkpoint = "checkpoints/dinov3_vit7b16"
    c.backbone.hub_id = "facebook/dinov3-vit7b16-pretrain-lvd1689m"
    c.backbone.layers = (9, 19, 29, 39)
    c.mesh.data, c.mesh.model = -1, 4
    c.mesh.backbone_sharding = "model"
    c.text.variant = "vit-l-14"       # CLIP text architecture (clip_text.VARIANTS), for random_init
  elif arg == "cpu":           # a laptop: small backbone, small images
    c.backbone.variant = "vits16"
    c.backbone.checkpoint = "checkpoints/dinov3_vits16"
    c.backbone.hub_id = "facebook/dinov3-vits16-pretrain-lvd1689m"
    c.backbone.layers = (2, 5, 8, 11)
    c.backbone.dtype = "float32"
    c.image_size = 224
    c.batch_size = 8
    c.feature_cache = "disk"
  else:
    raise ValueError(f"unknown config variant {arg!r}; expected one of "
                     f"{', '.join(VARIANTS)} (several joined by +)")
  return c
