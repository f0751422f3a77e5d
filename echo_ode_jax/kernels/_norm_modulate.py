"""SPADE's instance normalisation, modulation and activation as one op.

  norm_modulate(x, gb, bias) = leaky_relu(instance_norm(x) (1 + gamma) + beta)
  with (gamma, beta) = the channel halves of gb + bias

(model.SpadeTime: gb is the gamma_beta conv's output before its bias). On
XLA:CPU the composition (bias add, channel split, :func:`instance_norm`,
:func:`modulate`) runs as several spatial reductions and elementwise passes;
the native kernel (:mod:`.cpu.native`) computes the forward pass in two sweeps
per image and the backward pass in two (BENCHMARKS.md, "Fused SPADE
normalisation"). Which one runs is :func:`._backend.use_native`'s choice per
shape; values and gradients agree up to float32 rounding and summation order.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from echo_ode_jax.kernels import _backend
from echo_ode_jax.kernels._reduce import add, check_positive, check_slope, instance_norm, modulate
from echo_ode_jax.kernels.cpu import native as _native
from echo_ode_jax.kernels.cpu.autotune import NATIVE, XLA


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


def _composition(x, gb, bias, slope, eps):
  c = x.shape[-1]
  gb = add(gb, bias.astype(gb.dtype))
  return modulate(instance_norm(x, eps), gb[..., :c], gb[..., c:], slope)


def native_ok(x, gb, bias) -> bool:
  """Whether the native kernel supports these operands: float32 x (N, H, W, C),
  gb (N, H, W, 2C), bias (2C,), on XLA:CPU with the kernels built."""
  return (x.ndim == 4 and x.size > 0
          and gb.shape == x.shape[:3] + (2 * x.shape[3],) and bias.shape == (2 * x.shape[3],)
          and all(a.dtype == jnp.float32 for a in (x, gb, bias)) and _backend.native_enabled())


def _use_native(shape, slope, eps) -> bool:
  n, h, w, c = shape

  def runs():
    rng = np.random.default_rng(0)
    x, gb, r = (jnp.asarray(rng.standard_normal(s, dtype=np.float32))
                for s in (shape, (n, h, w, 2 * c), shape))
    bias = jnp.zeros((2 * c,), jnp.float32)

    def step(op):   # value and gradients, as a fit step needs them
      grad = jax.grad(lambda a, b, e: jnp.vdot(op(a, b, e, slope, eps), r), argnums=(0, 1, 2))
      fn = _backend.jit(grad)
      return lambda: jax.block_until_ready(fn(x, gb, bias))

    return {NATIVE: step(_native_op), XLA: step(_composition)}

  key = f"{tuple(int(v) for v in shape)} slope={slope:g} eps={eps:g}"
  return _backend.use_native("norm_modulate", key, runs)


def norm_modulate(x: Float[Array, "K H W C"], gb: Float[Array, "K H W 2C"],
                  bias: Float[Array, "2C"] | None = None, slope: float = 0.2,
                  eps: float = 1e-5) -> Float[Array, "K H W C"]:
  """leaky_relu((x - mean) / sqrt(var + eps) (1 + gamma) + beta, slope > 0), mean
  and (biased) var over (H, W) per image and channel, gamma = gb[..., :C] +
  bias[:C], beta = gb[..., C:] + bias[C:] (bias None: zeros). gb may also be
  (1, H, W, 2C), shared by the K images (the composition then runs, and gb's
  gradient is summed over the images). slope and eps are Python numbers.
  Runs as the native kernel or as ``modulate(instance_norm(x, eps), gamma,
  beta, slope)`` (module docstring).
  """
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
  if native_ok(x, gb, bias) and _use_native(x.shape, slope, eps):
    return _native_op(x, gb, bias, slope, eps)
  return _composition(x, gb, bias, slope, eps)
