"""LV landmarks and shape measures on one (H, W) label map (coordinates in pixels)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

LV, MYO = 1, 2


def dilate3x3(mask: np.ndarray) -> np.ndarray:
  """Binary dilation of an (H, W) mask by a 3x3 square (outside the image counts as False)."""
  p = np.pad(np.asarray(mask, bool), 1)
  rows = p[:-2] | p[1:-1] | p[2:]
  return rows[:, :-2] | rows[:, 1:-1] | rows[:, 2:]


def _lv_crop(seg: np.ndarray, margin: int):
  """(seg cropped to the LV bounding box grown by `margin`, (row, col) offset), or None."""
  rows = np.flatnonzero((seg == LV).any(axis=1))
  if len(rows) == 0:
    return None
  cols = np.flatnonzero((seg == LV).any(axis=0))
  r0, c0 = max(rows[0] - margin, 0), max(cols[0] - margin, 0)
  crop = seg[r0:rows[-1] + margin + 1, c0:cols[-1] + margin + 1]
  return crop, np.array([r0, c0], np.float64)


def lv_base_points(seg: np.ndarray) -> np.ndarray | None:
  """The two base (mitral annulus) points of the LV, or None when not found.

  Candidates are the LV pixels (label 1) that touch, after a 3x3 dilation,
  both the myocardium (label 2) and the rest (background or LA, labels 0 and
  3). They are split by column at their mean column (left: col < mean); on
  each side the lowest pixel (largest row) is taken, ties going to the outer
  pixel (smallest col on the left, largest on the right). If all candidates
  share one column, they are split by row at the mean row instead and the
  extreme rows are taken.

  Args:
    seg: (H, W) labels.

  Returns:
    (2, 2) float array [[row, col] left, [row, col] right] in pixels, or None
    when fewer than two candidates exist.
  """
  cropped = _lv_crop(np.asarray(seg), margin=1)  # the 3x3 test only looks 1 px around the LV
  if cropped is None:
    return None
  seg, offset = cropped
  lv = seg == LV
  myo = seg == MYO
  rest = ~(lv | myo)
  cand = lv & dilate3x3(myo) & dilate3x3(rest)
  r, c = np.nonzero(cand)
  if len(r) < 2:
    return None
  base = _pick_base(r, c)
  return None if base is None else base + offset


def _pick_base(r: np.ndarray, c: np.ndarray) -> np.ndarray | None:
  """The two base points among candidate pixels (see `lv_base_points`)."""
  if np.all(c == c[0]):
    upper = r < r.mean()
    if not upper.any() or upper.all():
      return None
    return np.array([[r[upper].min(), c[0]], [r[~upper].max(), c[0]]], np.float64)
  left = c < c.mean()
  pts = []
  for side, sign in ((left, 1), (~left, -1)):
    rs, cs = r[side], c[side]
    # Largest row first, then the outer column (small on the left, large on the right).
    i = np.lexsort((sign * cs, -rs))[0]
    pts.append([rs[i], cs[i]])
  return np.asarray(pts, np.float64)


def lv_apex(seg: np.ndarray, base_mid: np.ndarray,
            spacing: Sequence[float] = (1.0, 1.0)) -> np.ndarray | None:
  """(2,) [row, col] of the LV pixel farthest (in mm with `spacing`) from `base_mid`."""
  r, c = np.nonzero(np.asarray(seg) == LV)
  if len(r) == 0:
    return None
  d2 = ((r - base_mid[0]) * spacing[0]) ** 2 + ((c - base_mid[1]) * spacing[1]) ** 2
  i = int(np.argmax(d2))
  return np.array([r[i], c[i]], np.float64)


def orientation_deg(mask: np.ndarray) -> float:
  """Orientation of the principal (long) axis of a mask, in degrees, in (-90, 90].

  The axis is the eigenvector of the largest eigenvalue of the covariance of
  the pixel (row, col) positions, i.e. the axis of least moment of inertia.
  The angle is measured from the row (vertical, downward) axis in pixel units:
  0 is vertical, positive when the axis leans towards larger columns as rows
  increase (top-left to bottom-right, as displayed), negative the other way;
  90 is horizontal. nan for an empty mask.
  """
  r, c = np.nonzero(np.asarray(mask, bool))
  if len(r) == 0:
    return float("nan")
  pts = np.stack([r, c]).astype(np.float64)
  pts -= pts.mean(axis=1, keepdims=True)
  cov = pts @ pts.T / pts.shape[1]
  _, vecs = np.linalg.eigh(cov)
  dr, dc = vecs[:, -1]
  if dr < 0 or (dr == 0 and dc < 0):
    dr, dc = -dr, -dc
  ang = math.degrees(math.atan2(dc, dr))
  return 90.0 if ang <= -90.0 else ang


def shape_attributes(seg: np.ndarray) -> dict[str, float]:
  """The seven shape attributes of Painchaud et al. (2022) on one label map.

  All are in pixels of the grid of `seg` (no spacing), which for the temporal
  consistency check is the CAMUS native grid (see `_temporal`). x is the
  column, y the row.

  Returns:
    {"lv_area": count of label 1,
     "lv_base_width": distance between the two base points,
     "lv_length": distance from the base midpoint to the farthest LV pixel,
     "lv_orientation": `orientation_deg` of the LV (degrees),
     "myo_area": count of label 2,
     "epi_center_x", "epi_center_y": column and row of the centre of mass of
       labels 1 and 2}.
    Values that cannot be measured (missing structure, no base) are nan.
  """
  seg = np.asarray(seg)
  lv = seg == LV
  epi = lv | (seg == MYO)
  out = {"lv_area": float(lv.sum())}
  base = lv_base_points(seg)
  if base is None:
    out["lv_base_width"] = out["lv_length"] = float("nan")
  else:
    out["lv_base_width"] = float(np.hypot(*(base[0] - base[1])))
    mid = base.mean(axis=0)
    apex = lv_apex(seg, mid)
    out["lv_length"] = float(np.hypot(*(apex - mid)))
  out["lv_orientation"] = orientation_deg(lv)
  out["myo_area"] = float((seg == MYO).sum())
  if epi.any():
    cy, cx = ndimage.center_of_mass(epi)
  else:
    cy = cx = float("nan")
  out["epi_center_x"] = float(cx)
  out["epi_center_y"] = float(cy)
  return out
