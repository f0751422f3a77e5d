"""Echo-ODE loss terms away from the identity, against scipy and analytic affine maps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from echo_ode_jax import fit, losses
from echo_ode_jax.data import synthetic

SIZE, T_VALID, T_PAD = 32, 5, 8


def _affine_phi(a, b, size=SIZE):
  """phi(x) = c + A (x - c) + b in (row, col) pixels, for one 2x2 A and offset b."""
  c = (size - 1) / 2
  x = np.stack(np.meshgrid(np.arange(size, dtype=np.float64),
                           np.arange(size, dtype=np.float64), indexing="ij"), -1)
  return c + (x - c) @ np.asarray(a, np.float64).T + np.asarray(b, np.float64)


def _rot_scale(theta, s):
  return s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


# Frames 0..4 are real: a rotation-scaling that grows with t, then a reflection
# at frame 3 (det < 0, so R_Jdet > 0). Frames 5..7 are T-bucket padding holding
# strong reflections, which must not count in any term.
_AFFINES = [(_rot_scale(0.0, 1.0), (0.0, 0.0)),
            (_rot_scale(0.05, 1.02), (0.3, -0.2)),
            (_rot_scale(0.1, 0.97), (0.6, 0.4)),
            (np.diag([-0.5, 1.0]), (0.0, 0.5)),
            (_rot_scale(-0.08, 0.93), (1.1, -0.7))]
_PADDING = [(np.diag([-3.0, 1.0]), (0.0, 0.0))] * (T_PAD - T_VALID)


@pytest.fixture(scope="module")
def case():
  s = synthetic.make_sequence(3, size=SIZE, num_frames=T_VALID)[0]
  phi = np.stack([_affine_phi(a, b) for a, b in _AFFINES + _PADDING])
  return s, phi


def _np_ncc(a, b, window, eps=1e-5):
  """Mean squared local NCC of (H, W) maps, from scipy window sums over the
  pixels inside the frame."""
  box = lambda x: ndimage.uniform_filter(x, window, mode="constant") * window * window
  n = box(np.ones_like(a))
  sa, sb = box(a), box(b)
  cross = box(a * b) - sa * sb / n
  va, vb = box(a * a) - sa ** 2 / n, box(b * b) - sb ** 2 / n
  return np.mean(cross ** 2 / (va * vb + eps))


def _scipy_terms(s, phi, cfg, guided=True):
  """The paper's terms, written independently with scipy and numpy."""
  img = s.img.astype(np.float64)
  sm = ndimage.gaussian_filter(img, (0, cfg.sigma, cfg.sigma), mode="reflect")
  sim, ncc = [], []
  for t in range(T_VALID):
    raw = ndimage.map_coordinates(img[0], np.moveaxis(phi[t], -1, 0), order=1,
                                  mode="nearest")
    warped = ndimage.gaussian_filter(raw, cfg.sigma, mode="reflect")
    sim.append(np.mean((warped - sm[t]) ** 2))
    a, b = raw, img[t]
    if cfg.ncc_sigma > 0:
      a = ndimage.gaussian_filter(a, cfg.ncc_sigma, mode="reflect")
      b = ndimage.gaussian_filter(b, cfg.ncc_sigma, mode="reflect")
    ncc.append(1 - _np_ncc(a, b, cfg.ncc_window))
  m0 = np.eye(4)[s.gt[0]]
  m_es = np.stack([ndimage.map_coordinates(m0[..., c], np.moveaxis(phi[T_VALID - 1], -1, 0),
                                           order=1, mode="nearest") for c in range(4)], -1)
  m1, m_ed = np.eye(4)[s.gt[-1]], np.eye(4)[s.gt[0]]
  dices = [(2 * np.sum(m_es[..., c] * m1[..., c]) + 1)
           / (np.sum(m_es[..., c]) + np.sum(m1[..., c]) + 1) for c in (1, 2, 3)]
  ef_prop = 1 - m_es[..., 1].sum() / m0[..., 1].sum()
  ef_guide = 1 - m1[..., 1].sum() / m_ed[..., 1].sum()
  # Affine maps: det D phi = det A everywhere, and the forward differences of
  # u = phi - id are the columns of A - I at every pixel.
  dets = [np.linalg.det(a) for a, _ in _AFFINES]
  grads = [np.sum((np.asarray(a) - np.eye(2)) ** 2) for a, _ in _AFFINES]
  return {"sim": np.mean(sim), "ncc": np.mean(ncc) if cfg.lambda_ncc > 0 else 0.0,
          "seg": (1 - np.mean(dices)) if guided else 0.0,
          "ef": abs(ef_prop - ef_guide) if guided else 0.0,
          "jdet": np.mean([max(cfg.jdet_margin - d, 0.0) ** 2 for d in dets]),
          "smt": np.mean(grads)}


