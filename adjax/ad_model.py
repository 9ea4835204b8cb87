"""The AD-DINOv3 computation in one place (SPEC sections 2 and 5-7).

`ADModel` describes one configured detector without holding any arrays: the
backbone (through its contract, `adjax.models.backbones.Backbone`), the
tapped layers, the input size, the text width, the image-score rule and the
named behaviours of the release. Its methods are pure functions of the
arrays passed in:

- `features(backbone, images)`: the frozen backbone's tapped blocks, prefix
  tokens split off, patch tokens standardised -> `Features(patches, cls)`;
- `outputs(params, features, text_table, category_index)`: the head's maps
  and logits;
- `image_scores(outputs)`: the image-level score (`global | max | mean`);
- `loss(params, inputs, text_table, batch, backbone=None)`: the training
  loss and its parts, usable with `jax.grad` (inputs: `Features` or images);
- `anomaly(params, backbone, text_table, images, category_index)`: the
  anomaly map and image score that evaluation and prediction report.

Images are uint8 RGB `[B, H, W, 3]` (normalised here with the backbone's
statistics) or floating point, taken as already normalised.
The jitted, sharded steps built from these live in `adjax.steps`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from adjax.models import backbones
from adjax.models import head as head_lib
from adjax.models import losses


@dataclasses.dataclass(frozen=True)
class Behaviour:
  """The release's departures from a clean reading of the method (SPEC section 9).

  `reference_quirks=True` turns all four on; each is passed by name to the
  code it changes.
  """
  mix_text_columns: bool = False       # cat([T0, T1], 1).reshape(B, E, 2)
  text_exact_gelu: bool = False        # exact GELU in the CLIP text tower
  visa_mask_strict_zero: bool = False  # raw VisA masks, > 0 after the resize
  first_update_lr_zero: bool = False   # warm-up starts at step 0

  @classmethod
  def of(cls, reference_quirks: bool) -> "Behaviour":
    q = bool(reference_quirks)
    return cls(mix_text_columns=q, text_exact_gelu=q, visa_mask_strict_zero=q,
               first_update_lr_zero=q)


class Features(NamedTuple):
  """Backbone features of the tapped blocks, as the head consumes them."""
  patches: jax.Array   # [L, B, N, D], standardised per image and channel
  cls: jax.Array       # [L, B, D], through the final norm


@dataclasses.dataclass(frozen=True)
class ADModel:
  """One configured AD-DINOv3 detector (no arrays; hashable)."""
  backbone: backbones.Backbone
  layers: tuple[int, ...]
  image_size: int
  text_dim: int
  behaviour: Behaviour = Behaviour()
  image_score: str = "global"

  def __post_init__(self):
    problems = backbones.model_problems(self.backbone, self.layers, self.image_size,
                                        self.image_score)
    if problems:
      raise backbones.BackboneError("; ".join(problems))

  @classmethod
  def create(cls, spec, backbone: backbones.Backbone, text_dim: int) -> "ADModel":
    """The model a run's `ModelConfig` (`run.model`) describes over these towers."""
    layers = spec.layers or backbone.default_layers()
    return cls(backbone=backbone, layers=tuple(int(l) for l in layers),
               image_size=int(spec.image_size), text_dim=int(text_dim),
               behaviour=Behaviour.of(spec.reference_quirks), image_score=spec.image_score)

  @property
  def grid(self) -> tuple[int, int]:
    return self.backbone.grid(self.image_size)

  @property
  def out_hw(self) -> tuple[int, int]:
    return self.image_size, self.image_size

  # ---- the head ---------------------------------------------------------
  def new_head(self, seed: int = 0) -> head_lib.ADHead:
    return head_lib.ADHead(self.backbone.dim, self.text_dim, len(self.layers),
                           rngs=nnx.Rngs(params=jax.random.key(seed)))

  def head_def(self) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: self.new_head()))[0]

  def abstract_params(self) -> nnx.State:
    """The head's parameter tree as ShapeDtypeStructs (restore targets)."""
    return nnx.split(nnx.eval_shape(lambda: self.new_head()))[1]

  # ---- the computation --------------------------------------------------
  def normalize(self, images: jax.Array) -> jax.Array:
    if jnp.issubdtype(images.dtype, jnp.integer):
      return self.backbone.normalize(images)
    return images.astype(jnp.float32)

  def raw_tokens(self, backbone: nnx.Module, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] (raw pixels) -> the tapped blocks' tokens as the
    backbone returns them, float32: patches [L, B, N, D] (prefix tokens
    removed, no standardisation: what the neighbour modes compare) and cls
    [L, B, D]."""
    outs = backbone.get_intermediate_layers(self.normalize(images), list(self.layers))
    tokens = jnp.stack(outs).astype(jnp.float32)                       # [L, B, T, D]
    return tokens[:, :, self.backbone.num_prefix_tokens:], tokens[:, :, self.backbone.cls_index]

  def features(self, backbone: nnx.Module, images: jax.Array) -> Features:
    """images [B, H, W, 3] -> Features (patches [L, B, N, D], cls [L, B, D]):
    `raw_tokens` with the patches standardised, for the head."""
    patches, cls = jax.lax.stop_gradient(self.raw_tokens(backbone, images))
    return Features(head_lib.standardize_patches(patches), cls)

  def outputs(self, params: nnx.State, feats: Features, text_table: jax.Array,
              category_index: jax.Array) -> dict[str, jax.Array]:
    """`cross` [B, H, W], `aacm` [B, H, W] (anomalous channels) and `logits` [B, 2]."""
    head = nnx.merge(self.head_def(), params)
    tmat = head.text_features(text_table, self.behaviour.mix_text_columns)[category_index]
    return head(feats.patches, feats.cls, tmat, self.grid, self.out_hw)

  def image_scores(self, outputs: dict) -> jax.Array:
    """Image-level anomaly score [B]: `global` (the global head's probability of
    "abnormal"), `max` (the map's maximum) or `mean` of the two."""
    prob = jax.nn.softmax(outputs["logits"], axis=-1)[:, 1]
    peak = jnp.max(outputs["cross"], axis=(1, 2))
    return {"global": prob, "max": peak, "mean": 0.5 * (prob + peak)}[self.image_score]

  def loss(self, params: nnx.State, inputs: Features | jax.Array, text_table: jax.Array,
           batch: dict, backbone: nnx.Module | None = None
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss (SPEC section 6) and its five terms.

    Args:
      params: the head's parameters (the only thing differentiated).
      inputs: `Features`, or images [B, H, W, 3] (then `backbone` is needed).
      text_table: [K, 2, E] prompt-ensemble embeddings of the categories.
      batch: `mask` [B, H, W], `label` [B], `category_index` [B] and optionally
        `has_mask` [B] (map losses skip images whose mask is unknown).
    """
    if not isinstance(inputs, Features):
      if backbone is None:
        raise ValueError("ADModel.loss: images need the backbone")
      inputs = self.features(backbone, inputs)
    out = self.outputs(params, inputs, text_table, batch["category_index"])
    return losses.total_loss(out, batch["mask"], batch["label"], batch.get("has_mask"))

  def anomaly(self, params: nnx.State, backbone: nnx.Module, text_table: jax.Array,
              images: jax.Array, category_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (anomaly map [B, H, W]: the cross-modal map's anomalous channel
    (SPEC section 7), image score [B])."""
    return self.maps(params, self.features(backbone, images), text_table, category_index)

  def maps(self, params: nnx.State, feats: Features, text_table: jax.Array,
           category_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`anomaly` from features already computed (the evaluation feature cache)."""
    out = self.outputs(params, feats, text_table, category_index)
    return out["cross"], self.image_scores(out)
