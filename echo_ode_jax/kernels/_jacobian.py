"""Jacobian determinant of a 2D map with a hand-written VJP.

phi is (H, W, 2): absolute (row, col) positions in pixels of the map at each
pixel. Derivatives use central differences inside and one-sided (first-order)
differences at the border, as ``numpy.gradient`` does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _diff(f, axis):
  """Central differences inside, one-sided at the two ends, along `axis`."""
  n = f.shape[axis]
  if n < 2:
    raise ValueError(f"jacobian_determinant: need at least 2 pixels along axis {axis}")
  take = lambda a, b: jax.lax.slice_in_dim(f, a, b, axis=axis)
  first = take(1, 2) - take(0, 1)
  last = take(n - 1, n) - take(n - 2, n - 1)
  if n == 2:
    return jnp.concatenate([first, last], axis=axis)
  inner = 0.5 * (take(2, n) - take(0, n - 2))
  return jnp.concatenate([first, inner, last], axis=axis)


def _diff_transpose(g, axis):
  """Adjoint of :func:`_diff` along `axis` (a hand-derived stencil transpose)."""
  n = g.shape[axis]
  take = lambda a, b: jax.lax.slice_in_dim(g, a, b, axis=axis)
  pad = lambda x, lo, hi: jnp.pad(
      x, [(lo, hi) if a == axis % g.ndim else (0, 0) for a in range(g.ndim)])
  g0, gl = take(0, 1), take(n - 1, n)
  # Row 0 of D is (-1, +1, 0, ...); row n-1 is (..., 0, -1, +1).
  out = pad(-g0, 0, n - 1) + pad(g0, 1, n - 2) + pad(gl, n - 1, 0) + pad(-gl, n - 2, 1)
  if n > 2:
    gi = 0.5 * take(1, n - 1)  # interior rows i: -1/2 at i-1, +1/2 at i+1
    out = out + pad(gi, 2, 0) - pad(gi, 0, 2)
  return out


def _partials(phi):
  pr, pc = phi[..., 0], phi[..., 1]
  a = _diff(pr, 0)  # d phi_row / d row
  b = _diff(pr, 1)  # d phi_row / d col
  c = _diff(pc, 0)  # d phi_col / d row
  d = _diff(pc, 1)  # d phi_col / d col
  return a, b, c, d


@jax.custom_vjp
def _jdet(phi):
  a, b, c, d = _partials(phi)
  return a * d - b * c


def _jdet_fwd(phi):
  a, b, c, d = _partials(phi)
  return a * d - b * c, (a, b, c, d)


def _jdet_bwd(res, g):
  a, b, c, d = res
  g_pr = _diff_transpose(g * d, 0) + _diff_transpose(-g * c, 1)
  g_pc = _diff_transpose(-g * b, 0) + _diff_transpose(g * a, 1)
  return (jnp.stack([g_pr, g_pc], axis=-1),)


_jdet.defvjp(_jdet_fwd, _jdet_bwd)


def jacobian_determinant(phi: Float[Array, "H W 2"]) -> Float[Array, "H W"]:
  """det(D phi) at each pixel.

  Args:
    phi: (H, W, 2) map in absolute (row, col) pixel positions (H, W >= 2).

  Returns:
    (H, W) determinant (dimensionless: area ratio). Identity gives 1.
  """
  if phi.ndim != 3 or phi.shape[-1] != 2:
    raise ValueError(f"jacobian_determinant: phi must be (H, W, 2), got {phi.shape}")
  return _jdet(phi)


def folding_fraction(phi: Float[Array, "H W 2"]) -> Float[Array, ""]:
  """Share of pixels with det(D phi) <= 0."""
  return jnp.mean((jacobian_determinant(phi) <= 0).astype(jnp.float32))


def jdet_penalty(phi: Float[Array, "H W 2"], margin: float = 0.0) -> Float[Array, ""]:
  """R_Jdet for one map: mean(ReLU(margin - det D phi)^2).

  margin = 0 is the paper's term (only folded pixels, det < 0, are penalised);
  margin > 0 also penalises pixels compressed to an area ratio below margin, so
  the fit keeps away from folding rather than only pulling back from it.
  """
  return jnp.mean(jnp.square(jax.nn.relu(margin - jacobian_determinant(phi))))