@pytest.mark.parametrize("lambda_ncc,jdet_margin,ncc_sigma",
                         [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.95, 0.0), (1.0, 0.0, 1.5)])
def test_terms_at_affine_maps_match_scipy_and_ignore_padding(case, lambda_ncc, jdet_margin,
                                                             ncc_sigma):
  """jdet_margin 0.95 also penalises frame 4 (det 0.86: 0.3% of the term, above
  the tolerance) besides the reflection (frame 2's det 0.94 adds too little to see);
  ncc_sigma smooths both images before the NCC as scipy's gaussian_filter does."""
  s, phi = case
  cfg = fit.FitConfig(lambda_ncc=lambda_ncc, ncc_window=5, jdet_margin=jdet_margin,
                      ncc_sigma=ncc_sigma)
  seq = fit.prepare_sequence(s.img, s.gt[0], s.gt[-1], cfg=cfg, t_pad=T_PAD)
  assert seq["frame_valid"].tolist() == [1] * T_VALID + [0] * (T_PAD - T_VALID)
  got = losses.terms_from_phi(jnp.asarray(phi, jnp.float32), seq, cfg)
  want = _scipy_terms(s, phi, cfg)
  assert want["jdet"] > 0 and want["smt"] > 0 and want["seg"] > 0 and want["ef"] > 0
  assert (want["ncc"] > 0) == (lambda_ncc > 0)
  for k in losses.TERMS:
    tol = 2e-3 if k == "ncc" else 2e-4   # float32 window sums
    np.testing.assert_allclose(float(got[k]), want[k], rtol=tol, atol=1e-7, err_msg=k)


def test_no_guide_zeroes_seg_and_ef_only(case):
  s, phi = case
  cfg = fit.FitConfig()
  seq = fit.prepare_sequence(s.img, s.gt[0], None, cfg=cfg, t_pad=T_PAD)
  assert float(seq["has_guide"]) == 0
  got = losses.terms_from_phi(jnp.asarray(phi, jnp.float32), seq, cfg)
  want = _scipy_terms(s, phi, cfg, guided=False)
  for k in losses.TERMS:
    np.testing.assert_allclose(float(got[k]), want[k], rtol=2e-4, atol=1e-7, err_msg=k)


def test_total_loss_weights_each_term_by_its_lambda():
  terms = {"sim": 2.0, "ncc": 13.0, "seg": 3.0, "ef": 5.0, "jdet": 7.0, "smt": 11.0}
  cfg = fit.FitConfig(lambda_sim=0.5, lambda_ncc=0.5, lambda_seg=0.25, lambda_ef=2.0, lambda_jdet=10.0,
                      lambda_smt=0.1)
  assert float(losses.total_loss(terms, cfg)) == pytest.approx(
      1.0 + 6.5 + 0.75 + 10.0 + 70.0 + 1.1)


def test_frames_at_is_linear_interpolation_over_the_valid_frames():
  """I(t) between frame times k/(T-1), per pixel as np.interp; padding frames unused."""
  rng = np.random.default_rng(0)
  t_valid, t_pad = 5, 8
  imgs = rng.random((t_pad, 4, 3)).astype(np.float32)
  imgs[t_valid:] = 1e3                       # padding must never leak in
  times = np.concatenate([np.arange(t_valid) / (t_valid - 1),
                          np.ones(t_pad - t_valid)]).astype(np.float32)
  t = np.concatenate([[0.0, 1.0, 0.25, 0.5], rng.random(12)]).astype(np.float32)
  got = np.asarray(fit.frames_at(jnp.asarray(imgs), jnp.asarray(times), t_valid - 1,
                                 jnp.asarray(t)))
  xp = np.arange(t_valid) / (t_valid - 1)
  want = np.stack([[[np.interp(tt, xp, imgs[:t_valid, i, j]) for j in range(3)]
                    for i in range(4)] for tt in t])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[2], imgs[1], rtol=1e-6)     # t = 0.25 is frame 1


@pytest.mark.parametrize("window", [3, 5, 9])
def test_local_ncc_matches_scipy_windows(window):
  """local_ncc against window sums from scipy's uniform_filter (zero padding)."""
  rng = np.random.default_rng(window)
  a = rng.random((2, 20, 17))
  b = 0.5 * a + 0.3 * rng.random((2, 20, 17))
  want = [_np_ncc(x, y, window) for x, y in zip(a, b)]
  got = np.asarray(losses.local_ncc(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                    window))
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)


