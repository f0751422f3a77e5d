"""Coarse-to-fine fitting (FitConfig.pyramid_levels): levels, exact continuation, batching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from echo_ode_jax import fit, losses
from echo_ode_jax.data import synthetic
from echo_ode_jax.model import ModelConfig, VelocityUNet

TINY = ModelConfig(enc_channels=(8, 8), dec_channels=(8, 8, 8), pe_dim=8, spade_hidden=4)
CFG = fit.FitConfig(steps=3, coarse_steps=2, pyramid_levels=2, log_every=3, model=TINY)


def _dice(a, b):
  return 2 * np.sum(a & b) / max(1, np.sum(a) + np.sum(b))


@pytest.fixture(scope="module")
def seqs():
  return [synthetic.make_sequence(i, size=32, num_frames=n)[0] for i, n in enumerate((6, 5, 7))]


def _prep(s, cfg=CFG):
  return fit.prepare_sequence(s.img, s.gt[0], s.gt[-1], cfg=cfg)


def test_levels_halve_the_grid_and_scale_sigma():
  cfg = fit.FitConfig(steps=50, coarse_steps=7, pyramid_levels=3, sigma=2.0, ncc_sigma=4.0)
  levels = fit.pyramid(cfg)
  assert [f for f, _ in levels] == [4, 2, 1]
  assert [c.steps for _, c in levels] == [7, 7, 50]
  assert [c.sigma for _, c in levels] == [0.5, 1.0, 2.0]
  assert [c.ncc_sigma for _, c in levels] == [1.0, 2.0, 4.0]
  assert levels[-1][1] == cfg
  assert fit.pyramid(fit.FitConfig()) == [(1, fit.FitConfig())]
  with pytest.raises(ValueError, match="pyramid_levels"):
    fit.FitConfig(pyramid_levels=0)


def _sampled(field, n, f):
  """phi (pixels of a grid reduced f times from n) of the displacement field(y, x),
  given in the full grid's pixels, sampled at the reduced grid's pixel centres."""
  c = np.arange(n // f) * f + (f - 1) / 2
  y, x = np.meshgrid(c, c, indexing="ij")
  u = np.stack(field(y, x), -1) / f
  ident = np.stack(np.meshgrid(np.arange(n // f), np.arange(n // f), indexing="ij"), -1)
  return jnp.asarray(ident + u, jnp.float32)


@pytest.mark.parametrize("order", [1, 2])
def test_each_level_weighs_the_same_smoothness_of_a_continuous_field(order):
  # Order 1: u = (0.05 x, -0.03 y), the gradient penalty is 0.05^2 + 0.03^2 on any
  # grid. Order 2: u = (0.01 y^2, 0.004 x^2) in full-grid pixels has second
  # differences (0.02, 0.008) per full-grid pixel^2, (0.02 f, 0.008 f) on a grid
  # reduced f times; weighted by lambda_smt / f^2 every level reads 0.3 (0.02^2 + 0.008^2).
  cfg = fit.FitConfig(steps=5, coarse_steps=2, pyramid_levels=3, lambda_smt=0.3, smt_order=order)
  if order == 1:
    field, expected = (lambda y, x: (0.05 * x, -0.03 * y)), 0.3 * (0.05 ** 2 + 0.03 ** 2)
  else:
    field, expected = (lambda y, x: (0.01 * y ** 2, 0.004 * x ** 2)), 0.3 * (0.02 ** 2 + 0.008 ** 2)
  stages = fit.pyramid(cfg)
  assert [f for f, _ in stages] == [4, 2, 1]
  for f, c in stages:
    got = c.lambda_smt * float(losses.smoothness(_sampled(field, 64, f), order))
    np.testing.assert_allclose(got, expected, rtol=1e-3, err_msg=f"level reduced {f}x")


def test_downsample_keeps_label_areas_and_images_against_scipy(seqs):
  s = seqs[0]
  seq = _prep(s, CFG.replace(sigma=0.0))
  small = fit.downsample(seq, 2, 0.0)
  assert small["images"].shape == (8, 16, 16) and small["m0"].shape == (16, 16, 4)
  # Soft labels stay a partition of unity and keep each class's area (x 4).
  np.testing.assert_allclose(np.sum(small["m0"], -1), 1.0, atol=1e-5)
  for c in range(1, 4):
    np.testing.assert_allclose(4 * np.sum(small["m0"][..., c]), np.sum(s.gt[0] == c), rtol=0.03)
  # A 2x antialiased linear downsample is a triangle filter of half-width 2 input
  # pixels sampled at the output centres: weights (1, 3, 3, 1) / 8 per axis.
  img = np.asarray(seq["images"][0], np.float64)
  w = np.array([1.0, 3.0, 3.0, 1.0]) / 8
  ref = ndimage.correlate1d(ndimage.correlate1d(img, w, 0, mode="nearest", origin=-1), w, 1,
                            mode="nearest", origin=-1)[::2, ::2]
  np.testing.assert_allclose(small["images"][0][1:-1, 1:-1], ref[1:-1, 1:-1], atol=1e-5)
  # images_smooth follows the new grid's sigma.
  blurred = fit.downsample(seq, 2, 1.0)["images_smooth"][2]
  np.testing.assert_allclose(
      blurred, ndimage.gaussian_filter(np.asarray(small["images"][2], np.float64), 1.0,
                                       mode="reflect"), atol=1e-5)


def test_a_new_level_continues_the_flow_exactly(seqs):
  """At the start of a level the new network's output is zero, so V on the finer
  grid is the coarser level's V upsampled bilinearly and scaled to its pixels."""
  cfg = CFG
  seq = jax.tree_util.tree_map(jnp.asarray, _prep(seqs[0]))
  coarse = fit.downsample(seq, 2, cfg.sigma / 2)
  apply_fn = VelocityUNet(cfg.model).apply
  key = jax.random.PRNGKey(0)
  st0 = fit.level_state(cfg, 0, key, (16, 16))
  leaves, tree = jax.tree_util.tree_flatten(st0.params)
  ks = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  p0 = jax.tree_util.tree_unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                           for x, k in zip(leaves, ks)])
  st0 = st0._replace(params=p0, best_params=p0, best_loss=jnp.float32(0.0))
  st1 = fit.level_state(cfg, 1, key, (32, 32), st0)
  assert len(st1.params) == 2 and st1.params[0] is not None
  v_coarse = losses.velocity_knots(p0, coarse, cfg, apply_fn)           # (K, 16, 16, 2)
  v_fine = losses.velocity_knots(st1.params, seq, cfg, apply_fn)        # (K, 32, 32, 2)
  assert float(jnp.max(jnp.abs(v_coarse))) > 0.1
  up = jax.image.resize(v_coarse, v_fine.shape, "linear") * 2.0
  np.testing.assert_allclose(v_fine, up, atol=1e-5)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_batches_equal_single_fits_and_best_is_from_the_last_level(seqs, mode):
  cfg = CFG.replace(lr=0.1, lr_decay="constant")
  preps = [_prep(s, cfg) for s in seqs]
  keys = [jax.random.PRNGKey(20 + i) for i in range(3)]
  singles = [fit.fit_sequence(p, cfg, key=k) for p, k in zip(preps, keys)]
  batch = fit.fit_batch(preps, cfg, keys=keys, batch_mode=mode)
  for s, b in zip(singles, batch):
    assert len(b.history["loss"]) == cfg.coarse_steps + cfg.steps
    np.testing.assert_allclose(s.history["loss"], b.history["loss"], rtol=1e-4)
    np.testing.assert_allclose(s.phi, b.phi, atol=5e-4)
    assert cfg.coarse_steps <= b.best_step < len(b.history["loss"])
    last = b.history["loss"][cfg.coarse_steps:]
    assert b.best_step == cfg.coarse_steps + int(np.argmin(last))
  # A non-finite loss at the coarse level fails that sequence only, at its global step.
  bad = dict(preps[1])
  bad["images"] = np.array(bad["images"])
  bad["images"][1, 3, 3] = np.nan
  res = fit.fit_batch([preps[0], bad, preps[2]], cfg, keys=keys, batch_mode=mode)
  assert [r.failed for r in res] == [False, True, False]
  assert "step 0" in res[1].reason
  np.testing.assert_array_equal(res[0].masks, batch[0].masks)


