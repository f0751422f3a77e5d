"""Segmentation losses and batch Dice of the 2D segmenters (JAX, jit-able).

logits: (B, H, W, C) float, C = 4 classes (background, LV cavity, myocardium,
LA); labels: (B, H, W) int, 255 marks pixels without annotation, which every
function here ignores. Losses are unitless (Dice in [0, 1], cross-entropy in
nats per pixel).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from echo_ode_jax.data.hdf5 import UNANNOTATED
from echo_ode_jax.metrics._dice import LABEL_STRUCTURES

# Structures scored by the validation Dice: name -> labels forming it.
STRUCTURES = LABEL_STRUCTURES


def dice_terms(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Soft-Dice sums over the batch: (intersection (C,), sum of sizes (C,)).

  Pixels labelled 255 are ignored.
  """
  c = logits.shape[-1]
  valid = (labels != UNANNOTATED)[..., None].astype(logits.dtype)
  onehot = jax.nn.one_hot(labels, c, dtype=logits.dtype) * valid
  probs = jax.nn.softmax(logits, axis=-1) * valid
  inter = jnp.sum(probs * onehot, axis=(0, 1, 2))
  sizes = jnp.sum(probs, axis=(0, 1, 2)) + jnp.sum(onehot, axis=(0, 1, 2))
  return inter, sizes


def dice_loss_from_terms(inter, sizes, smooth: float = 1.0):
  """1 - mean soft Dice of the foreground classes (1..C-1)."""
  dice = (2.0 * inter + smooth) / (sizes + smooth)
  return 1.0 - jnp.mean(dice[1:])


def ce_terms(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of pixel cross-entropies, number of annotated pixels)."""
  valid = labels != UNANNOTATED
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  return jnp.sum(ce * valid), jnp.sum(valid).astype(logits.dtype)


def segmentation_loss(logits: jax.Array, labels: jax.Array, loss: str = "dice_ce"
                      ) -> jax.Array:
  """Batch soft-Dice loss over the foreground classes (+ mean cross-entropy).

  logits: (B, H, W, C); labels: (B, H, W) int, 255 ignored.
  """
  if loss not in ("dice", "dice_ce"):
    raise ValueError(f"loss must be 'dice' or 'dice_ce', got {loss!r}")
  out = dice_loss_from_terms(*dice_terms(logits, labels))
  if loss == "dice_ce":
    s, n = ce_terms(logits, labels)
    out = out + s / jnp.maximum(n, 1.0)
  return out


def hard_dice(pred, gt, labels: Sequence[int]):
  """Dice of the structure made of `labels`, per sample: pred, gt (..., H, W) -> (...).

  Pixels where gt == 255 are ignored; 1.0 when the structure is absent from both.
  Works on numpy and jax arrays.
  """
  xp = jnp if isinstance(pred, jax.Array) or isinstance(gt, jax.Array) else np
  valid = gt != UNANNOTATED
  a = xp.isin(pred, xp.asarray(labels)) & valid
  b = xp.isin(gt, xp.asarray(labels)) & valid
  inter = xp.sum(a & b, axis=(-2, -1))
  size = xp.sum(a, axis=(-2, -1)) + xp.sum(b, axis=(-2, -1))
  return xp.where(size > 0, 2.0 * inter / xp.maximum(size, 1), 1.0)