def test_local_ncc_is_invariant_to_intensity_scale_and_offset():
  """NCC^2 is 1 where b = s * a + c (s != 0), the border included, and small for
  independent noise; a bright constant edge does not correlate with noise."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.random((1, 24, 24)), jnp.float32)
  for s, c in ((2.0, 0.0), (-0.7, 0.9)):
    cc = float(losses.local_ncc(a, s * a + c, 7)[0])
    assert cc > 0.995
  # Independent noise correlates weakly.
  assert float(losses.local_ncc(a, jnp.asarray(rng.random((1, 24, 24)), jnp.float32), 7)[0]) < 0.2
  flat = jnp.full((1, 24, 24), 0.7)
  noisy = flat + 1e-3 * jnp.asarray(rng.standard_normal((1, 24, 24)), jnp.float32)
  assert float(losses.local_ncc(flat, noisy, 7)[0]) < 1e-3



def test_velocity_stride_resamples_the_network_analytically():
  """A stand-in network whose output is its own grid's row/col coordinate: at
  stride s the full-grid velocity is s * coarse coordinate = x + 0.5 - s / 2
  (pixel-centre aligned) away from the border, and the network sees inputs of
  ceil(H / s) x ceil(W / s)."""
  seen = []

  def apply_fn(variables, images, m0, t, i0):
    seen.append((images.shape, m0.shape, i0.shape))
    k, h, w = images.shape[:3]
    g = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)
    return jnp.broadcast_to(jnp.asarray(g, jnp.float32), (k, h, w, 2))

  h, w, s = 24, 16, 2
  images = jnp.ones((3, h, w, 1))
  m0 = jnp.ones((h, w, 4))
  v = np.asarray(losses.velocity({}, images, m0, jnp.zeros(3), images[0],
                                 fit.FitConfig(velocity_stride=s), apply_fn))
  assert seen == [((3, 12, 8, 1), (12, 8, 4), (12, 8, 1))]
  assert v.shape == (3, h, w, 2)
  rows = np.arange(h)[:, None] + 0.5 - s / 2
  cols = np.arange(w)[None, :] + 0.5 - s / 2
  np.testing.assert_allclose(v[1, 1:-1, 1:-1, 0], np.broadcast_to(rows, (h, w))[1:-1, 1:-1],
                             atol=1e-5)
  np.testing.assert_allclose(v[1, 1:-1, 1:-1, 1], np.broadcast_to(cols, (h, w))[1:-1, 1:-1],
                             atol=1e-5)
  seen.clear()
  v1 = losses.velocity({}, images, m0, jnp.zeros(3), images[0], fit.FitConfig(), apply_fn)
  assert seen == [((3, h, w, 1), (h, w, 4), (h, w, 1))] and v1.shape == (3, h, w, 2)


def test_bending_energy_is_zero_for_affine_maps_and_hand_computed_for_quadratics():
  """smt_order=2: u = (a y^2 + c x y, b x^2) has d2u/dy2 = (2a, 0), d2u/dx2 =
  (0, 2b), d2u/dydx = (c, 0) exactly under central differences, so the bending
  energy is 4a^2 + 4b^2 + 2c^2; an affine contraction has none (and order 1 does)."""
  contraction = jnp.asarray(_affine_phi([[0.8, 0.0], [0.0, 0.85]], [0.5, -0.3]), jnp.float32)
  assert float(losses.smoothness(contraction, order=2)) < 1e-8
  assert float(losses.smoothness(contraction, order=1)) > 0.01
  a, b, c = 0.01, -0.02, 0.015
  y, x = np.meshgrid(np.arange(SIZE, dtype=np.float64), np.arange(SIZE, dtype=np.float64),
                     indexing="ij")
  u = np.stack([a * y ** 2 + c * x * y, b * x ** 2], -1)
  phi = jnp.asarray(np.stack([y, x], -1) + u, jnp.float32)
  np.testing.assert_allclose(float(losses.smoothness(phi, order=2)),
                             4 * a * a + 4 * b * b + 2 * c * c, rtol=2e-3)
  with pytest.raises(ValueError, match="smt_order"):
    fit.FitConfig(smt_order=3)


# Expansions about the centre (scale >= 1.04, small rotations and shifts): phi
# covers the grid, so every pixel's preimage phi_t^-1(p) lies inside it.
_EXPANSIONS = [(np.eye(2), (0.0, 0.0)), (_rot_scale(0.0, 1.04), (0.3, -0.2)),
               (_rot_scale(0.03, 1.1), (-0.3, 0.1)), (_rot_scale(-0.02, 1.07), (0.2, 0.3)),
               (_rot_scale(0.0, 1.12), (0.0, -0.3))]


@pytest.mark.parametrize("lambda_ncc", [0.0, 1.0])
def test_symmetric_similarity_adds_the_inverse_comparison_on_frame_0s_grid(case, lambda_ncc):
  """similarity="symmetric": L_sim and L_ncc are the means of the forward
  comparison (I_0 o phi_t against I_t) and of I_t o phi_t^-1 against I_0, with
  phi_t^-1(x) = c + A^-1 (x - c - b) for the affine phi_t, scipy-warped;
  padded frames (reflections, where no inverse converges) still count in nothing."""
  s, _ = case
  phi = np.stack([_affine_phi(a, b) for a, b in _EXPANSIONS + _PADDING])
  cfg = fit.FitConfig(lambda_ncc=lambda_ncc, ncc_window=5, similarity="symmetric")
  seq = fit.prepare_sequence(s.img, s.gt[0], s.gt[-1], cfg=cfg, t_pad=T_PAD)
  got = losses.terms_from_phi(jnp.asarray(phi, jnp.float32), seq, cfg)
  fwd = losses.terms_from_phi(jnp.asarray(phi, jnp.float32), seq,
                              cfg.replace(similarity="forward"))
  img = s.img.astype(np.float64)
  sm0 = ndimage.gaussian_filter(img[0], cfg.sigma, mode="reflect")
  c = (SIZE - 1) / 2
  x = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij"), -1) - c
  sim, ncc = [], []
  for t, (a, b) in enumerate(_EXPANSIONS):
    psi = c + (x - np.asarray(b)) @ np.linalg.inv(a).T
    assert psi.min() >= 0 and psi.max() <= SIZE - 1
    back = ndimage.map_coordinates(img[t], np.moveaxis(psi, -1, 0), order=1, mode="nearest")
    sim.append(np.mean((ndimage.gaussian_filter(back, cfg.sigma, mode="reflect") - sm0) ** 2))
    ncc.append(1 - _np_ncc(back, img[0], cfg.ncc_window))
  assert np.mean(sim) > 1e-3
  np.testing.assert_allclose(float(got["sim"]), (float(fwd["sim"]) + np.mean(sim)) / 2,
                             rtol=2e-4)
  want_ncc = (float(fwd["ncc"]) + np.mean(ncc)) / 2 if lambda_ncc > 0 else 0.0
  np.testing.assert_allclose(float(got["ncc"]), want_ncc, rtol=2e-3, atol=1e-7)
  for k in ("seg", "ef", "jdet", "smt"):
    assert float(got[k]) == float(fwd[k])
  psis = np.stack([c + (x - np.asarray(b)) @ np.linalg.inv(a).T for a, b in _EXPANSIONS]
                  + [np.zeros_like(x)] * (T_PAD - T_VALID))
  given = losses.terms_from_phi(jnp.asarray(phi, jnp.float32), seq, cfg,
                                jnp.asarray(psis, jnp.float32))   # the inverses passed in
  for k in losses.TERMS:
    np.testing.assert_allclose(float(given[k]), float(got[k]), rtol=1e-4, atol=1e-7, err_msg=k)
  with pytest.raises(ValueError, match="similarity"):
    fit.FitConfig(similarity="inverse")


def test_symmetric_similarity_gradient_matches_finite_differences(case):
  """d/d beta of the symmetric L_sim + L_ncc at phi_t = an expansion shifted by
  t beta along the rows (gradients through phi_t^-1's fixed-point iterations).
  The frames are smoothed first: bilinear sampling puts kinks in the loss at
  pixel crossings, which sharp edges make larger than the tolerance."""
  s, _ = case
  cfg = fit.FitConfig(ncc_window=5, similarity="symmetric")
  img = ndimage.gaussian_filter(s.img.astype(np.float64), (0, 2, 2))
  seq = fit.prepare_sequence(img, s.gt[0], s.gt[-1], cfg=cfg, t_pad=T_PAD)
  t = np.minimum(np.arange(T_PAD), T_VALID - 1) / (T_VALID - 1)
  base = np.stack([_affine_phi(_rot_scale(0.0, 1 + 0.08 * tk), (0.0, 0.0))
                   for tk in t]).astype(np.float32)
  ramp = np.zeros_like(base)
  ramp[..., 0] = t[:, None, None]

  def f(beta):
    terms = losses.terms_from_phi(jnp.asarray(base) + beta * jnp.asarray(ramp), seq, cfg)
    return terms["sim"] + terms["ncc"]

  g = float(jax.grad(f)(jnp.float32(0.4)))
  h = 3e-2
  fd = (float(f(jnp.float32(0.4 + h))) - float(f(jnp.float32(0.4 - h)))) / (2 * h)
  assert abs(g) > 1e-3
  np.testing.assert_allclose(g, fd, rtol=1e-2)
