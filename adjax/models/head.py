"""The trainable part of AD-DINOv3: adapters, the AACM map and the heads.

Inputs are the frozen towers' outputs for the tapped backbone blocks:
standardised patch tokens `[L, B, N, D]`, cls tokens `[L, B, D]` and the
per-image prompt-ensemble text embedding `[B, 2, E]` (row 0 normal, row 1
abnormal). Per tapped layer l (SPEC section 5):

  p_l = normalize(A_patch_l(P_l))            [B, N, E]
  g_l = normalize(A_cls_l(c_l))              [B, E]
  T   = (A_text_0(t_normal), A_text_1(t_abnormal))   [B, E, 2]
  cross_l = softmax(up(100 * p_l @ T))       [B, S, S, 2]
  aacm_l  = sigmoid(up(10 * p_l . g_l))      [B, S, S] -> [1 - a, a]
  logits_l = 100 * g_l @ T                   [B, 2]

each averaged over the layers (maps after softmax / sigmoid). `up` is
bilinear resizing with align_corners=True, written as two interpolation
matrices because `jax.image.resize` samples half-pixel centres instead.

Both maps have two channels that sum to one, so only the anomalous channel
is materialised: softmax over two channels is the sigmoid of their
difference, and upsampling is linear, so channel 1 of the cross-modal map is
`sigmoid(up(s_1 - s_0))`: one upsampled plane instead of two, and no
full-resolution softmax (the head's cost at 512 px is these planes).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LEAKY_SLOPE = 0.01
CROSS_SCALE = 100.0
AACM_SCALE = 10.0
STANDARDISE_EPS = 1e-6
NORMALIZE_EPS = 1e-12


class Adapter(nnx.Module):
  """Bias-free bottleneck `LeakyReLU_0.01(x @ W)`, W: [c_in, c_out].

  The release also builds a second linear layer back to c_in whose output
  is never used (it gets no gradient), so it is not built here.
  Initialisation follows torch's Linear default, U(-1/sqrt(c_in), 1/sqrt(c_in)).
  """

  def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(c_in)
    self.kernel = nnx.Param(
        jax.random.uniform(rngs.params(), (c_in, c_out), jnp.float32, -bound, bound))

  def __call__(self, x: jax.Array) -> jax.Array:
    # One 2-D matmul over all leading axes: for [B, N, D] patch tokens the
    # kernel's gradient is then a plain [D, B*N] x [B*N, E] product, which
    # XLA:CPU runs through its matmul library; from the 3-D form it
    # materialised a transposed copy of the upstream gradient and ran a
    # slower generic dot (the cached ViT-L/16 512 px train step ~15% faster).
    kernel = self.kernel[...].astype(x.dtype)
    y = (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])
    return jax.nn.leaky_relu(y, LEAKY_SLOPE)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, NORMALIZE_EPS)


def standardize_patches(patches: jax.Array) -> jax.Array:
  """Per image and channel over the N patch tokens: (P - mean) / (std + 1e-6).

  std uses Bessel's correction (ddof=1), as the release's torch.std does.
  `patches`: [..., N, D]; computed in float32.
  """
  patches = patches.astype(jnp.float32)
  mean = jnp.mean(patches, axis=-2, keepdims=True)
  std = jnp.std(patches, axis=-2, keepdims=True, ddof=1)
  return (patches - mean) / (std + STANDARDISE_EPS)


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear interpolation weights with align_corners=True.

  Output pixel i samples source coordinate i * (n_in - 1) / (n_out - 1).
  """
  m = np.zeros((n_out, n_in), np.float64)
  if n_in == 1 or n_out == 1:
    m[:, 0] = 1.0
    return m.astype(np.float32)
  src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  lo = np.clip(np.floor(src).astype(int), 0, n_in - 2)
  frac = src - lo
  m[np.arange(n_out), lo] = 1.0 - frac
  m[np.arange(n_out), lo + 1] += frac
  return m.astype(np.float32)


