"""ENet (Paszke et al. 2016, "ENet: A Deep Neural Network Architecture for
Real-Time Semantic Segmentation").

Layout of the paper (Table 1), with ``widths = (16, 64, 128)``:

  initial      3x3/2 conv (16 - C_in filters) || 2x2 max-pool, concat     H/2
  stage 1      downsampling bottleneck -> 64, 4 x regular (dropout 0.01)   H/4
  stage 2      downsampling -> 128, then regular, dilated 2, asymmetric 5,
               dilated 4, regular, dilated 8, asymmetric 5, dilated 16     H/8
  stage 3      stage 2 without the downsampling
  stage 4      upsampling bottleneck -> 64, 2 x regular                    H/4
  stage 5      upsampling bottleneck -> 16, 1 x regular                    H/2
  full conv    2x2/2 transposed conv -> num_classes                        H

Bottleneck: 1x1 projection (2x2/2 when downsampling) to features/4 -> conv
(3x3, dilated 3x3, or 5x1 then 1x5) -> 1x1 expansion, BatchNorm + PReLU between,
spatial dropout, added to the main branch; PReLU in the encoder, ReLU in the
decoder (stages 4-5), as in the paper. Downsampling main branch: 2x2 max-pool
with argmax, zero channel padding. Upsampling main branch: 1x1 conv + BN, then
max-unpooling with the indices of the matching downsampling bottleneck.
Inputs are zero-padded to a multiple of 8 and the logits cropped back.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from echo_ode_jax.segmenters._layers import (PReLU, batch_norm, max_pool_2x2_with_argmax,
                                             max_unpool_2x2, pad_to_multiple)


def _spatial_dropout(rate: float, train: bool):
  return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train or rate == 0.0)


class InitialBlock(nn.Module):
  """(B, H, W, C) -> (B, H/2, W/2, features)."""
  features: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    c_in = x.shape[-1]
    conv = nn.Conv(self.features - c_in, (3, 3), strides=2, padding="SAME",
                   use_bias=False)(x)
    pool = nn.max_pool(x, (2, 2), strides=(2, 2))
    y = jnp.concatenate([conv, pool], axis=-1)
    return PReLU()(batch_norm(train)(y))


class Bottleneck(nn.Module):
  """Regular / dilated / asymmetric bottleneck, same size in and out."""
  kind: str = "regular"  # "regular" | "dilated" | "asymmetric"
  dilation: int = 1
  asym_kernel: int = 5
  internal_ratio: int = 4
  dropout: float = 0.1
  relu: bool = False  # ReLU instead of PReLU (the paper's decoder)

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    ci = max(1, c // self.internal_ratio)

    def act(y):
      return nn.relu(y) if self.relu else PReLU()(y)

    y = nn.Conv(ci, (1, 1), use_bias=False)(x)
    y = act(batch_norm(train)(y))
    if self.kind == "asymmetric":
      k = self.asym_kernel
      y = nn.Conv(ci, (k, 1), padding="SAME", use_bias=False)(y)
      y = nn.Conv(ci, (1, k), padding="SAME", use_bias=False)(y)
    elif self.kind in ("regular", "dilated"):
      d = self.dilation if self.kind == "dilated" else 1
      y = nn.Conv(ci, (3, 3), padding="SAME", kernel_dilation=d, use_bias=False)(y)
    else:
      raise ValueError(f"unknown bottleneck kind {self.kind!r}")
    y = act(batch_norm(train)(y))
    y = nn.Conv(c, (1, 1), use_bias=False)(y)
    y = batch_norm(train)(y)
    y = _spatial_dropout(self.dropout, train)(y)
    return act(x + y)


class DownBottleneck(nn.Module):
  """(B, H, W, C) -> (B, H/2, W/2, features), plus the max-pool indices."""
  features: int
  internal_ratio: int = 4
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    ci = max(1, self.features // self.internal_ratio)
    main, idx = max_pool_2x2_with_argmax(x)
    main = jnp.pad(main, ((0, 0), (0, 0), (0, 0), (0, self.features - c)))
    y = nn.Conv(ci, (2, 2), strides=2, padding="VALID", use_bias=False)(x)
    y = PReLU()(batch_norm(train)(y))
    y = nn.Conv(ci, (3, 3), padding="SAME", use_bias=False)(y)
    y = PReLU()(batch_norm(train)(y))
    y = nn.Conv(self.features, (1, 1), use_bias=False)(y)
    y = batch_norm(train)(y)
    y = _spatial_dropout(self.dropout, train)(y)
    return PReLU()(main + y), idx


class UpBottleneck(nn.Module):
  """(B, h, w, C) -> (B, 2h, 2w, features); `indices` from the DownBottleneck."""
  features: int
  internal_ratio: int = 4
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, indices, train: bool = False):
    ci = max(1, self.features // self.internal_ratio)
    main = nn.Conv(self.features, (1, 1), use_bias=False)(x)
    main = max_unpool_2x2(batch_norm(train)(main), indices)
    y = nn.Conv(ci, (1, 1), use_bias=False)(x)
    y = nn.relu(batch_norm(train)(y))
    y = nn.ConvTranspose(ci, (3, 3), strides=(2, 2), padding="SAME", use_bias=False)(y)
    y = nn.relu(batch_norm(train)(y))
    y = nn.Conv(self.features, (1, 1), use_bias=False)(y)
    y = batch_norm(train)(y)
    y = _spatial_dropout(self.dropout, train)(y)
    return nn.relu(main + y)


# Stage 2/3 sequence of the paper: (kind, dilation).
_STAGE23 = (("regular", 1), ("dilated", 2), ("asymmetric", 1), ("dilated", 4),
            ("regular", 1), ("dilated", 8), ("asymmetric", 1), ("dilated", 16))


class ENet(nn.Module):
  """x: (B, H, W, C_in) -> logits (B, H, W, num_classes).

  widths: channels after the initial block, stage 1 and stages 2-3 (paper:
  16, 64, 128). stage1_repeats: regular bottlenecks in stage 1 (paper: 4).
  num_stage3: 1 to include stage 3 (paper), 0 to skip it.
  stage23_blocks: how many of the 8 stage-2/3 bottlenecks to use (paper: 8;
    fewer only for quick tests).
  """
  num_classes: int = 4
  widths: Sequence[int] = (16, 64, 128)
  stage1_repeats: int = 4
  num_stage3: int = 1
  stage23_blocks: int = 8
  dropout1: float = 0.01
  dropout2: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    h, w = x.shape[1:3]
    x = pad_to_multiple(x, 8)
    w0, w1, w2 = self.widths
    x = InitialBlock(w0)(x, train)
    x, idx1 = DownBottleneck(w1, dropout=self.dropout1)(x, train)
    for _ in range(self.stage1_repeats):
      x = Bottleneck("regular", dropout=self.dropout1)(x, train)
    x, idx2 = DownBottleneck(w2, dropout=self.dropout2)(x, train)
    for _ in range(1 + self.num_stage3):
      for kind, d in _STAGE23[:self.stage23_blocks]:
        x = Bottleneck(kind, dilation=d, dropout=self.dropout2)(x, train)
    x = UpBottleneck(w1, dropout=self.dropout2)(x, idx2, train)
    for _ in range(2):
      x = Bottleneck("regular", dropout=self.dropout2, relu=True)(x, train)
    x = UpBottleneck(w0, dropout=self.dropout2)(x, idx1, train)
    x = Bottleneck("regular", dropout=self.dropout2, relu=True)(x, train)
    x = nn.ConvTranspose(self.num_classes, (2, 2), strides=(2, 2))(x)
    return x[:, :h, :w]
