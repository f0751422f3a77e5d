"""Shape attributes and temporal inconsistency against analytic and hand-built cases."""
import math

import numpy as np
import pytest

from echo_ode_jax import metrics


def _ellipse(shape, center, a, b, theta_deg):
  """Pixel-centre rasterised ellipse: semi-axis `a` along a direction at `theta_deg`
  from the row axis (towards +col), semi-axis `b` across it; all in pixels."""
  r, c = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
  th = math.radians(theta_deg)
  dr, dc = r - center[0], c - center[1]
  s = dr * math.cos(th) + dc * math.sin(th)
  w = -dr * math.sin(th) + dc * math.cos(th)
  return (s / a) ** 2 + (w / b) ** 2 <= 1.0


@pytest.mark.parametrize("theta", [0.0, 12.0, -25.0, 40.0])
def test_ellipse_area_orientation_centre(theta):
  center = (101.3, 87.6)
  lv = _ellipse((200, 180), center, 60.0, 25.0, theta)
  epi = _ellipse((200, 180), center, 68.0, 33.0, theta)
  seg = np.where(lv, 1, np.where(epi, 2, 0)).astype(np.uint8)
  att = metrics.shape_attributes(seg)
  assert att["lv_area"] == pytest.approx(math.pi * 60 * 25, rel=0.01)
  assert att["myo_area"] == pytest.approx(math.pi * (68 * 33 - 60 * 25), rel=0.01)
  assert att["lv_orientation"] == pytest.approx(theta, abs=1.0)
  assert att["epi_center_y"] == pytest.approx(center[0], abs=0.5)
  assert att["epi_center_x"] == pytest.approx(center[1], abs=0.5)


def test_orientation_horizontal_and_empty():
  assert abs(metrics.orientation_deg(_ellipse((60, 80), (30, 40), 30, 8, 90.0)) - 90.0) < 1.0
  assert math.isnan(metrics.orientation_deg(np.zeros((5, 5), bool)))


def _box_lv(below_label):
  """LV = rows 10..40 x cols 20..40, myo 3 px thick on top and sides, open at the bottom."""
  seg = np.zeros((60, 60), np.uint8)
  seg[7:41, 17:44] = 2
  seg[10:41, 20:41] = 1
  seg[41:50, 17:44] = below_label
  return seg


@pytest.mark.parametrize("below", [0, 3])
def test_base_points_width_length_hand_built(below):
  seg = _box_lv(below)
  np.testing.assert_array_equal(metrics.lv_base_points(seg), [[40, 20], [40, 40]])
  att = metrics.shape_attributes(seg)
  assert att["lv_base_width"] == pytest.approx(20.0)
  # Base midpoint (40, 30); farthest LV pixels are the top corners (10, 20) / (10, 40).
  assert att["lv_length"] == pytest.approx(math.sqrt(30 ** 2 + 10 ** 2))


def test_base_points_slanted_base():
  seg = _box_lv(0)
  seg[38:41, 31:41] = 0  # right half of the base 3 rows higher: lowest right LV row is 37
  seg[38:41, 41:44] = 0
  base = metrics.lv_base_points(seg)
  np.testing.assert_array_equal(base, [[40, 20], [37, 40]])


def test_base_points_closed_lv_is_none():
  seg = np.zeros((30, 30), np.uint8)
  seg[5:25, 5:25] = 2
  seg[10:20, 10:20] = 1
  assert metrics.lv_base_points(seg) is None
  att = metrics.shape_attributes(seg)
  assert math.isnan(att["lv_base_width"]) and math.isnan(att["lv_length"])


def test_resample_nearest_hand_cases():
  a = np.arange(4, dtype=np.uint8).reshape(2, 2)
  up = metrics.resample_nearest(a, (0.308, 0.616))  # x2 rows, x2 cols
  np.testing.assert_array_equal(up, np.kron(a, np.ones((2, 2), np.uint8)))
  b = np.arange(16, dtype=np.uint8).reshape(4, 4)
  down = metrics.resample_nearest(b, (0.077, 0.154))  # /2: keeps pixels 1 and 3
  np.testing.assert_array_equal(down, b[[1, 3]][:, [1, 3]])
  seq = np.stack([b, b + 1])
  assert metrics.resample_nearest(seq, (0.154, 0.308)).shape == (2, 4, 4)


