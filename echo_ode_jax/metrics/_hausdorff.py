"""Symmetric Hausdorff distance (mm) between contours, and its frame-to-frame mean.

The distance is taken between the *boundary pixels* of the two masks (the
standard contour Hausdorff distance), not between all mask pixels. A boundary
pixel is a mask pixel with at least one 4-neighbour outside the mask (pixels on
the image edge count as boundary), so the contour is 8-connected. Distances
are between pixel centres in mm, using the (possibly anisotropic) spacing.

Empty masks: two empty masks are at distance 0; one empty and one non-empty
mask are at distance ``inf`` (the sup over points of a distance to an empty
set). Averages over frames then become ``inf``; `summarize` counts such
sequences separately instead of averaging them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from echo_ode_jax.metrics._dice import annotated_frames, structure_mask

def boundary(mask: np.ndarray) -> np.ndarray:
  """(H, W) bool: pixels of `mask` with a 4-neighbour outside it (or on the image edge)."""
  mask = np.asarray(mask, bool)
  p = np.pad(mask, 1)
  interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  return mask & ~interior


def _directed(ba: np.ndarray, bb: np.ndarray, spacing: Sequence[float]) -> float:
  """Directed distance between two non-empty boundary masks, EDT on their joint bounding box.

  The crop is exact: every point of `bb` lies inside it, so the nearest one is found.
  """
  both = ba | bb
  rows = np.flatnonzero(both.any(axis=1))
  cols = np.flatnonzero(both.any(axis=0))
  win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
  dist = ndimage.distance_transform_edt(~bb[win], sampling=tuple(float(s) for s in spacing))
  return float(dist[ba[win]].max())


def directed_hausdorff_mm(a: np.ndarray, b: np.ndarray,
                          spacing: Sequence[float] = (1.0, 1.0)) -> float:
  """max over boundary pixels of `a` of the distance (mm) to the nearest boundary pixel of `b`.

  0 when `a` is empty, inf when only `b` is.

  Args:
    a, b: (H, W) boolean masks.
    spacing: (row, col) mm per pixel.
  """
  ba, bb = boundary(a), boundary(b)
  if not ba.any():
    return 0.0
  if not bb.any():
    return float("inf")
  return _directed(ba, bb, spacing)


def _hausdorff_boundaries(ba: np.ndarray, bb: np.ndarray, spacing: Sequence[float]) -> float:
  ea, eb = not ba.any(), not bb.any()
  if ea and eb:
    return 0.0
  if ea or eb:
    return float("inf")
  return max(_directed(ba, bb, spacing), _directed(bb, ba, spacing))


def hausdorff_mm(a: np.ndarray, b: np.ndarray,
                 spacing: Sequence[float] = (1.0, 1.0)) -> float:
  """Symmetric contour Hausdorff distance in mm between two (H, W) boolean masks.

  0 when both masks are empty, inf when exactly one is (see module docstring).
  """
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"hausdorff_mm: need two (H, W) masks, got {a.shape}, {b.shape}")
  return _hausdorff_boundaries(boundary(a), boundary(b), spacing)


def consecutive_hausdorff(labels: np.ndarray, structure: str,
                          spacing: Sequence[float],
                          frames: Sequence[int] | None = None) -> np.ndarray:
  """Hausdorff distances (mm) of one structure between consecutive frames.

  Args:
    labels: (T, H, W) label maps.
    structure: "endo", "epi" or "myo".
    spacing: (row, col) mm per pixel.
    frames: restrict to these frame indices (sorted); only pairs (t, t+1) with
      both t and t+1 in `frames` are used. None = all frames.

  Returns:
    (P,) distances, one per consecutive pair (t, t+1), in increasing t.
  """
  labels = np.asarray(labels)
  keep = set(range(labels.shape[0]) if frames is None else (int(f) for f in frames))
  bounds = {t: boundary(structure_mask(labels[t], structure)) for t in sorted(keep)}
  out = [_hausdorff_boundaries(bounds[t], bounds[t + 1], spacing)
         for t in range(labels.shape[0] - 1) if t in keep and t + 1 in keep]
  return np.asarray(out, np.float64)


def temporal_hausdorff(labels: np.ndarray, spacing: Sequence[float],
                       annotated_only: bool = False, prefix: str = "") -> dict[str, float]:
  """Mean consecutive-frame Hausdorff distance (mm) of endo and epi, and their mean.

  Args:
    labels: (T, H, W) labels (for a ground truth, 255 marks unannotated frames).
    spacing: (row, col) mm per pixel.
    annotated_only: use only pairs of consecutive annotated frames (for gt).
    prefix: prepended to the keys (e.g. "gt_").

  Returns:
    {prefix+"hd_endo", prefix+"hd_epi", prefix+"hd" (mean of the two),
    prefix+"hd_pairs" (number of frame pairs)}; nan when there is no pair,
    inf when a mask is empty in one frame of a pair and not in the other.
  """
  frames = annotated_frames(labels) if annotated_only else None
  out: dict[str, float] = {}
  n = 0
  for s in ("endo", "epi"):
    d = consecutive_hausdorff(labels, s, spacing, frames)
    n = len(d)
    out[prefix + f"hd_{s}"] = float(d.mean()) if n else float("nan")
  out[prefix + "hd"] = 0.5 * (out[prefix + "hd_endo"] + out[prefix + "hd_epi"])
  out[prefix + "hd_pairs"] = n
  return out
