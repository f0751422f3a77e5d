"""Conventions of the temporal attributes checked on real CAMUS masks.

The reference bounds of the temporal-consistency attributes (Painchaud et al.)
are the extremes of the attributes over CAMUS masks on the native grid. If the
resampling (voxelspacing direction, row/col order) or the orientation sign were
wrong, real masks would fall far outside them.
"""
import numpy as np
import pytest

from conftest import camus_dir
from echo_ode_jax import metrics

pytestmark = pytest.mark.camus


def _masks(n_patients):
  nib = pytest.importorskip("nibabel")
  root = camus_dir() / "database_nifti"
  if not root.is_dir():
    pytest.skip(f"CAMUS data folder not found ({root.name} next to the repository)")
  out = []
  for p in sorted(root.glob("patient*"))[:n_patients]:
    for phase in ("ED", "ES"):
      f = p / f"{p.name}_4CH_{phase}_gt.nii.gz"
      if f.exists():
        img = nib.load(str(f))
        zx, zy = (float(z) for z in img.header.get_zooms()[:2])
        # NIfTI (x, y) -> (row = depth, col = lateral), apex at the top.
        out.append((np.asarray(img.dataobj, np.uint8).T, (zy, zx)))
  if not out:
    pytest.skip("no CAMUS 4CH masks found")
  return out


def test_real_masks_fall_within_reference_bounds():
  values = {a: [] for a in metrics.ATTRIBUTES}
  for seg, spacing in _masks(12):
    att = metrics.shape_attributes(metrics.resample_nearest(seg, spacing))
    for a in values:
      values[a].append(att[a])
  for a, (lo, hi) in metrics.ATTRIBUTE_BOUNDS.items():
    v = np.asarray(values[a])
    margin = 0.1 * (hi - lo)
    inside = np.mean((v >= lo - margin) & (v <= hi + margin))
    assert inside >= 0.9, (a, v)
    # The bounds span the population: its median sits well inside them (this
    # also pins the orientation sign, whose population is skewed positive).
    assert 0.25 <= (np.median(v) - lo) / (hi - lo) <= 0.75, (a, np.median(v))


def test_real_ed_es_pairs_give_physiological_simpson_volumes():
  masks = _masks(8)
  pairs = [(masks[i], masks[i + 1]) for i in range(0, len(masks) - 1, 2)]
  for (ed, spacing), (es, _) in pairs:
    ef = metrics.ef_measures(ed, es, spacing)
    assert 30.0 < ef["edv_ml"] < 350.0 and 5.0 < ef["esv_ml"] < ef["edv_ml"], ef
    # Volume scales faster than area, so the volume EF exceeds the area EF.
    assert 0.0 < ef["ef_area"] < ef["ef_simpson"] < 90.0, ef
