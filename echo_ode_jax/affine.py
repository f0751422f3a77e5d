"""A global affine velocity, the linear part of the motion (FitConfig.affine_steps).

v(x, t) = A(t) (x - c) + s b(t), with c the grid's centre and s half its
larger side, so A is a rate (1 / unit time, dimensionless in space) and b a
translation rate in half-widths per unit time: the same parameters mean the
same motion on every grid of a pyramid. A and b are given at the solver's knot
times and interpolated linearly between them. The flow of a velocity that is
affine in x is an affine map, so this term alone is the diffeomorphic
counterpart of the affine stage that classical registration (ANTs) runs
before its deformable one; it is summed with the network's velocity
(:func:`echo_ode_jax.losses.velocity`). Like the network, it does not depend
on phi.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class AffineVelocity(NamedTuple):
  """Parameters of the affine velocity (a pytree).

  a: (K, 2, 2) rate matrices at the K knot times (row, col components).
  b: (K, 2) translation rates at the knot times, half-widths per unit time.
  """
  a: jax.Array
  b: jax.Array


def init(num_knots: int) -> AffineVelocity:
  """The zero velocity at `num_knots` knot times."""
  return AffineVelocity(jnp.zeros((num_knots, 2, 2), jnp.float32),
                        jnp.zeros((num_knots, 2), jnp.float32))


def velocity(params: AffineVelocity, t, knot_times, shape_hw) -> jax.Array:
  """The affine velocity at times t on an H x W pixel grid.

  Args:
    params: :class:`AffineVelocity` at the K times `knot_times` (K,).
    t: (N,) times; values between knots are interpolated linearly (outside,
      the end values are held).
    shape_hw: (H, W).

  Returns:
    (N, H, W, 2) velocity in pixels per unit time (row, col components).
  """
  h, w = shape_hw
  kt = jnp.asarray(knot_times, jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  k = params.a.shape[0]
  coef = jnp.concatenate([params.a.reshape(k, 4), params.b], axis=1)      # (K, 6)
  coef = jax.vmap(lambda c: jnp.interp(t, kt, c), in_axes=1, out_axes=1)(coef)
  a, b = coef[:, :4].reshape(-1, 2, 2), coef[:, 4:]
  rows = jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2
  cols = jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2
  x = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), -1)             # (H, W, 2)
  s = max(h, w) / 2
  return jnp.einsum("nij,hwj->nhwi", a, x) + s * b[:, None, None, :]
