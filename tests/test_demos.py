"""The flow demo at a tiny size."""
import os

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
