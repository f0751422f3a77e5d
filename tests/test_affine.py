"""The affine velocity (FitConfig.affine_steps): field, flow against expm, stages, fit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg, ndimage

from echo_ode_jax import affine, fit, flow, losses
from echo_ode_jax.model import ModelConfig, VelocityUNet

TINY = ModelConfig(enc_channels=(8, 8), dec_channels=(8, 8, 8), pe_dim=8, spade_hidden=4)


def test_field_is_the_hand_computed_affine_map_interpolated_in_time():
  kt = np.array([0.0, 0.5], np.float32)
  a = np.array([[[0.1, -0.2], [0.3, 0.05]], [[-0.1, 0.0], [0.0, 0.2]]], np.float32)
  b = np.array([[0.1, -0.05], [0.0, 0.2]], np.float32)
  params = affine.AffineVelocity(jnp.asarray(a), jnp.asarray(b))
  h, w = 6, 10                                   # s = 5, centre (2.5, 4.5)
  v = np.asarray(affine.velocity(params, [0.0, 0.25, 0.9], kt, (h, w)))
  assert v.shape == (3, h, w, 2)
  for i, t in enumerate([0.0, 0.25, 0.9]):
    lam = min(t / 0.5, 1.0)
    at, bt = (1 - lam) * a[0] + lam * a[1], (1 - lam) * b[0] + lam * b[1]
    for r, c in [(0, 0), (5, 9), (3, 2)]:
      want = at @ np.array([r - 2.5, c - 4.5]) + 5.0 * bt
      np.testing.assert_allclose(v[i, r, c], want, rtol=1e-5, atol=1e-6)


def test_flow_of_a_constant_affine_velocity_is_expm():
  """dx/dt = A (x - c) from x0 gives x(t) = c + expm(t A) (x0 - c) (b = 0)."""
  h = w = 33
  a = np.array([[-0.3, 0.1], [0.05, 0.2]], np.float32)
  kt = flow.knot_times("rk4", 0.05)
  params = affine.AffineVelocity(jnp.broadcast_to(jnp.asarray(a), (len(kt), 2, 2)),
                                 jnp.zeros((len(kt), 2)))
  knots = affine.velocity(params, kt, kt, (h, w))
  phi = np.asarray(flow.integrate_flow(knots, kt, jnp.asarray([0.5, 1.0]), "rk4", 0.05))
  c = np.array([16.0, 16.0])
  grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).astype(float)
  for i, t in enumerate([0.5, 1.0]):
    want = c + (grid - c) @ linalg.expm(t * a).T
    # Points that stay inside the grid (the velocity is sampled with border clamping).
    inner = np.all((want > 1) & (want < h - 2), -1) & np.all((grid > 4) & (grid < h - 5), -1)
    np.testing.assert_allclose(phi[i][inner], want[inner], atol=2e-3)


def test_stages_start_with_the_affine_fit_and_add_networks():
  cfg = fit.FitConfig(steps=9, coarse_steps=5, pyramid_levels=2, affine_steps=7,
                      affine_factor=4, sigma=2.0, model=TINY)
  stages = fit.pyramid(cfg)
  assert [(f, c.steps, c.sigma) for f, c in stages] == [(4, 7, 0.5), (2, 5, 1.0), (1, 9, 2.0)]
  key = jax.random.PRNGKey(0)
  st = fit.level_state(cfg, 0, key, (8, 8))
  assert len(st.params) == 1 and isinstance(st.params[0], affine.AffineVelocity)
  assert st.params[0].a.shape == (len(flow.knot_times("euler", 0.1)), 2, 2)
  st = fit.level_state(cfg, 1, key, (16, 16), st)
  assert len(st.params) == 2 and isinstance(st.params[0], affine.AffineVelocity)
  with pytest.raises(ValueError, match="affine_steps"):
    fit.FitConfig(affine_steps=-1)


def test_the_first_network_continues_the_affine_flow_exactly():
  cfg = fit.FitConfig(steps=3, affine_steps=2, affine_factor=2, log_every=3, model=TINY)
  seq = fit.prepare_sequence(np.random.default_rng(0).random((3, 32, 32)), np.zeros((32, 32)),
                             cfg=cfg)
  seq = jax.tree_util.tree_map(jnp.asarray, seq)
  key = jax.random.PRNGKey(0)
  st0 = fit.level_state(cfg, 0, key, (16, 16))
  k = st0.params[0].a.shape[0]
  aff = affine.AffineVelocity(jnp.full((k, 2, 2), 0.1), jnp.full((k, 2), -0.05))
  st0 = st0._replace(params=(aff,), best_params=(aff,), best_loss=jnp.float32(0.0))
  st1 = fit.level_state(cfg, 1, key, (32, 32), st0)
  apply_fn = VelocityUNet(cfg.model).apply
  v = losses.velocity_knots(st1.params, seq, cfg, apply_fn)
  want = affine.velocity(aff, flow.knot_times("euler", 0.1), flow.knot_times("euler", 0.1),
                         (32, 32))
  np.testing.assert_allclose(v, want, atol=1e-5)


def test_affine_stage_recovers_a_global_contraction():
  """A blob image shrunk by 15% about the centre: the affine stage alone brings
  the ES mask's area to the true one within 5%."""
  n = 48
  yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
  r = np.hypot(yy / 1.3, xx)
  tex = ndimage.gaussian_filter(np.random.default_rng(1).random((n, n)), 1.0)
  def frame(scale):
    rr = r / scale
    img = 0.2 + 0.6 * (rr < 12) + 0.2 * ndimage.map_coordinates(
        tex, [yy / scale + (n - 1) / 2, xx / scale + (n - 1) / 2], order=1, mode="nearest")
    return np.clip(img, 0, 1), (rr < 12).astype(np.int32)
  (i0, m0), (i1, m1) = frame(1.0), frame(0.85)
  cfg = fit.FitConfig(steps=1, affine_steps=150, affine_factor=1, lr=0.02, log_every=200,
                      lambda_smt=0.0, model=TINY)
  res = fit.fit_sequence(fit.prepare_sequence(np.stack([i0, i1]), m0, cfg=cfg), cfg)
  area = np.sum(res.masks[-1] == 1)
  assert abs(area / np.sum(m1) - 1) < 0.05, (area, np.sum(m1), np.sum(m0))
