"""Demo jobs behind experiments/*.py (importable and tested)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from echo_ode_jax import flow, kernels, plots


def analytic_spiral(size: int, contraction: float = 0.4, omega: float = 0.6):
  """A stationary linear field V(p) = A (p - c), A = [[-a, -w], [w, -a]].

  Returns (velocity (H, W, 2) in pixels/unit time, exact map fn t -> (H, W, 2),
  exact det fn t -> float). phi_t(p) = c + e^{-a t} R(w t) (p - c), det = e^{-2 a t}.
  """
  c = (size - 1) / 2.0
  g = np.asarray(kernels.identity_grid(size, size), np.float64) - c
  a, w = contraction, omega
  vel = np.stack([-a * g[..., 0] - w * g[..., 1], w * g[..., 0] - a * g[..., 1]], -1)

  def exact(t):
    s, th = np.exp(-a * t), w * t
    return c + s * np.stack([np.cos(th) * g[..., 0] - np.sin(th) * g[..., 1],
                             np.sin(th) * g[..., 0] + np.cos(th) * g[..., 1]], -1)

  return vel.astype(np.float32), exact, (lambda t: float(np.exp(-2 * a * t)))


def flow_demo(size: int = 128, solver: str = "euler", dt: float = 0.1,
              out: str = "flow_demo_out") -> dict:
  """Integrates :func:`analytic_spiral`, propagates a disc mask, writes a PNG."""
  vel, exact, det_exact = analytic_spiral(size)
  ts = flow.knot_times(solver, dt)
  knots = jnp.broadcast_to(jnp.asarray(vel), (len(ts),) + vel.shape)
  phi = np.asarray(jax.jit(lambda k: flow.integrate_flow(k, ts, [1.0], solver=solver,
                                                         dt=dt))(knots)[0])
  jdet = np.asarray(kernels.jacobian_determinant(jnp.asarray(phi)))
  c = (size - 1) / 2.0
  g = np.asarray(kernels.identity_grid(size, size))
  disc = ((g[..., 0] - c * 0.8) ** 2 + (g[..., 1] - c) ** 2 <= (0.25 * size) ** 2)
  m0 = disc.astype(np.int32)
  mt = np.asarray(kernels.hard_labels(kernels.warp_labels(m0, phi, num_classes=2)))
  err = np.linalg.norm(phi - exact(1.0), axis=-1)
  inner = np.hypot(g[..., 0] - c, g[..., 1] - c) < 0.4 * size
  os.makedirs(out, exist_ok=True)
  fig = plots.deformation_figure(phi, jdet, mask0=m0, mask_t=mt, title=(
      f"analytic spiral, {solver} dt={dt}: phi_1 error {err[inner].max():.3f} px"),
      grid_step=max(2, size // 24))
  path = plots.save(fig, os.path.join(out, "flow_demo.png"))
  return {
      "png": path,
      "max_error_px": round(float(err[inner].max()), 4),
      "det_exact": round(det_exact(1.0), 4),
      "det_mean": round(float(jdet[inner].mean()), 4),
      "folding_fraction": float(np.mean(jdet <= 0)),
      "mask_area_ratio": round(float(m0.sum() / max(1, mt.sum())), 4),
  }
