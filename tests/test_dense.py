"""The free-form velocity (FitConfig.dense_steps): field, flow, stages, fit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from echo_ode_jax import dense, fit, flow, losses
from echo_ode_jax.model import ModelConfig, VelocityUNet

TINY = ModelConfig(enc_channels=(8, 8), dec_channels=(8, 8, 8), pe_dim=8, spade_hidden=4)


def test_field_is_bilinear_in_space_and_linear_in_time():
  """Control values at two knots, read at a time between them and at pixel
  centres: hand-computed with scipy's order-1 zoom (pixel centres aligned)."""
  kt = np.array([0.0, 0.5], np.float32)
  rng = np.random.default_rng(0)
  u = rng.normal(size=(2, 3, 4, 2)).astype(np.float32)
  h, w = 6, 8                                             # factor 2, s = 4
  v = np.asarray(dense.velocity(dense.DenseVelocity(jnp.asarray(u)), [0.2, 0.9], kt, (h, w)))
  assert v.shape == (2, h, w, 2)
  for i, t in enumerate([0.2, 0.9]):
    lam = min(t / 0.5, 1.0)
    ut = (1 - lam) * u[0] + lam * u[1]
    want = np.stack([ndimage.zoom(ut[..., c], 2, order=1, grid_mode=True, mode="nearest")
                     for c in range(2)], -1) * 4.0
    np.testing.assert_allclose(v[i], want, rtol=1e-5, atol=1e-5)


def test_flow_of_a_constant_field_is_the_translation():
  """U = b everywhere and at every knot: phi_t = x + t * s * b (s = 16)."""
  kt = flow.knot_times("euler", 0.1)
  b = np.array([0.05, -0.1], np.float32)
  params = dense.DenseVelocity(jnp.broadcast_to(jnp.asarray(b), (len(kt), 8, 8, 2)))
  knots = dense.velocity(params, kt, kt, (32, 32))
  phi = np.asarray(flow.integrate_flow(knots, kt, jnp.asarray([0.5, 1.0]), "euler", 0.1))
  grid = np.stack(np.meshgrid(np.arange(32), np.arange(32), indexing="ij"), -1)
  inner = np.s_[4:-4, 4:-4]
  for i, t in enumerate([0.5, 1.0]):
    np.testing.assert_allclose(phi[i][inner] - grid[inner], np.broadcast_to(t * 16 * b, (24, 24, 2)),
                               atol=1e-4)


def test_stages_end_with_the_dense_fit_at_the_full_grid():
  cfg = fit.FitConfig(steps=9, coarse_steps=5, pyramid_levels=2, dense_steps=7, dense_factor=4,
                      sigma=2.0, model=TINY)
  stages = fit.pyramid(cfg)
  assert [(f, c.steps, c.sigma) for f, c in stages] == [(2, 5, 1.0), (1, 9, 2.0), (1, 7, 2.0)]
  key = jax.random.PRNGKey(0)
  st = fit.level_state(cfg, 0, key, (8, 8))
  st = fit.level_state(cfg, 1, key, (16, 16), st)
  assert len(st.params) == 2
  st = fit.level_state(cfg, 2, key, (18, 16), st)
  assert len(st.params) == 3 and isinstance(st.params[-1], dense.DenseVelocity)
  assert st.params[-1].u.shape == (len(flow.knot_times("euler", 0.1)), 5, 4, 2)
  for bad in ({"dense_steps": -1}, {"dense_factor": 0}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      fit.FitConfig(**bad)


def test_the_dense_field_is_added_to_the_networks_velocity():
  cfg = fit.FitConfig(steps=3, dense_steps=2, dense_factor=2, log_every=3, model=TINY)
  seq = fit.prepare_sequence(np.random.default_rng(0).random((3, 32, 32)), np.zeros((32, 32)),
                             cfg=cfg)
  seq = jax.tree_util.tree_map(jnp.asarray, seq)
  key = jax.random.PRNGKey(0)
  st1 = fit.level_state(cfg, 1, key, (32, 32), fit.level_state(cfg, 0, key, (32, 32)))
  kt = flow.knot_times("euler", 0.1)
  u = jax.random.normal(key, st1.params[-1].u.shape)
  params = st1.params[:-1] + (dense.DenseVelocity(u),)
  apply_fn = VelocityUNet(cfg.model).apply
  knots = jax.jit(lambda p: losses.velocity_knots(p, seq, cfg, apply_fn))
  v, net = knots(params), knots(params[:-1])
  np.testing.assert_allclose(v - net, dense.velocity(params[-1], kt, kt, (32, 32)), atol=1e-5)


def test_the_best_step_is_sought_in_the_dense_stage_only():
  """10 network steps, then 3 dense ones: the returned parameters (keep_best)
  are chosen among history steps 10-12, not among the network's."""
  cfg = fit.FitConfig(steps=10, dense_steps=3, log_every=500, model=TINY)
  img = np.random.default_rng(0).random((2, 16, 16))
  seq = fit.prepare_sequence(img, np.zeros((16, 16)), cfg=cfg)
  _, (hist,), offset = fit._fit_levels(cfg, [jax.random.PRNGKey(0)], [seq], False, False, "fit")
  assert len(hist["loss"]) == 13 and offset == 10
  assert fit.fit_sequence(seq, cfg).best_step >= 10


def test_a_single_grid_fit_starts_its_network_as_without_the_dense_stage():
  key = jax.random.PRNGKey(3)
  base = fit.FitConfig(steps=2, model=TINY)
  with_dense = base.replace(dense_steps=2)
  want = fit.init_state(base, key, (16, 16)).params
  got = fit.level_state(with_dense, 0, key, (16, 16)).params
  assert isinstance(got, tuple) and len(got) == 1
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got[0])):
    np.testing.assert_array_equal(a, b)


