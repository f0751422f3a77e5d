"""Separable Gaussian smoothing (used by L_sim)."""
from __future__ import annotations


import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
  """Normalised 1D Gaussian taps, radius int(truncate * sigma + 0.5) (as scipy)."""
  if sigma <= 0:
    raise ValueError(f"gaussian_blur: sigma must be > 0, got {sigma}")
  radius = int(truncate * float(sigma) + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def _blur_axis(x, taps, axis):
  r = (len(taps) - 1) // 2
  n = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (r, r)
  # "symmetric" padding = scipy.ndimage mode "reflect" (half-sample symmetric).
  # For radii larger than the signal, fall back to edge replication.
  xp = jnp.pad(x, pad, mode="symmetric" if r <= n else "edge")
  out = 0.0
  for i, t in enumerate(taps):
    sl = [slice(None)] * x.ndim
    sl[axis] = slice(i, i + n)
    out = out + float(t) * xp[tuple(sl)]
  return out


def gaussian_blur(x: Float[Array, "... H W"], sigma: float, truncate: float = 4.0
                  ) -> Float[Array, "... H W"]:
  """Separable Gaussian blur over the last two axes.

  Args:
    x: (..., H, W) images.
    sigma: standard deviation in pixels (a Python float; 0 returns x).
    truncate: kernel radius in sigmas, as scipy.ndimage.gaussian_filter.

  Matches ``scipy.ndimage.gaussian_filter(x, (0,..,sigma, sigma), mode="reflect")``.
  """
  if sigma == 0:
    return x
  taps = gaussian_kernel1d(sigma, truncate)
  x = _blur_axis(x, taps, x.ndim - 2)
  return _blur_axis(x, taps, x.ndim - 1)


__all__ = ["gaussian_blur", "gaussian_kernel1d"]
