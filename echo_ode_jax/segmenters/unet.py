"""U-Net (Ronneberger et al. 2015) as used on CAMUS (Leclerc et al. 2019).

Each level: `convs_per_level` x (3x3 conv -> BatchNorm -> ReLU); 2x2 max-pool
down, 2x2 stride-2 transposed conv up, skip concatenation, 1x1 conv to logits.
``widths`` gives the channels per level, the last one being the bottleneck;
``len(widths) - 1`` poolings. Inputs whose size does not divide by
``2 ** (len(widths) - 1)`` are zero-padded at the bottom/right and the logits
cropped back.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from echo_ode_jax.segmenters._layers import ConvBN, pad_to_multiple


class ConvBlock(nn.Module):
  """n x (3x3 conv -> [BN] -> ReLU). With use_bn=False the convs have biases."""
  features: int
  num_convs: int = 2
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    for _ in range(self.num_convs):
      if self.use_bn:
        x = ConvBN(self.features)(x, train)
      else:
        x = nn.relu(nn.Conv(self.features, (3, 3), padding="SAME")(x))
    return x


class UNet(nn.Module):
  """x: (B, H, W, C_in) -> logits (B, H, W, num_classes)."""
  num_classes: int = 4
  widths: Sequence[int] = (16, 32, 64, 128, 256)
  convs_per_level: int = 2
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    h, w = x.shape[1:3]
    x = pad_to_multiple(x, 2 ** (len(self.widths) - 1))
    skips = []
    for f in self.widths[:-1]:
      x = ConvBlock(f, self.convs_per_level, self.use_bn)(x, train)
      skips.append(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = ConvBlock(self.widths[-1], self.convs_per_level, self.use_bn)(x, train)
    for f, skip in zip(reversed(self.widths[:-1]), reversed(skips)):
      x = nn.ConvTranspose(f, (2, 2), strides=(2, 2))(x)
      x = jnp.concatenate([skip, x], axis=-1)
      x = ConvBlock(f, self.convs_per_level, self.use_bn)(x, train)
    x = nn.Conv(self.num_classes, (1, 1))(x)
    return x[:, :h, :w]

