"""A free-form velocity on a control grid, optimised directly (FitConfig.dense_steps).

v(x, t) = s U(x / f, t): U is given at the solver's K knot times on a control
grid of ceil(H / f) x ceil(W / f) points, interpolated linearly in time and
bilinearly in space (jax.image.resize's half-pixel convention: the control
grid and the fit grid share their outer edges, so x / f holds exactly when f
divides H and W), with s half the grid's larger side,
so U is in half-widths per unit time and the same parameters mean the same
motion on every grid. It is the parameterisation of classical registration
(ANTs SyN, demons, ConvexAdam's instance optimisation: the field itself is the
unknown), fitted as the last stage after the network(s), which are then held
fixed, and summed with their velocity (:func:`echo_ode_jax.losses.velocity`):
it refines the flow the networks found. Like the network, it does not depend
on phi. FitConfig.velocity_sigma smooths the summed velocity, this field
included.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from echo_ode_jax import flow


class DenseVelocity(NamedTuple):
  """Parameters of the free-form velocity (a pytree).

  u: (K, h, w, 2) velocity at the K knot times on the control grid, (row, col)
    components in half-widths per unit time.
  """
  u: jax.Array


def init(num_knots: int, shape_hw, factor: int) -> DenseVelocity:
  """The zero velocity at `num_knots` knot times on the control grid of an
  H x W pixel grid (`shape_hw`) coarsened by `factor`."""
  h, w = (math.ceil(int(s) / factor) for s in shape_hw)
  return DenseVelocity(jnp.zeros((num_knots, h, w, 2), jnp.float32))


def velocity(params: DenseVelocity, t, knot_times, shape_hw) -> jax.Array:
  """The velocity at times t on an H x W pixel grid.

  Args:
    params: :class:`DenseVelocity` at the K times `knot_times` (K,).
    t: (N,) times; between knots U is interpolated linearly (outside, the end
      values are held).
    shape_hw: (H, W).

  Returns:
    (N, H, W, 2) velocity in pixels per unit time (row, col components).
  """
  h, w = (int(s) for s in shape_hw)
  kt = jnp.asarray(knot_times, jnp.float32)
  u = jax.vmap(lambda ti: flow.interp_knots(params.u, kt, ti))(jnp.asarray(t, jnp.float32))
  u = jax.image.resize(u, (u.shape[0], h, w, 2), "linear")
  return u * (max(h, w) / 2)
