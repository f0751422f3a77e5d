"""EF (area and Simpson) and deformation quality against analytic values."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from echo_ode_jax import kernels, metrics


def _grid_mm(shape, spacing):
  return np.meshgrid(np.arange(shape[0]) * spacing[0], np.arange(shape[1]) * spacing[1],
                     indexing="ij")


def _half_ellipse_lv(shape, spacing, base, a, b, myo=4.0):
  """Labels: LV = the half of an ellipse above the base line (apex up; a along rows,
  b across, mm), myocardium around it, open at the base; background elsewhere."""
  r, c = _grid_mm(shape, spacing)
  s, w = base[0] - r, c - base[1]
  lv = (s >= 0) & ((s / a) ** 2 + (w / b) ** 2 <= 1)
  epi = (s >= 0) & ((s / (a + myo)) ** 2 + (w / (b + myo)) ** 2 <= 1)
  return np.where(lv, 1, np.where(epi, 2, 0)).astype(np.uint8)


def test_ef_area_of_two_ellipses():
  spacing = (0.5, 0.5)
  r, c = _grid_mm((160, 120), spacing)
  ell = lambda a, b: ((r - 40) / a) ** 2 + ((c - 30) / b) ** 2 <= 1
  ed = np.where(ell(30, 15), 1, 0).astype(np.uint8)
  es = np.where(ell(25, 12), 1, 0).astype(np.uint8)
  assert metrics.lv_area_mm2(ed, spacing) == pytest.approx(math.pi * 30 * 15, rel=0.01)
  assert metrics.lv_area_mm2(es, spacing) == pytest.approx(math.pi * 25 * 12, rel=0.01)
  ef_true = 100 * (1 - (25 * 12) / (30 * 15))
  ef = metrics.ejection_fraction(metrics.lv_area_mm2(ed, spacing), metrics.lv_area_mm2(es, spacing))
  assert ef == pytest.approx(ef_true, rel=0.01)


def test_ejection_fraction_formula_and_degenerate():
  assert metrics.ejection_fraction(120.0, 48.0) == pytest.approx(60.0)
  assert math.isnan(metrics.ejection_fraction(0.0, 0.0))
  assert math.isnan(metrics.ejection_fraction(np.nan, 1.0))


@pytest.mark.parametrize("spacing", [(0.5, 0.5), (0.3, 0.6)])
def test_simpson_full_ellipse_vs_prolate_ellipsoid(spacing):
  a, b = 24.0, 9.0  # mm; long axis along rows
  shape = (int(70 / spacing[0]), int(30 / spacing[1]))
  r, c = _grid_mm(shape, spacing)
  cr, cc = 35.0, 15.0
  lv = (((r - cr) / a) ** 2 + ((c - cc) / b) ** 2 <= 1).astype(np.uint8)
  # Base = the bottom tip of the ellipse (both base points there), apex = top tip.
  tip = np.array([[(cr + a) / spacing[0], cc / spacing[1]]] * 2)
  v = metrics.simpson_volume_ml(lv, spacing, base_points=tip)
  assert v == pytest.approx(4 / 3 * math.pi * a * b * b / 1000, rel=0.03)


@pytest.mark.parametrize("spacing", [(0.4, 0.4), (0.3, 0.5)])
def test_simpson_half_ellipsoid_with_detected_base(spacing):
  a, b = 40.0, 12.0
  shape = (int(60 / spacing[0]), int(50 / spacing[1]))
  seg = _half_ellipse_lv(shape, spacing, base=(50.0, 25.0), a=a, b=b)
  base = metrics.lv_base_points(seg)
  assert base is not None
  assert np.hypot(*((base[0] - base[1]) * spacing)) == pytest.approx(2 * b, rel=0.05)
  v = metrics.simpson_volume_ml(seg, spacing)
  assert v == pytest.approx(2 / 3 * math.pi * a * b * b / 1000, rel=0.03)


def test_ef_measures_of_half_ellipsoids():
  spacing = (0.4, 0.4)
  ed = _half_ellipse_lv((150, 125), spacing, (50.0, 25.0), 40.0, 12.0)
  es = _half_ellipse_lv((150, 125), spacing, (50.0, 25.0), 34.0, 9.0)
  ef = metrics.ef_measures(ed, es, spacing)
  ef_vol = 100 * (1 - (34 * 9 * 9) / (40 * 12 * 12))
  ef_area = 100 * (1 - (34 * 9) / (40 * 12))
  assert ef["ef_simpson"] == pytest.approx(ef_vol, abs=1.5)
  assert ef["ef_area"] == pytest.approx(ef_area, abs=1.0)
  assert ef["edv_ml"] == pytest.approx(2 / 3 * math.pi * 40 * 144 / 1000, rel=0.03)


def test_simpson_undefined_cases():
  closed = np.zeros((30, 30), np.uint8)
  closed[5:25, 5:25] = 2
  closed[10:20, 10:20] = 1
  assert math.isnan(metrics.simpson_volume_ml(closed, (1.0, 1.0)))
  assert math.isnan(metrics.simpson_volume_ml(np.zeros((10, 10), np.uint8), (1.0, 1.0)))


def _identity(h, w):
  r, c = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                     indexing="ij")
  return np.stack([r, c], -1)


def test_folding_fraction_of_hand_made_fold():
  h, w, k = 12, 20, 8
  phi = _identity(h, w)
  col = np.arange(w, dtype=np.float64)
  phi[..., 1] = np.where(col < k, col, 2 * k - col)  # fold the columns back at k
  # d phi_col / d col (central differences): 1 for c < k, 0 at c = k, -1 beyond.
  det = metrics.jacobian_determinant_np(phi)
  expected_row = np.where(col < k, 1.0, np.where(col == k, 0.0, -1.0))
  np.testing.assert_allclose(det, np.broadcast_to(expected_row, (h, w)))
  q = metrics.deformation_quality(np.stack([_identity(h, w), phi]))
  assert q["fold_frac"] == pytest.approx((w - k) / w / 2)
  assert q["jdet_min"] == -1.0
  assert q["jdet_mean"] == pytest.approx((h * w + h * (k - (w - k - 1))) / (2 * h * w))


def test_jacobian_affine_and_matches_kernel(rng):
  h, w = 9, 11
  a = np.array([[1.2, 0.3], [-0.4, 0.9]])
  phi = _identity(h, w) @ a.T + np.array([2.0, -1.0])
  np.testing.assert_allclose(metrics.jacobian_determinant_np(phi), np.linalg.det(a))
  noisy = _identity(h, w) + rng.normal(scale=0.5, size=(h, w, 2))
  np.testing.assert_allclose(metrics.jacobian_determinant_np(noisy),
                             np.asarray(kernels.jacobian_determinant(jnp.asarray(noisy))),
                             rtol=1e-4, atol=1e-4)
