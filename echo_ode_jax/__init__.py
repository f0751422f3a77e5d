"""echo_ode_jax: Echo-ODE (Neural-ODE diffeomorphic registration for echo video) in JAX.

Public API (stable):
  warp(img, coords)                 bilinear sampling, border clamp
  jacobian_determinant(phi)         det(D phi) of an (H, W, 2) map
  integrate_flow(knots, knot_times, save_times, solver="euler", dt=0.1)
"""
from echo_ode_jax.flow import (compose, compose_maps, displacement, integrate_flow,
                               interp_knots, inverse_flow, knot_times)
from echo_ode_jax.kernels import (folding_fraction, gaussian_blur, hard_labels,
                                  identity_grid, jacobian_determinant, jdet_penalty,
                                  warp, warp_data, warp_labels)

__version__ = "0.1.0"

__all__ = [
    "compose", "compose_maps", "displacement", "folding_fraction", "gaussian_blur",
    "hard_labels", "identity_grid", "integrate_flow", "interp_knots", "inverse_flow",
    "jacobian_determinant", "jdet_penalty", "knot_times", "warp", "warp_data",
    "warp_labels",
]
