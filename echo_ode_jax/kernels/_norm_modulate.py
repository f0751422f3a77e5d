"""SPADE's instance normalisation, modulation and activation as one op.

  norm_modulate(x, gamma, beta) = leaky_relu(instance_norm(x) (1 + gamma) + beta)

(model.SpadeTime, time="hidden"). On XLA:CPU the composition of
:func:`instance_norm` and :func:`modulate` runs as four spatial reductions
and about six elementwise passes over the (K, H, W, C) maps forward and
backward, ~20% of the 128^2 fit step (BENCHMARKS.md); impl="native" computes
the forward pass in one sweep per image (two sums, one write) and the
backward pass in two, with the native kernels of :mod:`._native`. Values and
gradients equal the composition's up to float32 summation order.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from echo_ode_jax.kernels import _native
from echo_ode_jax.kernels._reduce import instance_norm, modulate

NORM_MODULATE_IMPLS = ("native", "xla")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _native_op(x, gamma, beta, slope, eps):
  return _native.norm_modulate(x, gamma, beta, eps, slope)[0]


def _native_fwd(x, gamma, beta, slope, eps):
  out, mean, rstd = _native.norm_modulate(x, gamma, beta, eps, slope)
  return out, (x, gamma, out, mean, rstd)


def _native_bwd(slope, eps, res, d):
  del eps
  x, gamma, out, mean, rstd = res
  return _native.norm_modulate_bwd(d, x, gamma, out, mean, rstd, slope)


_native_op.defvjp(_native_fwd, _native_bwd)


def native_ok(x, gamma, beta) -> bool:
  """Whether impl="native" runs the native kernel on these operands: the CPU
  backend, the kernels built, float32 maps of one non-empty rank-4 shape."""
  return (jax.default_backend() == "cpu" and x.ndim == 4 and x.size > 0
          and gamma.shape == x.shape and beta.shape == x.shape
          and all(a.dtype == jnp.float32 for a in (x, gamma, beta)) and _native.available())


def norm_modulate(x: Float[Array, "K H W C"], gamma: Float[Array, "K H W C"],
                  beta: Float[Array, "K H W C"], slope: float = 0.2, eps: float = 1e-5,
                  impl: str | None = None) -> Float[Array, "K H W C"]:
  """leaky_relu((x - mean) / sqrt(var + eps) (1 + gamma) + beta, slope), mean
  and (biased) var over (H, W) per image and channel.

  impl: "native" (the fused CPU kernel where :func:`native_ok`, else the
  composition), "xla" (``modulate(instance_norm(x, eps), gamma, beta, slope)``),
  or None: "native" on CPU, "xla" elsewhere.
  """
  if impl is None:
    impl = "native" if jax.default_backend() == "cpu" else "xla"
  if impl not in NORM_MODULATE_IMPLS:
    raise ValueError(f"norm_modulate: impl must be one of {NORM_MODULATE_IMPLS} or None, "
                     f"got {impl!r}")
  if impl == "native" and native_ok(x, gamma, beta):
    return _native_op(x, gamma, beta, float(slope), float(eps))
  return modulate(instance_norm(x, eps), gamma, beta, slope)