def test_consistency_error_hand_computed():
  lo, hi = 10.0, 20.0
  np.testing.assert_allclose(metrics.consistency_error(np.linspace(10, 30, 7), (lo, hi)), 0,
                             atol=1e-12)
  # Scaled [0, 0.5, 0.2, 0.2] -> e = [0.5 - 0.1, 0.2 - 0.35].
  np.testing.assert_allclose(metrics.consistency_error([10, 15, 12, 12], (lo, hi)),
                             [0.4, -0.15])


def test_injected_jump_is_flagged_smooth_curve_is_not():
  t = np.arange(20)
  smooth = 75000 + 15000 * np.cos(np.pi * t / 19)  # ED -> ES area decrease
  jumped = smooth.copy()
  jumped[10] += 2500  # scaled jump 2500 / 92772 = 0.027 > 0.016; neighbours get half
  res = metrics.temporal_consistency({"lv_area": smooth})
  assert not res["temporal_error"] and res["share"]["lv_area"] == 0.0
  res = metrics.temporal_consistency({"lv_area": jumped})
  assert res["temporal_error"]
  flags = res["inconsistent"]["lv_area"]  # interior frames 1..18
  np.testing.assert_array_equal(np.flatnonzero(flags), [10 - 1])
  assert res["share"]["lv_area"] == pytest.approx(1 / 18)
  assert res["n_inconsistent_frames"] == 1


def test_nan_attribute_is_flagged():
  curve = np.full(5, 50000.0)
  curve[2] = np.nan
  res = metrics.temporal_consistency({"lv_area": curve})
  np.testing.assert_array_equal(res["inconsistent"]["lv_area"], [True, True, True])


def _lv_sequence(n, spacing, shape=(160, 96), lateral_jump=None):
  """A half-ellipse LV (apex up) with an open-bottom myocardium, shrinking smoothly
  from ED to ES; sizes in mm. `lateral_jump=(t, mm)` shifts frame t sideways."""
  r, c = np.meshgrid(np.arange(shape[0]) * spacing[0], np.arange(shape[1]) * spacing[1],
                     indexing="ij")
  frames = []
  for t in range(n):
    k = 0.5 * (1 - math.cos(math.pi * t / (n - 1)))  # 0 -> 1, smooth
    a, b = 70.0 - 10.0 * k, 22.0 - 5.0 * k
    base_r, base_c = 85.0, 45.0 + (lateral_jump[1] if lateral_jump and lateral_jump[0] == t else 0)
    s, w = base_r - r, c - base_c  # s: up from the base line
    lv = (s >= 0) & ((s / a) ** 2 + (w / b) ** 2 <= 1)
    epi = (s >= 0) & ((s / (a + 8)) ** 2 + (w / (b + 8)) ** 2 <= 1)
    la = (s < 0) & (s > -30) & (np.abs(w) < b)
    frames.append(np.where(lv, 1, np.where(epi, 2, np.where(la, 3, 0))))
  return np.asarray(frames, np.uint8)


def test_sequence_smooth_vs_jump_on_stored_grid():
  spacing = (0.6, 1.0)  # mm per stored pixel, resampled to 0.154 x 0.308 before measuring
  smooth = _lv_sequence(9, spacing)
  res = metrics.sequence_temporal_consistency(smooth, spacing)
  # Attributes are in native-grid pixels: the ED LV area is about pi/2 a b mm^2.
  assert res["curves"]["lv_area"][0] == pytest.approx(
      math.pi / 2 * 70 * 22 / (0.154 * 0.308), rel=0.03)
  assert res["curves"]["lv_base_width"][0] == pytest.approx(2 * 22 / 0.308, rel=0.05)
  assert res["curves"]["lv_length"][0] == pytest.approx(70 / 0.154, rel=0.03)
  assert not res["temporal_error"], {k: np.abs(v).max() for k, v in res["errors"].items()}
  jump = _lv_sequence(9, spacing, lateral_jump=(4, 3.0))
  res = metrics.sequence_temporal_consistency(jump, spacing)
  assert res["temporal_error"]
  assert res["inconsistent"]["epi_center_x"][4 - 1]
