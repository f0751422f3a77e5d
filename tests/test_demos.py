"""The flow demo at a tiny size."""
import os

import numpy as np
import pytest
from scipy import linalg

from echo_ode_jax import demos


def test_flow_demo_writes_png_and_matches_euler_determinant(tmp_path):
  res = demos.flow_demo(size=32, solver="euler", dt=0.1, out=str(tmp_path))
  assert os.path.getsize(res["png"]) > 1000
  # For V = A (p - c), Euler gives phi_1 = c + (I + dt A)^10 (p - c), so
  # det = det(I + dt A)^10 = ((1 - a dt)^2 + (w dt)^2)^10 with a = 0.4, w = 0.6.
  expect = ((1 - 0.04) ** 2 + 0.06 ** 2) ** 10
  assert abs(res["det_mean"] - expect) < 2e-3
  assert res["folding_fraction"] == 0.0
  # The exact flow has det e^{-0.8}; Euler's O(dt) error keeps it close.
  assert abs(res["det_exact"] - 0.4493) < 1e-3
  # phi_1 error: M = (I + dt A)^10 - e^A is a scaled rotation, so the error at
  # p is |M| |p - c|, largest at the inner pixel farthest from the centre.
  a, w = 0.4, 0.6
  mat = np.array([[-a, -w], [w, -a]])
  m = np.linalg.matrix_power(np.eye(2) + 0.1 * mat, 10) - linalg.expm(mat)
  r = np.hypot(*np.meshgrid(np.arange(32) - 15.5, np.arange(32) - 15.5))
  expect_err = np.sqrt(abs(np.linalg.det(m))) * r[r < 0.4 * 32].max()
  assert res["max_error_px"] == pytest.approx(expect_err, rel=1e-3, abs=1e-3)
  # m_1 = m_0 o phi_1 covers phi_1^-1(disc), of area |disc| / det: the ratio
  # area(m_0) / area(m_1) is det, up to pixel rounding at 32^2.
  assert res["mask_area_ratio"] == pytest.approx(expect, rel=0.05)
