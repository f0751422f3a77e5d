"""SPADE's instance normalisation, modulation and activation as one op.

  norm_modulate(x, gb, bias) = leaky_relu(instance_norm(x) (1 + gamma) + beta)
  with (gamma, beta) = the channel halves of gb + bias

(model.SpadeTime, time="hidden": gb is the gamma_beta conv's output before its
bias). On XLA:CPU the composition (bias add, channel split, :func:`instance_norm`,
:func:`modulate`) runs as four spatial reductions and about eight elementwise
passes over the maps forward and backward; impl="native" computes the forward
pass in one sweep per image for the statistics (each block of 64 pixels read
twice while in cache: its mean, then its squared deviations; blocks merged in
double) and one for the output, and the backward pass in two (the bias
gradient's sums in the first), with the native kernels of :mod:`._native`
(``python benchmarks/step_profile.py --grid="model.fused_norm=true,false"``,
BENCHMARKS.md). Values and gradients equal the composition's up to float32
rounding and summation order, for any spread of values within an image.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from echo_ode_jax.kernels import _native
from echo_ode_jax.kernels._reduce import add, check_positive, check_slope, instance_norm, modulate

NORM_MODULATE_IMPLS = ("native", "xla")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _native_op(x, gb, bias, slope, eps):
  return _native.norm_modulate(x, gb, bias, eps, slope)[0]


def _native_fwd(x, gb, bias, slope, eps):
  out, mean, rstd = _native.norm_modulate(x, gb, bias, eps, slope)
  return out, (x, gb, bias, out, mean, rstd)


def _native_bwd(slope, eps, res, d):
  del eps
  x, gb, bias, out, mean, rstd = res
  dx, dgb, dbias = _native.norm_modulate_bwd(d, x, gb, bias, out, mean, rstd, slope)
  return dx, dgb, jnp.sum(dbias, axis=0)


_native_op.defvjp(_native_fwd, _native_bwd)


def native_ok(x, gb, bias) -> bool:
  """Whether impl="native" runs the native kernel on these operands: the CPU
  backend, the kernels built, float32 x (N, H, W, C), gb (N, H, W, 2C), bias (2C,)."""
  return (jax.default_backend() == "cpu" and x.ndim == 4 and x.size > 0
          and gb.shape == x.shape[:3] + (2 * x.shape[3],) and bias.shape == (2 * x.shape[3],)
          and all(a.dtype == jnp.float32 for a in (x, gb, bias)) and _native.available())


def norm_modulate(x: Float[Array, "K H W C"], gb: Float[Array, "K H W 2C"],
                  bias: Float[Array, "2C"] | None = None, slope: float = 0.2,
                  eps: float = 1e-5, impl: str | None = None) -> Float[Array, "K H W C"]:
  """leaky_relu((x - mean) / sqrt(var + eps) (1 + gamma) + beta, slope > 0), mean
  and (biased) var over (H, W) per image and channel, gamma = gb[..., :C] +
  bias[:C], beta = gb[..., C:] + bias[C:] (bias None: zeros). gb may also be
  (1, H, W, 2C), shared by the K images (the composition then runs, and gb's
  gradient is summed over the images). slope and eps are Python numbers.

  impl: "native" (the fused CPU kernel where :func:`native_ok`, else the
  composition), "xla" (``modulate(instance_norm(x, eps), gamma, beta, slope)``),
  or None: "native" on CPU, "xla" elsewhere.
  """
  if impl is None:
    impl = "native" if jax.default_backend() == "cpu" else "xla"
  if impl not in NORM_MODULATE_IMPLS:
    raise ValueError(f"norm_modulate: impl must be one of {NORM_MODULATE_IMPLS} or None, "
                     f"got {impl!r}")
  slope = check_slope(slope, "norm_modulate")
  eps = check_positive(eps, "eps", "norm_modulate")
  if x.ndim != 4:
    raise ValueError(f"norm_modulate: x must be (K, H, W, C), got shape {x.shape}")
  k, h, w, c = x.shape
  if gb.shape[-1] != 2 * c or (bias is not None and bias.shape != (2 * c,)):
    raise ValueError(f"norm_modulate: gb {gb.shape} and bias "
                     f"{None if bias is None else bias.shape} must have 2 x {c} channels")
  if gb.shape not in ((k, h, w, 2 * c), (1, h, w, 2 * c)):
    raise ValueError(f"norm_modulate: gb must be ({k} or 1, {h}, {w}, {2 * c}) for x "
                     f"{x.shape}, got {gb.shape}")
  if bias is None:
    bias = jnp.zeros((2 * c,), gb.dtype)
  if impl == "native" and native_ok(x, gb, bias):
    return _native_op(x, gb, bias, slope, eps)
  gb = add(gb, bias.astype(gb.dtype))
  return modulate(instance_norm(x, eps), gb[..., :c], gb[..., c:], slope)
