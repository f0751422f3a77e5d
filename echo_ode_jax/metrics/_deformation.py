"""Deformation quality of stored flows: Jacobian determinant and folding (numpy)."""
from __future__ import annotations

import numpy as np


def jacobian_determinant_np(phi: np.ndarray) -> np.ndarray:
  """det(D phi) of absolute maps, the numpy twin of `kernels.jacobian_determinant`.

  Args:
    phi: (..., H, W, 2) maps, absolute (row, col) positions in pixels (H, W >= 2).

  Returns:
    (..., H, W) determinant (area ratio; identity gives 1). Central differences
    inside, one-sided at the border (`numpy.gradient`).
  """
  phi = np.asarray(phi, np.float64)
  if phi.ndim < 3 or phi.shape[-1] != 2 or min(phi.shape[-3:-1]) < 2:
    raise ValueError(f"jacobian_determinant_np: need (..., H, W, 2), H, W >= 2; got {phi.shape}")
  ax_r, ax_c = phi.ndim - 3, phi.ndim - 2
  pr, pc = phi[..., 0], phi[..., 1]
  a = np.gradient(pr, axis=ax_r)
  b = np.gradient(pr, axis=ax_c)
  c = np.gradient(pc, axis=ax_r)
  d = np.gradient(pc, axis=ax_c)
  return a * d - b * c


def deformation_quality(flow: np.ndarray) -> dict[str, float]:
  """Folding and Jacobian statistics of a (T, H, W, 2) stack of absolute maps.

  Returns:
    {"fold_frac": share of all pixels of all frames with det <= 0,
     "jdet_min", "jdet_mean": min / mean det over all pixels and frames}.
  """
  det = jacobian_determinant_np(flow)
  return {"fold_frac": float(np.mean(det <= 0)), "jdet_min": float(det.min()),
          "jdet_mean": float(det.mean())}
