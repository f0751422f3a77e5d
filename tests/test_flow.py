"""The diffrax flow against analytic solutions and a hand-written Euler loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import echo_ode_jax as eo
from echo_ode_jax import flow


def _grid(h, w):
  return np.stack(np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                              indexing="ij"), -1)


def _stationary_knots(v, solver="euler", dt=0.1):
  ts = flow.knot_times(solver, dt)
  return np.broadcast_to(v, (len(ts),) + v.shape).astype(np.float32), ts


def test_knot_times_are_solver_stage_times():
  np.testing.assert_allclose(flow.knot_times("euler", 0.1), np.arange(10) / 10, atol=1e-7)
  np.testing.assert_allclose(flow.knot_times("heun", 0.25), [0, .25, .5, .75, 1], atol=1e-7)
  np.testing.assert_allclose(flow.knot_times("rk4", 0.5), [0, .25, .5, .75, 1], atol=1e-7)
  np.testing.assert_allclose(flow.knot_times("midpoint", 0.5), [0, .25, .5, .75], atol=1e-7)
  assert flow.num_steps(0, 1, 0.1) == 10 and flow.num_steps(0, 1, 0.3) == 4


def test_constant_velocity_is_exact_translation():
  h, w = 16, 20
  u = np.array([1.5, -2.25])
  knots, ts = _stationary_knots(np.broadcast_to(u, (h, w, 2)))
  save = np.linspace(0, 1, 6)
  phi = np.asarray(eo.integrate_flow(knots, ts, save))
  expect = _grid(h, w)[None] + save[:, None, None, None] * u
  np.testing.assert_allclose(phi, expect, atol=1e-5)


def _rotation_error(solver, dt, omega=1.0, n=48):
  c = (n - 1) / 2
  g = _grid(n, n)
  # dp/dt = omega * J (p - c), J = [[0, -1], [1, 0]] in (row, col): a rigid rotation.
  v = omega * np.stack([-(g[..., 1] - c), g[..., 0] - c], -1)
  knots, ts = _stationary_knots(v, solver, dt)
  phi = np.asarray(eo.integrate_flow(knots, ts, [1.0], solver=solver, dt=dt))[0]
  th = omega
  rot = np.stack([c + np.cos(th) * (g[..., 0] - c) - np.sin(th) * (g[..., 1] - c),
                  c + np.sin(th) * (g[..., 0] - c) + np.cos(th) * (g[..., 1] - c)], -1)
  inside = np.hypot(g[..., 0] - c, g[..., 1] - c) < 0.4 * n
  return np.max(np.linalg.norm(phi - rot, axis=-1)[inside])


@pytest.mark.parametrize("solver,order", [("euler", 1.0), ("heun", 2.0)])
def test_rotation_converges_at_solver_order(solver, order):
  errs = [_rotation_error(solver, dt) for dt in (0.1, 0.05, 0.025)]
  rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
  assert errs[0] > errs[1] > errs[2]
  np.testing.assert_allclose(rates, order, atol=0.25)


def test_rk4_and_adaptive_are_accurate_on_rotation():
  assert _rotation_error("rk4", 0.1) < 1e-3
  assert _rotation_error("tsit5", 0.1) < 5e-3


def _smooth_random_velocity(rng, k, h, w, amp):
  v = rng.normal(size=(k, h, w, 2))
  v = ndimage.gaussian_filter(v, (0, 6, 6, 0), mode="nearest")
  return (amp * v / np.abs(v).max()).astype(np.float32)


def test_euler_matches_hand_written_loop_with_time_varying_knots(rng):
  """Time-varying knots: diffrax Euler equals a numpy Euler loop with scipy sampling."""
  h, w = 20, 24
  ts = flow.knot_times("euler", 0.1)
  knots = _smooth_random_velocity(rng, len(ts), h, w, amp=6.0)
  save = np.array([0.0, 0.3, 0.55, 1.0])
  phi = np.asarray(eo.integrate_flow(knots, ts, save))
  p = _grid(h, w)
  traj = [p.copy()]
  for n in range(10):
    v = np.stack([ndimage.map_coordinates(knots[n, ..., k].astype(np.float64),
                                          np.moveaxis(p, -1, 0), order=1, mode="nearest")
                  for k in range(2)], -1)
    p = p + 0.1 * v
    traj.append(p.copy())
  for s, t in enumerate(save):
    n0 = min(int(np.floor(t / 0.1 + 1e-9)), 9)
    a = (t - 0.1 * n0) / 0.1   # Euler's dense output is linear between steps
    expect = (1 - a) * traj[n0] + a * traj[n0 + 1]
    np.testing.assert_allclose(phi[s], expect, atol=2e-4)


def test_forward_then_inverse_is_identity(rng):
  h, w = 32, 32
  ts = flow.knot_times("heun", 0.02)
  knots = _smooth_random_velocity(rng, len(ts), h, w, amp=3.0)
  phi = eo.integrate_flow(knots, ts, [0.7], solver="heun", dt=0.02)[0]
  inv = eo.inverse_flow(knots, ts, 0.7, solver="heun", dt=0.02)
  both = np.asarray(eo.compose_maps(phi, inv))
  err = np.linalg.norm(both - _grid(h, w), axis=-1)[4:-4, 4:-4]
  assert err.max() < 0.05, err.max()


def test_smooth_velocity_with_small_dt_has_no_folding(rng):
  h, w = 40, 40
  ts = flow.knot_times("euler", 0.02)
  knots = _smooth_random_velocity(rng, len(ts), h, w, amp=8.0)
  phi = eo.integrate_flow(knots, ts, np.linspace(0, 1, 6), dt=0.02)
  det = np.asarray(jax.vmap(eo.jacobian_determinant)(phi))
  assert det.min() > 0


def test_uniform_contraction_area_ratio_equals_determinant():
  """V = -k (p - c): phi_t is a uniform scaling by s = (1 - k dt)^n (Euler, exactly)."""
  n, k, t = 64, 0.5, 1.0
  c = (n - 1) / 2
  g = _grid(n, n)
  knots, ts = _stationary_knots(-k * (g - c))
  phi = np.asarray(eo.integrate_flow(knots, ts, [t]))[0]
  s = (1 - k * 0.1) ** 10
  np.testing.assert_allclose(phi, c + s * (g - c), atol=1e-4)
  det = np.asarray(eo.jacobian_determinant(jnp.asarray(phi)))
  np.testing.assert_allclose(det, s * s, rtol=1e-4)
  # A disc of radius R: m_t = m_0 o phi_t is a disc of radius R / s, so the
  # pulled-back area ratio area(m_0) / area(m_t) equals det.
  radius = 12.0
  disc = (np.hypot(g[..., 0] - c, g[..., 1] - c) <= radius).astype(np.int32)
  soft = np.asarray(eo.warp_labels(disc, phi, num_classes=2))[..., 1]
  area0 = np.pi * radius**2
  np.testing.assert_allclose(area0 / soft.sum(), s * s, rtol=0.02)


def test_jit_vmap_over_batch_matches_loop(rng):
  h, w = 16, 16
  ts = flow.knot_times("euler", 0.1)
  batch = np.stack([_smooth_random_velocity(rng, len(ts), h, w, 4.0) for _ in range(3)])
  save = np.linspace(0, 1, 4)
  f = jax.jit(jax.vmap(lambda kn: eo.integrate_flow(kn, ts, save)))
  out = np.asarray(f(batch))
  for b in range(3):
    np.testing.assert_allclose(out[b], eo.integrate_flow(batch[b], ts, save), atol=1e-5)


def test_compose_displacements_of_translations():
  h, w = 12, 12
  u = np.broadcast_to(np.array([1.0, 2.0], np.float32), (h, w, 2))
  v = np.broadcast_to(np.array([-3.0, 0.5], np.float32), (h, w, 2))
  np.testing.assert_allclose(eo.compose(u, v), u + v, atol=1e-6)


def test_gradient_through_flow_matches_finite_differences(rng):
  """d(loss)/d(knots) through diffrax + the warp VJP, checked in float64."""
  h, w = 8, 9
  ts = flow.knot_times("euler", 0.25)
  knots = _smooth_random_velocity(rng, len(ts), h, w, amp=2.0).astype(np.float64)
  target = rng.normal(size=(h, w, 2))
  with jax.enable_x64(True):
    f = jax.jit(lambda kn: jnp.sum((eo.integrate_flow(kn, ts, [1.0], dt=0.25)[0] - target)
                                   ** 2))
    kn = jnp.asarray(knots)
    g = np.asarray(jax.grad(f)(kn))
    eps = 1e-6
    for idx in [tuple(rng.integers(0, s) for s in knots.shape) for _ in range(12)]:
      e = np.zeros(knots.shape)
      e[idx] = eps
      fd = (f(kn + e) - f(kn - e)) / (2 * eps)
      np.testing.assert_allclose(g[idx], fd, atol=1e-5, rtol=1e-5)


# Euler's dense output is linear, Heun's (as midpoint's and Ralston's) a cubic
# Hermite, and the project's RK4 (flow.RK4) has its own.
@pytest.mark.parametrize("solver", ["euler", "heun", "rk4"])
@pytest.mark.parametrize("backward", [False, True])
def test_fixed_step_save_times_match_diffrax_saveat_ts(rng, solver, backward):
  """Fixed-step solves are read from diffrax's dense output at the save times;
  diffrax's own SaveAt(ts) gives the same maps, traced save times included."""
  import diffrax
  knots = jnp.asarray(rng.normal(0, 2, (10, 12, 14, 2)), jnp.float32)
  kt = jnp.linspace(0.0, 0.9, 10)
  ts = jnp.asarray([0.0, 0.13, 0.5, 0.77, 1.0, 1.0], jnp.float32)
  t0, t1 = (1.0, 0.0) if backward else (0.0, 1.0)
  save = 1.0 - ts if backward else ts
  y0 = eo.identity_grid(12, 14)

  @jax.jit
  def ours(save):
    return flow._solve(flow.velocity_field, (knots, kt), y0, t0, t1, save, solver, 0.1,
                       None, 1e-4, 1e-3)

  @jax.jit
  def theirs(save):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(flow.velocity_field), flow._solver(solver), t0=t0, t1=t1,
        dt0=-0.1 if backward else 0.1, y0=y0, args=(knots, kt),
        saveat=diffrax.SaveAt(ts=save), stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=10, throw=False).ys

  np.testing.assert_allclose(ours(save), theirs(save), rtol=0, atol=1e-5)


