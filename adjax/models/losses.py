"""AD-DINOv3 training losses (SPEC section 6).

L = 0.25 [focal(AACM) + dice(AACM)] + 0.5 [focal(cross) + dice(cross)]
    + 0.25 CE(global logits, label)

The focal loss acts on probabilities (the maps are already softmax /
sigmoid outputs), with gamma 2, no class weights and the release's 1e-5
smoothing; dice is computed per image on the anomalous channel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5
DICE_SMOOTH = 1.0
WEIGHTS = {"aacm": 0.25, "cross": 0.5, "global": 0.25}


def _weighted_mean(per_image: jax.Array, weight: jax.Array | None) -> jax.Array:
  if weight is None:
    return jnp.mean(per_image)
  weight = weight.astype(per_image.dtype)
  return jnp.sum(per_image * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def focal_loss(p1: jax.Array, mask: jax.Array,
               weight: jax.Array | None = None) -> jax.Array:
  """Mean over all pixels of -(1 - pt)^2 log(pt).

  p1: [B, H, W] probability of the anomalous channel (the normal channel is
  1 - p1); mask: [B, H, W] in {0, 1}. The one-hot target is clipped to
  [smooth, 1 - smooth] and pt = sum_c target_c P_c + smooth.
  `weight` [B] (optional, 0/1) leaves out images without a ground-truth
  mask; with all ones it is the plain mean over all pixels.
  """
  t1 = jnp.clip(mask, FOCAL_SMOOTH, 1.0 - FOCAL_SMOOTH)
  t0 = jnp.clip(1.0 - mask, FOCAL_SMOOTH, 1.0 - FOCAL_SMOOTH)
  pt = t0 * (1.0 - p1) + t1 * p1 + FOCAL_SMOOTH
  per_pixel = -jnp.power(1.0 - pt, FOCAL_GAMMA) * jnp.log(pt)
  return _weighted_mean(jnp.mean(per_pixel, axis=tuple(range(1, per_pixel.ndim))), weight)


def dice_loss(p1: jax.Array, mask: jax.Array,
              weight: jax.Array | None = None) -> jax.Array:
  """1 - mean over images of (2 sum(P1 M) + 1) / (sum(P1) + sum(M) + 1)."""
  axes = tuple(range(1, p1.ndim))
  inter = jnp.sum(p1 * mask, axis=axes)
  d = (2.0 * inter + DICE_SMOOTH) / (
      jnp.sum(p1, axis=axes) + jnp.sum(mask, axis=axes) + DICE_SMOOTH)
  return 1.0 - _weighted_mean(d, weight)


def total_loss(outputs: dict, mask: jax.Array, label: jax.Array,
               has_mask: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of the five terms; returns (loss, dict of every term).

  `has_mask` [B] marks images whose mask is known (a user folder may have
  defect images without ground truth); the map losses skip the others, the
  image-level cross-entropy uses every image.
  """
  terms = {
      "focal_aacm": focal_loss(outputs["aacm"], mask, has_mask),
      "dice_aacm": dice_loss(outputs["aacm"], mask, has_mask),
      "focal_cross": focal_loss(outputs["cross"], mask, has_mask),
      "dice_cross": dice_loss(outputs["cross"], mask, has_mask),
      "ce_global": jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          outputs["logits"], label.astype(jnp.int32))),
  }
  loss = (WEIGHTS["aacm"] * (terms["focal_aacm"] + terms["dice_aacm"])
          + WEIGHTS["cross"] * (terms["focal_cross"] + terms["dice_cross"])
          + WEIGHTS["global"] * terms["ce_global"])
  return loss, terms
