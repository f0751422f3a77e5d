"""Ejection fraction from the ED and ES masks: LV area proxy and Simpson's disks."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from echo_ode_jax.metrics._shape import LV, lv_apex, lv_base_points


def lv_area_mm2(seg: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> float:
  """LV cavity area (label 1) in mm^2: pixel count times the pixel area."""
  return float((np.asarray(seg) == LV).sum()) * float(spacing[0]) * float(spacing[1])


def simpson_volume_ml(seg: np.ndarray, spacing: Sequence[float], n_disks: int = 20,
                      base_points: np.ndarray | None = None) -> float:
  """LV volume by the single-plane method of disks (Simpson), in mL.

  The long axis runs from the base midpoint (`lv_base_points`, or the given
  `base_points`) to the apex, the LV pixel farthest from it in mm. It is cut
  into `n_disks` slabs of height h = L / n_disks; the diameter d_i of disk i is
  the length, in mm, of the line perpendicular to the axis through the slab
  centre that lies inside the LV (each pixel is taken as its full rectangle;
  the line is sampled every 1/8 of the smaller pixel side). Then
  V = sum_i pi/4 d_i^2 h, converted from mm^3 to mL.

  Args:
    seg: (H, W) labels (LV = 1; the myocardium is needed to find the base).
    spacing: (row, col) mm per pixel.
    n_disks: number of disks.
    base_points: optional (2, 2) [[row, col], [row, col]] base points in pixels.

  Returns:
    Volume in mL; nan when the LV is empty or the base cannot be found.
  """
  seg = np.asarray(seg)
  lv = seg == LV
  if not lv.any():
    return float("nan")
  base = lv_base_points(seg) if base_points is None else np.asarray(base_points, np.float64)
  if base is None:
    return float("nan")
  sp = np.asarray(spacing, np.float64)
  mid_px = base.mean(axis=0)
  apex_px = lv_apex(seg, mid_px, sp)
  mid, apex = mid_px * sp, apex_px * sp
  axis = apex - mid
  length = float(np.hypot(*axis))
  if length == 0.0:
    return 0.0
  u = axis / length
  n = np.array([-u[1], u[0]])
  # Half-extent of the sampled perpendicular lines: beyond every LV pixel.
  r, c = np.nonzero(lv)
  pts = np.stack([r, c], -1) * sp - mid
  half = float(np.abs(pts @ n).max()) + float(np.hypot(*sp))
  step = float(sp.min()) / 8.0
  w = np.arange(-half, half + step, step)
  s = (np.arange(n_disks) + 0.5) * length / n_disks
  xy = mid + s[:, None, None] * u + w[None, :, None] * n  # (n_disks, S, 2) mm
  ij = np.rint(xy / sp).astype(np.int64)
  h, wd = lv.shape
  ok = (ij[..., 0] >= 0) & (ij[..., 0] < h) & (ij[..., 1] >= 0) & (ij[..., 1] < wd)
  inside = np.zeros(ok.shape, bool)
  inside[ok] = lv[ij[..., 0][ok], ij[..., 1][ok]]
  d = inside.sum(axis=1) * step
  return float(np.sum(np.pi / 4.0 * d ** 2) * (length / n_disks) / 1000.0)


def ejection_fraction(edv: float, esv: float) -> float:
  """EF in percent, 100 (EDV - ESV) / EDV; nan when EDV is not positive or a volume is nan."""
  if not np.isfinite(edv) or not np.isfinite(esv) or edv <= 0:
    return float("nan")
  return 100.0 * (edv - esv) / edv


def ef_measures(ed: np.ndarray, es: np.ndarray, spacing: Sequence[float],
                prefix: str = "") -> dict[str, float]:
  """EF by both methods from one ED and one ES label map.

  Returns:
    {prefix+"ef_area" (%), prefix+"ef_simpson" (%), prefix+"edv_ml",
    prefix+"esv_ml" (Simpson volumes in mL)}.
  """
  edv = simpson_volume_ml(ed, spacing)
  esv = simpson_volume_ml(es, spacing)
  return {
      prefix + "ef_area": ejection_fraction(lv_area_mm2(ed, spacing), lv_area_mm2(es, spacing)),
      prefix + "ef_simpson": ejection_fraction(edv, esv),
      prefix + "edv_ml": edv,
      prefix + "esv_ml": esv,
  }