def test_dense_stage_recovers_a_translation():
  """A textured blob moved by (+2, -3) pixels: one network step, then the dense
  stage alone; the fitted map inside the blob is the translation within 0.5 px
  and the fit reports the dense stage's steps after the network's."""
  n = 40
  yy, xx = np.mgrid[:n, :n].astype(float)
  tex = ndimage.gaussian_filter(np.random.default_rng(1).random((n + 20, n + 20)), 1.5)
  def frame(dy, dx):
    img = 0.2 + 0.5 * (np.hypot(yy - 20 - dy, xx - 20 - dx) < 10)
    img = img + 0.3 * ndimage.map_coordinates(tex, [yy + 10 - dy, xx + 10 - dx], order=1)
    return np.clip(img, 0, 1)
  cfg = fit.FitConfig(steps=1, dense_steps=200, dense_factor=4, lr=0.01, log_every=500,
                      lambda_smt=0.0, model=TINY)
  seq = fit.prepare_sequence(np.stack([frame(0, 0), frame(2, -3)]), np.zeros((n, n)), cfg=cfg)
  res = fit.fit_sequence(seq, cfg)
  assert len(res.history["loss"]) == 201
  inside = np.hypot(yy - 20, xx - 20) < 8
  d = res.phi[-1][inside] - np.stack([yy, xx], -1)[inside]
  np.testing.assert_allclose(np.median(d, 0), [-2.0, 3.0], atol=0.5)


def test_the_networks_are_held_fixed_in_the_dense_stage():
  """The loss's gradient reaches the dense field only; without it, the network."""
  cfg = fit.FitConfig(steps=3, dense_steps=2, model=TINY)
  seq = fit.prepare_sequence(np.random.default_rng(0).random((2, 16, 16)), np.zeros((16, 16)),
                             cfg=cfg)
  seq = jax.tree_util.tree_map(jnp.asarray, seq)
  key = jax.random.PRNGKey(0)
  st = fit.level_state(cfg, 1, key, (16, 16), fit.level_state(cfg, 0, key, (16, 16)))
  # a non-zero network output (its zero-initialised last layer perturbed) and field
  params = jax.tree_util.tree_map(lambda x: x + 0.01, st.params)
  apply_fn = VelocityUNet(cfg.model).apply
  grad = jax.jit(jax.grad(lambda p: losses.loss_fn(p, seq, cfg, apply_fn)[0]))
  norm = lambda g: float(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(g)))
  grads = grad(params)
  assert norm(grads[:-1]) == 0.0 and norm(grads[-1]) > 0.0
  assert norm(grad(params[:-1])) > 0.0