def test_resample_map_keeps_an_affine_map_of_the_plane():
  """phi(x) = A x + b on a 12 x 10 grid, resampled to 36 x 25: in big-grid pixels
  the same map is x_big -> (A x_s + b + 0.5) / s - 0.5 with x_s the small-grid
  position of x_big (hand-derived), away from the clamped border."""
  a = np.array([[0.9, 0.1], [-0.05, 1.1]])
  b = np.array([0.7, -0.4])
  h, w, big_h, big_w = 12, 10, 36, 25
  s = np.array([h / big_h, w / big_w])
  grid = lambda hh, ww: np.stack(np.meshgrid(np.arange(hh, dtype=np.float64),
                                             np.arange(ww, dtype=np.float64),
                                             indexing="ij"), -1)
  phi = grid(h, w) @ a.T + b
  got = np.asarray(flow.resample_map(jnp.asarray(phi, jnp.float32), (big_h, big_w)))
  xs = (grid(big_h, big_w) + 0.5) * s - 0.5
  want = (xs @ a.T + b + 0.5) / s - 0.5
  inner = (slice(2, -2), slice(2, -2))
  assert got.shape == (big_h, big_w, 2)
  np.testing.assert_allclose(got[inner], want[inner], atol=1e-4)
  # The identity stays the identity, up to the border.
  ident = np.asarray(flow.resample_map(jnp.asarray(grid(h, w), jnp.float32), (big_h, big_w)))
  np.testing.assert_allclose(ident, grid(big_h, big_w), atol=1e-4)


