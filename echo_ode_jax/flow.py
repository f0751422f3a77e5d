"""The flow: integrate dphi/dt = V(phi, t) with diffrax from velocity knots.

The velocity network V_theta(I_t, m_0, t) does not depend on the state phi, so it
is evaluated once, in one batched call, at every time a fixed-step solver visits
(:func:`knot_times`). The vector field given to diffrax linearly interpolates
these velocity *knots* in time and samples the result at phi with the warp
kernel. With Euler and dt = 0.1 this is exactly the paper's model.

Conventions:
  * knots: (K, H, W, 2) velocities in pixels per unit time, (row, col) order.
  * knot_times: (K,) increasing times in [0, 1].
  * phi: (H, W, 2) absolute (row, col) pixel positions; phi_t(p) is the point
    reached at time t by the trajectory that starts at pixel p (phi_0 = id).
  * The segmentation is propagated as m_t = m_0 o phi_t (see ``warp``).
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from echo_ode_jax.kernels import identity_grid, warp

# Stage times (fractions of dt) at which each fixed-step solver evaluates V.
_STAGES = {
    "euler": (0.0,),
    "heun": (0.0, 1.0),
    "midpoint": (0.0, 0.5),
    "ralston": (0.0, 2.0 / 3.0),
    "rk4": (0.0, 0.5, 1.0),
}
SOLVERS = tuple(_STAGES) + ("tsit5", "dopri5")
ADAPTIVE = ("tsit5", "dopri5")


def _solver(name: str):
  name = name.lower()
  table = {
      "euler": diffrax.Euler, "heun": diffrax.Heun, "midpoint": diffrax.Midpoint,
      "ralston": diffrax.Ralston, "rk4": RK4, "tsit5": diffrax.Tsit5,
      "dopri5": diffrax.Dopri5,
  }
  if name not in table:
    raise ValueError(f"unknown solver {name!r}; choose from {SOLVERS}")
  return table[name]()


class RK4(diffrax.AbstractERK):
  """Classical 4th-order Runge-Kutta (fixed step; no embedded error estimate)."""

  tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
      c=np.array([0.5, 0.5, 1.0]),
      b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
      b_error=np.zeros(4),
      a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
  )
  term_structure: ClassVar = diffrax.AbstractTerm
  interpolation_cls: ClassVar[Callable[..., diffrax.AbstractLocalInterpolation]] = (
      diffrax.ThirdOrderHermitePolynomialInterpolation.from_k)

  def order(self, terms):
    del terms
    return 4


def num_steps(t0: float, t1: float, dt: float) -> int:
  """Number of fixed steps of size dt from t0 to t1 (the last may be shorter)."""
  n = abs(t1 - t0) / dt
  return max(1, int(math.ceil(n - 1e-6)))


def knot_times(solver: str = "euler", dt: float = 0.1, t0: float = 0.0,
               t1: float = 1.0) -> np.ndarray:
  """Times at which a fixed-step `solver` evaluates the vector field on [t0, t1].

  Evaluate the network at exactly these times in one batched call; the flow's
  time interpolation is then exact at every stage. Adaptive solvers have no
  fixed stages: they get a uniform grid of spacing dt (knots are interpolated).

  Returns:
    (K,) sorted float32 times.
  """
  solver = solver.lower()
  n = num_steps(t0, t1, dt)
  edges = np.minimum(t0 + dt * np.arange(n + 1), t1)
  if solver in ADAPTIVE:
    return edges.astype(np.float32)
  if solver not in _STAGES:
    raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
  ts = []
  for a, b in zip(edges[:-1], edges[1:]):
    ts.extend(a + s * (b - a) for s in _STAGES[solver])
  ts = np.unique(np.round(np.asarray(ts, np.float64), 9))
  return ts.astype(np.float32)


def interp_knots(knots: Float[Array, "K H W 2"], times: Float[Array, "K"], t
                 ) -> Float[Array, "H W 2"]:
  """Piecewise-linear interpolation of the knots in time (constant outside)."""
  k = knots.shape[0]
  if k == 1:
    return knots[0]
  t = jnp.clip(t, times[0], times[-1])
  i = jnp.clip(jnp.searchsorted(times, t, side="right") - 1, 0, k - 2)
  t_lo = times[i]
  t_hi = times[i + 1]
  w = jnp.clip((t - t_lo) / jnp.maximum(t_hi - t_lo, 1e-12), 0.0, 1.0)
  lo = jax.lax.dynamic_index_in_dim(knots, i, 0, keepdims=False)
  hi = jax.lax.dynamic_index_in_dim(knots, i + 1, 0, keepdims=False)
  return lo + w.astype(knots.dtype) * (hi - lo)


def velocity_field(t, phi, args):
  """diffrax vector field: V(t) interpolated from the knots, sampled at phi."""
  knots, times = args
  v = interp_knots(knots, times, t)
  return warp(v, phi, padding="border", image_grad=True)


def _solve(vector_field, args, y0, t0, t1, save_times, solver, dt, max_steps, rtol, atol):
  solver_obj = _solver(solver)
  adaptive = solver.lower() in ADAPTIVE
  if adaptive:
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    steps = max_steps or 4096
  else:
    controller = diffrax.ConstantStepSize()
    # The true number of steps: diffrax's checkpointed adjoint sizes its memory
    # from max_steps, so a loose bound would waste memory.
    steps = num_steps(t0, t1, dt)
  dt0 = dt if t1 >= t0 else -dt
  # Fixed steps: the solver's dense output evaluated at save_times, which is
  # the interpolation SaveAt(ts) uses (the same maps, forward and backward in
  # time: tests/test_flow.py). SaveAt(ts) with traced save_times adds
  # diffrax's runtime checks of them as host callbacks, and XLA never writes a
  # program with a host callback to the persistent compilation cache
  # (echo_ode_jax.jit_cache). Adaptive solvers keep SaveAt(ts): their dense
  # output would be stored for every one of max_steps.
  saveat = diffrax.SaveAt(ts=save_times) if adaptive else diffrax.SaveAt(dense=True)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), solver_obj, t0=t0, t1=t1, dt0=dt0, y0=y0,
      args=args, saveat=saveat,
      stepsize_controller=controller, max_steps=steps,
      # Discretise-then-optimise: exact gradients of the discrete solve, which
      # is what the paper's Euler model is. With checkpoints = the number of
      # steps every step is stored once and nothing is recomputed (10 steps are
      # cheap to store). BacksolveAdjoint is avoided: it re-integrates the ODE
      # backwards, which gives inexact gradients for a coarse Euler solve.
      adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=steps),
      throw=False,
  )
  return sol.ys if adaptive else jax.vmap(sol.evaluate)(save_times)


def _t1(save_times, t1):
  if t1 is not None:
    return float(t1)
  try:
    return float(np.max(np.asarray(save_times)))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return 1.0


def integrate_flow(knots: Float[Array, "K H W 2"], knot_times, save_times,
                   solver: str = "euler", dt: float = 0.1, *, t1: float | None = None,
                   rtol: float = 1e-4, atol: float = 1e-3, max_steps: int | None = None,
                   ) -> Float[Array, "S H W 2"]:
  """Integrates dphi/dt = V(phi, t) from phi_0 = id and returns phi at save_times.

  Args:
    knots: (K, H, W, 2) velocities in pixels per unit time at `knot_times`.
    knot_times: (K,) increasing times in [0, 1].
    save_times: (S,) times in [0, t1] at which to return phi (frame times).
    solver: "euler" (default, as the paper), "heun", "midpoint", "ralston",
      "rk4", or adaptive "tsit5" / "dopri5".
    dt: step size (initial step for adaptive solvers), in units of time.
    t1: end of integration; default max(save_times) if static, else 1.0.

  Returns:
    phi: (S, H, W, 2) absolute (row, col) positions phi_t(p) in pixels.
  """
  knots = jnp.asarray(knots)
  if knots.ndim != 4 or knots.shape[-1] != 2:
    raise ValueError(f"integrate_flow: knots must be (K, H, W, 2), got {knots.shape}")
  knot_times = jnp.asarray(knot_times, knots.dtype)
  save_times = jnp.asarray(save_times, knots.dtype)
  h, w = knots.shape[1:3]
  y0 = identity_grid(h, w, knots.dtype)
  return _solve(velocity_field, (knots, knot_times), y0, 0.0, _t1(save_times, t1),
                save_times, solver, dt, max_steps, rtol, atol)


def integrate_flow_inloop(velocity_fn, shape_hw, save_times, solver: str = "euler",
                          dt: float = 0.1, *, t1: float | None = None, rtol: float = 1e-4,
                          atol: float = 1e-3, max_steps: int | None = None,
                          ) -> Float[Array, "S H W 2"]:
  """Reference formulation: the velocity function is called inside the solver.

  velocity_fn(t) -> (H, W, 2) velocity at time t (e.g. the network). With
  Euler and knots at :func:`knot_times` this equals :func:`integrate_flow`,
  but evaluates the network once per stage inside the loop (slow).
  """
  h, w = shape_hw
  y0 = identity_grid(h, w, jnp.float32)
  vf = lambda t, phi, args: warp(velocity_fn(t), phi, padding="border", image_grad=True)
  return _solve(vf, None, y0, 0.0, _t1(save_times, t1),
                jnp.asarray(save_times, jnp.float32), solver, dt, max_steps, rtol, atol)


def inverse_flow(knots: Float[Array, "K H W 2"], knot_times, t, solver: str = "euler",
                 dt: float = 0.1, **kw) -> Float[Array, "... H W 2"]:
  """phi_t^{-1}: integrates -V backwards in time from t to 0, from the identity.

  t: one time, or (S,) times (either may be traced); returns (H, W, 2) or
  (S, H, W, 2) absolute (row, col) positions. Each inverse is integrated in
  the rescaled time s = tau / t, from s = 1 to 0 (dX/ds = t V(X, t s)), in
  steps of dt in s: 1/dt steps for every t. phi_t(inverse_flow(...)(p)) ~= p
  up to the discretisation error.
  """
  knots = jnp.asarray(knots)
  times = jnp.asarray(knot_times, knots.dtype)
  t = jnp.asarray(t, knots.dtype)
  y0 = identity_grid(*knots.shape[1:3], knots.dtype)
  field = lambda s, phi, args: args[2] * velocity_field(args[2] * s, phi, args[:2])

  def one(tk):
    return _solve(field, (knots, times, tk), y0, 1.0, 0.0, jnp.zeros((1,), knots.dtype),
                  solver, dt, kw.get("max_steps"), kw.get("rtol", 1e-4),
                  kw.get("atol", 1e-3))[0]

  return one(t) if t.ndim == 0 else jax.vmap(one)(t)


def invert_map(phi: Float[Array, "H W 2"], iters: int = 50) -> Float[Array, "H W 2"]:
  """psi = phi^{-1} on phi's grid, so that phi(psi(p)) = p.

  Fixed-point iterations psi <- psi - (phi(psi) - p) from psi = 2 id - phi
  (the first-order inverse), phi sampled bilinearly with border clamping;
  the error shrinks by |I - D phi| per iteration, so this converges where the
  map neither folds nor stretches by more than 2. Where psi(p) falls outside
  the grid (p not reached by phi) the border's value is used.
  """
  h, w = phi.shape[:2]
  x = identity_grid(h, w, phi.dtype)
  return jax.lax.fori_loop(0, iters, lambda _, psi: psi - (warp(phi, psi) - x), 2 * x - phi)


def compose(u: Float[Array, "H W 2"], v: Float[Array, "H W 2"]) -> Float[Array, "H W 2"]:
  """Displacement of (id + u) o (id + v): x -> x + v(x) + u(x + v(x)).

  u, v: (H, W, 2) displacement fields in pixels, (row, col). u is sampled
  bilinearly with border clamping.
  """
  h, w = v.shape[:2]
  return v + warp(u, identity_grid(h, w, v.dtype) + v)


def compose_maps(phi_a: Float[Array, "H W 2"], phi_b: Float[Array, "H W 2"]
                 ) -> Float[Array, "H W 2"]:
  """Absolute maps: (phi_a o phi_b)(p) = phi_a(phi_b(p))."""
  return warp(phi_a, phi_b)


def displacement(phi: Float[Array, "... H W 2"]) -> Float[Array, "... H W 2"]:
  """phi - id, in pixels."""
  h, w = phi.shape[-3:-1]
  return phi - identity_grid(h, w, phi.dtype)


def resample_map(phi: Float[Array, "... h w 2"], shape_hw) -> Float[Array, "... H W 2"]:
  """An absolute map on an h x w grid expressed on an H x W grid of the same field of view.

  Pixel centres are aligned (x_small = (x_big + 0.5) s - 0.5 with s = h / H per
  axis). The displacement phi - id is interpolated bilinearly at the big
  grid's pixel centres (clamped at the border) and scaled to big-grid pixels,
  so the identity stays the identity everywhere and an affine map stays the
  same affine map of the plane away from the border.
  """
  h, w = phi.shape[-3:-1]
  big_h, big_w = (int(s) for s in shape_hw)
  if (h, w) == (big_h, big_w):
    return phi
  u = jax.image.resize(displacement(phi), phi.shape[:-3] + (big_h, big_w, 2), "linear")
  scale = jnp.asarray([big_h / h, big_w / w], phi.dtype)
  return identity_grid(big_h, big_w, phi.dtype) + u * scale