def test_coarse_to_fine_tracks_synthetic_motion():
  """48^2, 8 frames, levels 24^2 then 48^2: Dice at ES and over all frames beats
  copying m_0, without folding. A two-scale network of 16 channels: the level-2
  program holds two networks, and the paper's one took ~100 s of XLA:CPU
  compilation there (test_fit.py fits motion with the paper's network)."""
  seq, _ = synthetic.make_sequence(3, size=48, num_frames=8, ef=0.6)
  model = ModelConfig(enc_channels=(16, 16), dec_channels=(16, 16, 16), pe_dim=16,
                      spade_hidden=8)
  cfg = fit.FitConfig(steps=60, coarse_steps=60, pyramid_levels=2, log_every=60,
                      model=model)
  res = fit.fit_sequence(_prep(seq, cfg), cfg)
  lv_fit = np.mean([_dice(res.masks[t] == 1, seq.gt[t] == 1) for t in range(8)])
  lv_copy = np.mean([_dice(seq.gt[0] == 1, seq.gt[t] == 1) for t in range(8)])
  es_fit = _dice(res.masks[-1] == 1, seq.gt[-1] == 1)
  assert lv_fit > lv_copy + 0.04, (lv_fit, lv_copy)
  assert es_fit > 0.9, es_fit
  assert res.folding_fraction < 0.01