def test_inverse_flow_at_traced_times(rng):
  """(S,) times, traced under jit: a constant velocity c gives x - t c exactly
  (t = 0: the identity); a smooth one, maps that invert phi_t at every t."""
  h, w = 24, 24
  ts = flow.knot_times("euler", 0.1)
  times = jnp.asarray([0.0, 0.35, 1.0])
  c = np.asarray([1.5, -2.0], np.float32)
  inv = jax.jit(lambda k, t: eo.inverse_flow(k, ts, t))
  const = np.asarray(inv(jnp.broadcast_to(jnp.asarray(c), (len(ts), h, w, 2)), times))
  want = _grid(h, w)[None] - np.asarray(times)[:, None, None, None] * c
  inside = (want[..., 0] >= 0) & (want[..., 0] <= h - 1) & (want[..., 1] >= 0) & (want[..., 1] <= w - 1)
  np.testing.assert_allclose(const[inside], want[inside], atol=1e-4)
  knots = _smooth_random_velocity(rng, len(ts), h, w, amp=2.0)
  phi = eo.integrate_flow(knots, ts, times, dt=0.1)
  psi = inv(knots, times)
  for s in range(len(times)):
    err = np.linalg.norm(np.asarray(eo.compose_maps(phi[s], psi[s])) - _grid(h, w), axis=-1)
    assert err[4:-4, 4:-4].max() < 0.1 * (s > 0) + 1e-5, (s, err.max())
