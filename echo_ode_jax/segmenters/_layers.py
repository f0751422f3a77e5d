"""Building blocks shared by the segmenters (NHWC, flax.linen)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch-like BatchNorm: running = 0.9 running + 0.1 batch.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm using batch statistics when `train`, running averages otherwise."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                      epsilon=BN_EPS, name=name)


class ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm -> optional ReLU. x: (B, H, W, C)."""
  features: int
  kernel: Sequence[int] = (3, 3)
  strides: int = 1
  dilation: int = 1
  relu: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, tuple(self.kernel), strides=self.strides,
                kernel_dilation=self.dilation, padding="SAME", use_bias=False)(x)
    x = batch_norm(train)(x)
    return nn.relu(x) if self.relu else x


class PReLU(nn.Module):
  """Per-channel PReLU (slopes initialised to 0.25, as in ENet / PyTorch)."""
  init: float = 0.25

  @nn.compact
  def __call__(self, x):
    a = self.param("alpha", nn.initializers.constant(self.init), (x.shape[-1],))
    return jnp.where(x >= 0, x, a * x)


def pad_to_multiple(x: jax.Array, m: int) -> jax.Array:
  """Zero-pads (B, H, W, C) at the bottom/right so that H and W divide by m."""
  h, w = x.shape[1:3]
  ph, pw = (-h) % m, (-w) % m
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  return x


def max_pool_2x2_with_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """2x2 stride-2 max pooling that also returns where each max was.

  x: (B, H, W, C) with even H, W. Returns pooled (B, H/2, W/2, C) and indices
  (B, H/2, W/2, C) int32 in [0, 4): position 2*dr + dc inside the 2x2 window
  (first maximum on ties).
  """
  b, h, w, c = x.shape
  p = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  p = p.reshape(b, h // 2, w // 2, c, 4)
  return jnp.max(p, axis=-1), jnp.argmax(p, axis=-1).astype(jnp.int32)


def max_unpool_2x2(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Inverse of :func:`max_pool_2x2_with_argmax`: (B, h, w, C) -> (B, 2h, 2w, C).

  Each value goes back to the window position its max came from; the other
  three positions are zero (SegNet / ENet max-unpooling).
  """
  b, h, w, c = x.shape
  y = x[..., None] * jax.nn.one_hot(indices, 4, dtype=x.dtype)  # (B, h, w, C, 4)
  y = y.reshape(b, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return y.reshape(b, 2 * h, 2 * w, c)
