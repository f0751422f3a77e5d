"""Dice and contour Hausdorff distance against hand-computed cases and scipy."""
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import directed_hausdorff

from echo_ode_jax import metrics


def _disc(shape, center_mm, radius_mm, spacing=(1.0, 1.0)):
  r, c = np.meshgrid(np.arange(shape[0]) * spacing[0], np.arange(shape[1]) * spacing[1],
                     indexing="ij")
  return (r - center_mm[0]) ** 2 + (c - center_mm[1]) ** 2 <= radius_mm ** 2


def _scipy_boundary(mask):
  """Mask minus its erosion by the 4-neighbourhood cross (outside the image = False)."""
  cross = ndimage.generate_binary_structure(2, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)


def _boundary_points(mask, spacing):
  """Boundary pixels as (N, 2) mm coordinates."""
  r, c = np.nonzero(_scipy_boundary(mask))
  return np.stack([r * spacing[0], c * spacing[1]], -1)


# ---- Dice -------------------------------------------------------------------------------

def test_dice_hand_computed():
  a = np.zeros((8, 8), bool)
  b = np.zeros((8, 8), bool)
  a[0:4, 0:5] = True  # 20 px
  b[2:6, 0:5] = True  # 20 px, overlap rows 2-3 = 10 px
  assert metrics.dice(a, b) == pytest.approx(2 * 10 / 40)
  assert metrics.dice(a, a) == 1.0
  assert metrics.dice(a, np.zeros_like(a)) == 0.0
  assert metrics.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_dice_structures_and_unannotated_frames():
  gt = np.zeros((3, 10, 10), np.uint8)
  gt[:, 1:7, 1:7] = 2   # myocardium ring 6x6 - 4x4 = 20 px
  gt[:, 2:6, 2:6] = 1   # LV 16 px
  gt[2] = 255           # frame 2 not annotated
  pred = gt.copy()
  pred[0, 1, 1] = 1     # frame 0: one myo pixel called LV
  pred[2] = 0           # garbage on the unannotated frame
  endo0 = 2 * 16 / (17 + 16)
  myo0 = 2 * 19 / (19 + 20)
  np.testing.assert_allclose(metrics.dice_per_frame(pred, gt, "endo"), [endo0, 1.0, np.nan])
  np.testing.assert_allclose(metrics.dice_per_frame(pred, gt, "myo"), [myo0, 1.0, np.nan])
  np.testing.assert_allclose(metrics.dice_per_frame(pred, gt, "epi"), [1.0, 1.0, np.nan])
  s = metrics.dice_scores(pred, gt)
  assert s["n_annotated"] == 2
  assert s["dice_endo"] == pytest.approx((endo0 + 1) / 2)
  assert s["dice_myo"] == pytest.approx((myo0 + 1) / 2)
  assert s["dice_epi"] == pytest.approx(1.0)
  assert s["mdice"] == pytest.approx(((endo0 + 1) / 2 + 1) / 2)


# ---- Hausdorff --------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [(3, 0), (0, 5), (3, 4), (-2, 7)])
def test_hd_shifted_disc_isotropic(shift):
  spacing = (0.5, 0.5)
  a = _disc((64, 64), (16.0, 16.0), 7.3, spacing)
  b = np.roll(a, shift, axis=(0, 1))
  expected = np.hypot(shift[0] * spacing[0], shift[1] * spacing[1])
  assert metrics.hausdorff_mm(a, b, spacing) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("shift", [(2, 0), (0, 3), (2, 3)])
def test_hd_shifted_disc_anisotropic(shift):
  spacing = (0.3, 0.7)  # the disc is round in mm, an ellipse in pixels
  a = _disc((96, 48), (14.0, 16.0), 8.0, spacing)
  b = np.roll(a, shift, axis=(0, 1))
  expected = np.hypot(shift[0] * spacing[0], shift[1] * spacing[1])
  assert metrics.hausdorff_mm(a, b, spacing) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_hd_matches_scipy_directed_hausdorff_on_random_blobs(seed):
  rng = np.random.default_rng(seed)
  spacing = tuple(rng.uniform(0.2, 1.0, 2))
  field = ndimage.gaussian_filter(rng.normal(size=(2, 60, 50)), (0, 3, 3))
  a, b = field[0] > 0.05, field[1] > 0.05
  pa, pb = _boundary_points(a, spacing), _boundary_points(b, spacing)
  ref = max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])
  assert metrics.hausdorff_mm(a, b, spacing) == pytest.approx(ref, rel=1e-9)
  assert metrics.directed_hausdorff_mm(a, b, spacing) == pytest.approx(
      directed_hausdorff(pa, pb)[0], rel=1e-9)


def test_boundary_matches_scipy_erosion(rng):
  mask = ndimage.gaussian_filter(rng.normal(size=(40, 30)), 2) > 0
  mask[0, :] = True  # touches the image edge
  np.testing.assert_array_equal(metrics.boundary(mask), _scipy_boundary(mask))


def test_hd_empty_masks():
  a = _disc((20, 20), (10, 10), 4)
  e = np.zeros_like(a)
  assert metrics.hausdorff_mm(e, e) == 0.0
  assert metrics.hausdorff_mm(a, e) == np.inf
  assert metrics.hausdorff_mm(e, a) == np.inf


def test_temporal_hausdorff_of_moving_discs_and_gt_pairs():
  spacing = (0.4, 0.6)
  shifts = [0, 1, 3, 4, 6]  # row offsets in pixels, steps 1, 2, 1, 2
  first = np.zeros((80, 48), np.uint8)
  first[_disc((80, 48), (10.0, 14.0), 7.0, spacing)] = 2
  first[_disc((80, 48), (10.0, 14.0), 5.0, spacing)] = 1
  seq = np.stack([np.roll(first, k, axis=0) for k in shifts])
  steps = np.diff(shifts) * spacing[0]
  hd = metrics.temporal_hausdorff(seq, spacing)
  assert hd["hd_endo"] == pytest.approx(steps.mean())
  assert hd["hd_epi"] == pytest.approx(steps.mean())
  assert hd["hd"] == pytest.approx(steps.mean())
  assert hd["hd_pairs"] == 4
  gt = seq.copy()
  gt[2] = 255  # only the pairs (0, 1) and (3, 4) remain
  g = metrics.temporal_hausdorff(gt, spacing, annotated_only=True, prefix="gt_")
  assert g["gt_hd_pairs"] == 2
  assert g["gt_hd_endo"] == pytest.approx((steps[0] + steps[3]) / 2)
