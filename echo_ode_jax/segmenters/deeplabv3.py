"""DeepLabv3 (Chen et al. 2017) with a ResNet backbone, atrous convolution and
ASPP; optionally the DeepLabv3+ decoder (Chen et al. 2018, the paper's ref. [12]).

Backbone: ResNet-18/34 (basic blocks) or ResNet-50 (bottleneck blocks), stem
7x7/2 conv + 3x3/2 max-pool, four stages of widths ``base_width * (1, 2, 4, 8)``
(x4 for ResNet-50). For ``output_stride`` 16 (8) the stride of stage 4 (3 and 4)
is replaced by dilation 2 (2 and 4), as in the paper.
ASPP: a 1x1 conv, three 3x3 atrous convs (rates ``aspp_rates``; default
(6, 12, 18) at output stride 16, doubled at 8), and image-level pooling, each
-> BN -> ReLU; concatenated, 1x1 conv, BN, ReLU, dropout.
Head: with ``decoder`` the ASPP output is upsampled to stride 4 and concatenated
with the reduced (48-channel-equivalent) stage-1 features, then two 3x3 convs;
without it a single 3x3 conv. A 1x1 conv gives logits, bilinearly resized to
the input size.

The default (ResNet-18 at half width, output stride 16, 128 ASPP channels,
decoder on) is sized to train on a 2-core CPU; ``base_width=64,
aspp_features=256`` is the full-size network.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from echo_ode_jax.segmenters._layers import ConvBN, pad_to_multiple

DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3))}


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  dilation: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = ConvBN(self.features, strides=self.strides, dilation=self.dilation)(x, train)
    y = ConvBN(self.features, dilation=self.dilation, relu=False)(y, train)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = ConvBN(self.features, (1, 1), strides=self.strides, relu=False)(x, train)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  features: int  # inner width; output is 4x
  strides: int = 1
  dilation: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    out = 4 * self.features
    y = ConvBN(self.features, (1, 1))(x, train)
    y = ConvBN(self.features, strides=self.strides, dilation=self.dilation)(y, train)
    y = ConvBN(out, (1, 1), relu=False)(y, train)
    if self.strides != 1 or x.shape[-1] != out:
      x = ConvBN(out, (1, 1), strides=self.strides, relu=False)(x, train)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Dilated ResNet. Returns (stride-4 features, final features)."""
  depth: int = 18
  base_width: int = 64
  output_stride: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in DEPTHS:
      raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {self.depth}")
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
    kind, reps = DEPTHS[self.depth]
    block = BasicBlock if kind == "basic" else BottleneckBlock
    x = ConvBN(self.base_width, (7, 7), strides=2)(x, train)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    stride, dilation, low = 4, 1, None
    for i, n in enumerate(reps):
      s = 1 if i == 0 else 2
      if stride * s > self.output_stride:
        dilation, s = dilation * s, 1
      stride *= s
      for j in range(n):
        x = block(self.base_width * 2 ** i, strides=s if j == 0 else 1,
                  dilation=dilation)(x, train)
      if i == 0:
        low = x
    return low, x


class ASPP(nn.Module):
  features: int = 256
  rates: Sequence[int] = (6, 12, 18)
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    branches = [ConvBN(self.features, (1, 1))(x, train)]
    for r in self.rates:
      branches.append(ConvBN(self.features, dilation=r)(x, train))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = ConvBN(self.features, (1, 1))(pooled, train)
    branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (self.features,)))
    y = ConvBN(self.features, (1, 1))(jnp.concatenate(branches, axis=-1), train)
    return nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(y)


def _resize(x, hw):
  return jax.image.resize(x, (x.shape[0], hw[0], hw[1], x.shape[-1]), "bilinear")


class DeepLabV3(nn.Module):
  """x: (B, H, W, C_in) -> logits (B, H, W, num_classes)."""
  num_classes: int = 4
  depth: int = 18
  base_width: int = 32
  output_stride: int = 16
  aspp_features: int = 128
  aspp_rates: Sequence[int] | None = None
  decoder: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    h, w = x.shape[1:3]
    x = pad_to_multiple(x, self.output_stride)
    rates = self.aspp_rates
    if rates is None:
      rates = tuple(r * 16 // self.output_stride for r in (6, 12, 18))
    low, y = ResNet(self.depth, self.base_width, self.output_stride)(x, train)
    y = ASPP(self.aspp_features, rates)(y, train)
    if self.decoder:
      y = _resize(y, low.shape[1:3])
      low = ConvBN(max(8, self.aspp_features * 3 // 16), (1, 1))(low, train)
      y = jnp.concatenate([y, low], axis=-1)
      y = ConvBN(self.aspp_features)(y, train)
    y = ConvBN(self.aspp_features)(y, train)
    y = nn.Conv(self.num_classes, (1, 1))(y)
    y = _resize(y, x.shape[1:3])
    return y[:, :h, :w]
