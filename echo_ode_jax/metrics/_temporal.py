"""Temporal inconsistency of a segmented sequence (Painchaud et al., IEEE TMI 2022).

Seven shape attributes (`shape_attributes`) are measured per frame on the
CAMUS 2019 native grid, on which the reference bounds and thresholds below
were derived: 0.154 mm per row (depth) and 0.308 mm per column (lateral).
Each mask is first resampled (nearest neighbour) from its stored grid to that
spacing, using the stored voxelspacing; attributes are then in pixels of the
native grid. Each attribute curve a_t is min-max scaled with fixed bounds,
a'_t = (a_t - min) / (max - min), and for interior frames
e_t = a'_t - (a'_{t-1} + a'_{t+1}) / 2. A frame is inconsistent for an
attribute when |e_t| > threshold; a sequence with any inconsistent frame is one
"temporal error". An attribute that cannot be measured (nan) in a frame makes
the interior frames whose e_t uses it inconsistent.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from echo_ode_jax.data.resample import nearest_index
from echo_ode_jax.metrics._shape import shape_attributes

#: (row, col) mm per pixel of the grid the bounds and thresholds refer to.
CAMUS_NATIVE_SPACING = (0.154, 0.308)

#: attribute -> (min, max) for min-max scaling (native-grid pixels / degrees).
ATTRIBUTE_BOUNDS = {
    "lv_area": (19632.0, 112404.0),
    "lv_base_width": (53.7587, 172.8844),
    "lv_length": (301.4249, 612.8623),
    "lv_orientation": (-7.0359, 15.2600),
    "myo_area": (23228.0, 64134.0),
    "epi_center_x": (183.3696, 479.3726),
    "epi_center_y": (285.8587, 609.2086),
}

#: attribute -> threshold on |e_t| (scaled units).
ATTRIBUTE_THRESHOLDS = {
    "lv_area": 1.60e-2,
    "lv_base_width": 9.69e-2,
    "lv_length": 2.62e-2,
    "lv_orientation": 2.29e-2,
    "myo_area": 3.21e-2,
    "epi_center_x": 4.56e-3,
    "epi_center_y": 1.10e-2,
}

ATTRIBUTES = tuple(ATTRIBUTE_BOUNDS)


def resample_nearest(labels: np.ndarray, spacing: Sequence[float],
                     target_spacing: Sequence[float] = CAMUS_NATIVE_SPACING) -> np.ndarray:
  """Nearest-neighbour resampling of label maps to another pixel spacing.

  The field of view is kept: the output size along each axis is
  round(n * spacing / target_spacing) (at least 1), and output pixel i takes
  the input pixel containing its centre, floor((i + 0.5) * n / n_out).

  Args:
    labels: (..., H, W) label maps.
    spacing: (row, col) mm per pixel of `labels`.
    target_spacing: (row, col) mm per pixel wanted.

  Returns:
    (..., H', W') labels, same dtype.
  """
  labels = np.asarray(labels)
  idx = []
  for n, s, ts in zip(labels.shape[-2:], spacing, target_spacing):
    if s <= 0 or ts <= 0:
      raise ValueError(f"resample_nearest: spacings must be > 0, got {spacing}, {target_spacing}")
    m = max(1, int(round(n * float(s) / float(ts))))
    idx.append(nearest_index(n, m))
  return labels[..., idx[0][:, None], idx[1][None, :]]


def attribute_curves(labels: np.ndarray, spacing: Sequence[float]) -> dict[str, np.ndarray]:
  """Per-frame attributes of a sequence, measured on the CAMUS native grid.

  Args:
    labels: (T, H, W) labels on the stored grid.
    spacing: (row, col) mm per pixel of the stored grid (the voxelspacing attr).

  Returns:
    attribute name -> (T,) values (native-grid pixels; degrees for orientation).
  """
  native = resample_nearest(labels, spacing)
  per = [shape_attributes(f) for f in native]
  return {a: np.array([p[a] for p in per], np.float64) for a in ATTRIBUTES}


def consistency_error(curve: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
  """(T - 2,) e_t = a'_t - (a'_{t-1} + a'_{t+1}) / 2 of a min-max scaled curve (interior frames)."""
  lo, hi = bounds
  a = (np.asarray(curve, np.float64) - lo) / (hi - lo)
  return a[1:-1] - 0.5 * (a[:-2] + a[2:])


def temporal_consistency(curves: dict[str, np.ndarray],
                         bounds: dict[str, tuple[float, float]] | None = None,
                         thresholds: dict[str, float] | None = None) -> dict:
  """Flags inconsistent frames of attribute curves.

  Args:
    curves: attribute -> (T,) values (as from `attribute_curves`).
    bounds, thresholds: override `ATTRIBUTE_BOUNDS` / `ATTRIBUTE_THRESHOLDS`.

  Returns:
    {"errors": attr -> (T-2,) e_t, "inconsistent": attr -> (T-2,) bool
     (|e_t| > threshold, or e_t nan), "share": attr -> share of interior
     frames flagged (nan when T < 3), "n_inconsistent_frames": interior frames
     flagged for at least one attribute, "temporal_error": bool}.
  """
  bounds = {**ATTRIBUTE_BOUNDS, **(bounds or {})}
  thresholds = {**ATTRIBUTE_THRESHOLDS, **(thresholds or {})}
  errors, flags, share = {}, {}, {}
  any_flag = None
  for name, curve in curves.items():
    e = consistency_error(curve, bounds[name])
    f = ~(np.abs(e) <= thresholds[name])  # nan -> flagged
    errors[name], flags[name] = e, f
    share[name] = float(f.mean()) if len(f) else float("nan")
    any_flag = f if any_flag is None else any_flag | f
  n_bad = int(any_flag.sum()) if any_flag is not None else 0
  return {"errors": errors, "inconsistent": flags, "share": share,
          "n_inconsistent_frames": n_bad, "temporal_error": n_bad > 0}


def sequence_temporal_consistency(labels: np.ndarray, spacing: Sequence[float]) -> dict:
  """`temporal_consistency` of `attribute_curves(labels, spacing)`; adds "curves"."""
  curves = attribute_curves(labels, spacing)
  out = temporal_consistency(curves)
  out["curves"] = curves
  return out