def upsample_align_corners(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of [B, h, w, C] to [B, H, W, C] with align_corners=True."""
  _, h, w, _ = x.shape
  rh = jnp.asarray(align_corners_matrix(h, out_hw[0]))
  rw = jnp.asarray(align_corners_matrix(w, out_hw[1]))
  return jnp.einsum("Hh,bhwc,Ww->bHWc", rh, x, rw,
                    precision=jax.lax.Precision.HIGHEST)


def mix_text_columns(t_normal: jax.Array, t_abnormal: jax.Array,
                     release_quirk: bool) -> jax.Array:
  """Text matrix [..., E, 2] whose columns are the normal / abnormal features.

  With `release_quirk` (SPEC section 9, quirk 1) the release's
  `cat([T0, T1], 1).reshape(B, E, 2)` is reproduced: column c holds elements
  2j + c of the concatenation, so both columns mix normal and abnormal
  features.
  """
  if release_quirk:
    cat = jnp.concatenate([t_normal, t_abnormal], axis=-1)
    return cat.reshape(*cat.shape[:-1], t_normal.shape[-1], 2)
  return jnp.stack([t_normal, t_abnormal], axis=-1)


class ADHead(nnx.Module):
  """4 cls adapters, 4 patch adapters, 2 text adapters and the three heads."""

  def __init__(self, feature_dim: int, text_dim: int, num_layers: int = 4, *,
               rngs: nnx.Rngs):
    self.num_layers = num_layers
    self.cls_adapters = nnx.List(
        [Adapter(feature_dim, text_dim, rngs=rngs) for _ in range(num_layers)])
    self.patch_adapters = nnx.List(
        [Adapter(feature_dim, text_dim, rngs=rngs) for _ in range(num_layers)])
    self.text_adapters = nnx.List(
        [Adapter(text_dim, text_dim, rngs=rngs) for _ in range(2)])

  def text_features(self, text: jax.Array, release_quirk: bool) -> jax.Array:
    """[K, 2, E] prompt-ensemble embeddings -> [K, E, 2] adapted text matrix."""
    t_normal = self.text_adapters[0](text[:, 0])
    t_abnormal = self.text_adapters[1](text[:, 1])
    return mix_text_columns(t_normal, t_abnormal, release_quirk)

  def __call__(self, patches: jax.Array, cls: jax.Array, text: jax.Array,
               grid: tuple[int, int], out_hw: tuple[int, int]) -> dict:
    """Runs the heads.

    Args:
      patches: [L, B, N, D] standardised patch tokens of the tapped blocks.
      cls: [L, B, D] cls tokens (after the final norm).
      text: [B, E, 2] adapted text matrix per image (from `text_features`).
      grid: (h, w) patch grid with h * w = N.
      out_hw: (H, W) map resolution.

    Returns:
      dict with `cross` [B, H, W] and `aacm` [B, H, W], the anomalous channel's
      probability of each map (the normal channel is 1 minus it), and
      `logits` [B, 2], each averaged over the L layers.
    """
    num_layers, batch = patches.shape[0], patches.shape[1]
    if num_layers != self.num_layers:
      raise ValueError(f"got {num_layers} tapped layers, the head has {self.num_layers}")
    cross = aacm = logits = 0.0
    for l in range(num_layers):
      p = l2_normalize(self.patch_adapters[l](patches[l].astype(jnp.float32)))
      g = l2_normalize(self.cls_adapters[l](cls[l].astype(jnp.float32)))
      # Both low-resolution planes are upsampled together: [B, h, w, 2].
      diff = CROSS_SCALE * jnp.einsum("bne,be->bn", p, text[..., 1] - text[..., 0])
      a = AACM_SCALE * jnp.einsum("bne,be->bn", p, g)
      up = upsample_align_corners(jnp.stack([diff, a], -1).reshape(batch, *grid, 2), out_hw)
      probs = jax.nn.sigmoid(up)
      cross = cross + probs[..., 0]
      aacm = aacm + probs[..., 1]
      logits = logits + CROSS_SCALE * jnp.einsum("be,bec->bc", g, text)
    return {"cross": cross / num_layers, "aacm": aacm / num_layers,
            "logits": logits / num_layers}
