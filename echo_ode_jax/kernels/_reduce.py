"""Spatial sums of channel-minor maps, and the ops whose VJPs are such sums.

XLA:CPU lowers a sum of an (N, H, W, C) map over (H, W), or over (N, H, W),
with a small channel count C to a windowed reduction that reads the map with
stride C, at a half to a third of the speed of one elementwise pass. Viewing
each image as rows of r * C contiguous values (r a power of two dividing H * W,
r * C about LANES) and summing the rows first reads the map in order at nearly
the elementwise speed (BENCHMARKS.md, "Row-first sums").

Autodiff puts such sums in every backward pass of the velocity network: the
bias gradient of every conv, the gradient of every per-knot broadcast (PE(t)
and SPADE's time projection), and both passes of the instance normalisation.
`add` and `instance_norm` are those ops with hand-written VJPs built on
`sum_spatial`; their values and gradients equal the plain jnp expressions up
to float32 summation order.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

LANES = 256   # target row length (floats) of the row-first sum


def _rows(m: int, c: int) -> int:
  """Largest power of two r dividing m with r * c <= LANES (at least 1)."""
  r = 1
  while 2 * r * c <= LANES and m % (2 * r) == 0:
    r *= 2
  return r


def sum_spatial(x: Float[Array, "N H W C"]) -> Float[Array, "N C"]:
  """Sum over (H, W) per image and channel, rows of r * C values first."""
  n, h, w, c = x.shape
  m = h * w
  r = _rows(m, c)
  if r == 1:
    return jnp.sum(x, axis=(1, 2))
  return x.reshape(n, m // r, r * c).sum(axis=1).reshape(n, r, c).sum(axis=1)


def sum_to(g: Float[Array, "N H W C"], shape: tuple[int, ...]) -> Array:
  """Sum g (rank 4) down to `shape`, a shape that broadcasts to g's (rank <= 4).

  The reverse of broadcasting: the gradient of `jnp.broadcast_to(a, g.shape)`.
  """
  shape = tuple(shape)
  full = (1,) * (g.ndim - len(shape)) + shape
  if full == g.shape:
    return g.reshape(shape)
  if g.ndim == 4 and full[1:3] == (1, 1) and full[3] == g.shape[3]:
    s = sum_spatial(g)                                  # (N, C)
    if full[0] == 1:
      s = jnp.sum(s, axis=0)
    return s.reshape(shape)
  axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, full)) if b == 1 and a != 1)
  return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _add(a, b, a_shape, b_shape):
  return a + b


def _add_fwd(a, b, a_shape, b_shape):
  return a + b, None


def _add_bwd(a_shape, b_shape, _, g):
  return sum_to(g, a_shape), sum_to(g, b_shape)


_add.defvjp(_add_fwd, _add_bwd)


def add(a: Array, b: Array) -> Float[Array, "N H W C"]:
  """a + b with numpy broadcasting to a rank-4 (N, H, W, C) result.

  Its VJP reduces the broadcast axes with :func:`sum_to` (bias gradients,
  per-knot embeddings, maps shared by all knots). Other ranks: plain a + b.
  """
  out = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
  if len(out) != 4:
    return a + b
  dtype = jnp.result_type(a, b)
  return _add(jnp.asarray(a, dtype), jnp.asarray(b, dtype), jnp.shape(a), jnp.shape(b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def instance_norm(x: Float[Array, "N H W C"], eps: float = 1e-5) -> Float[Array, "N H W C"]:
  """(x - mean) / sqrt(var + eps), mean and (biased) var over (H, W) per image and channel."""
  return _instance_norm_fwd(x, eps)[0]


def _instance_norm_fwd(x, eps):
  m = x.shape[1] * x.shape[2]
  mean = sum_spatial(x)[:, None, None, :] / m
  xc = x - mean
  rstd = jax.lax.rsqrt(sum_spatial(xc * xc)[:, None, None, :] / m + eps)
  y = xc * rstd
  return y, (y, rstd)


def _instance_norm_bwd(eps, res, g):
  y, rstd = res
  m = y.shape[1] * y.shape[2]
  g_mean = sum_spatial(g)[:, None, None, :] / m
  gy_mean = sum_spatial(g * y)[:, None, None, :] / m
  return (rstd * (g - g_mean - y * gy_mean),)


instance_norm.defvjp(_instance_norm_fwd, _instance_norm_bwd)


def sum_leading(x: Float[Array, "K ..."]) -> Float[Array, "..."]:
  """Sum over the leading axis as K - 1 elementwise adds of its slices.

  XLA:CPU fuses a reduction over the leading axis of a (K, H, W, C) map with
  the ops that produce it into a slow strided loop; the unrolled adds read the
  K slices in order (K is the number of knots, ~10).
  """
  return functools.reduce(jnp.add, [x[k] for k in range(x.shape[0])])


def _leaky(z, slope):
  return jnp.where(z >= 0, z, slope * z)


def _leaky_vjp(out, d, slope):
  """The leaky ReLU's VJP read from its output (same sign as its input)."""
  return jnp.where(out >= 0, d, slope * d)


def check_positive(value, what: str, op: str, why: str = "") -> float:
  """value as a float, or a one-line ValueError unless it is a concrete number
  > 0 (a static argument of a custom VJP: not a traced value, not a bool)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
    raise ValueError(f"{op}: {what} must be a Python number > 0{why}, got {value!r}")
  return float(value)


def check_slope(slope, op: str) -> float:
  """slope as a float, or ValueError: the VJPs here read the activation's branch
  from the sign of its output, which is the sign of its input only for slope > 0."""
  return check_positive(slope, "the leaky ReLU's slope", op,
                        " (the VJP reads the branch from the output's sign)")


def modulate_gain(y: Float[Array, "K H W C"], g: Float[Array, "1 H W C"],
                  b: Float[Array, "1 H W C"], s_g: Float[Array, "K C"],
                  s_b: Float[Array, "K C"], slope: float = 0.2) -> Float[Array, "K H W C"]:
  """leaky_relu(y (1 + g s_g) + b s_b, slope): SPADE's modulation with maps g, b
  shared by the K knots and per-knot, per-channel gains s_g, s_b, and the
  decoder's activation (model.SpadeTime, time="gain"); slope > 0.

  Its VJP reads the activation's slope from the saved output instead of
  recomputing the modulation, sums over the knots with :func:`sum_leading` and
  over (H, W) with :func:`sum_spatial`; values and gradients equal the jnp
  expression up to float32 summation order.
  """
  slope = check_slope(slope, "modulate_gain")
  k, h, w, c = jnp.shape(y)
  if (jnp.shape(g) != (1, h, w, c) or jnp.shape(b) != (1, h, w, c)
      or jnp.shape(s_g) != (k, c) or jnp.shape(s_b) != (k, c)):
    raise ValueError(f"modulate_gain: y {jnp.shape(y)} needs g and b of shape {(1, h, w, c)} "
                     f"and s_g, s_b of {(k, c)}; got {jnp.shape(g)}, {jnp.shape(b)}, "
                     f"{jnp.shape(s_g)}, {jnp.shape(s_b)}")
  return _modulate_gain(y, g, b, s_g, s_b, slope)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _modulate_gain(y, g, b, s_g, s_b, slope):
  return _leaky(y * (1.0 + g * s_g[:, None, None, :]) + b * s_b[:, None, None, :], slope)


def _modulate_gain_fwd(y, g, b, s_g, s_b, slope):
  out = _modulate_gain(y, g, b, s_g, s_b, slope)
  return out, (out, y, g, b, s_g, s_b)


def _modulate_gain_bwd(slope, res, d):
  out, y, g, b, s_g, s_b = res
  sg, sb = s_g[:, None, None, :], s_b[:, None, None, :]
  d = _leaky_vjp(out, d, slope)
  dy_ = d * y
  return (d * (1.0 + g * sg),
          sum_leading(dy_ * sg)[None],
          sum_leading(d * sb)[None],
          sum_spatial(dy_ * g),
          sum_spatial(d * b))


_modulate_gain.defvjp(_modulate_gain_fwd, _modulate_gain_bwd)


def modulate(y: Float[Array, "K H W C"], gamma: Float[Array, "K H W C"],
             beta: Float[Array, "K H W C"], slope: float = 0.2) -> Float[Array, "K H W C"]:
  """leaky_relu(y (1 + gamma) + beta, slope), slope > 0: SPADE's modulation and
  the decoder's activation (model.SpadeTime, time="hidden"). gamma and beta may
  broadcast to y's shape (e.g. (1, H, W, C), shared by the K knots; their
  gradients are then summed back). Its VJP reads the activation's slope from
  the saved output instead of recomputing the modulation; values and gradients
  equal the jnp expression.
  """
  slope = check_slope(slope, "modulate")
  shape = jnp.shape(y)
  try:
    # broadcast_to's transpose sums the cotangent back to a shared map's shape;
    # it is a no-op for maps of y's shape (the network's case).
    gamma, beta = jnp.broadcast_to(gamma, shape), jnp.broadcast_to(beta, shape)
  except ValueError:
    raise ValueError(f"modulate: gamma {jnp.shape(gamma)} and beta {jnp.shape(beta)} do not "
                     f"broadcast to y's shape {shape}") from None
  return _modulate(y, gamma, beta, slope)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _modulate(y, gamma, beta, slope):
  return _leaky(y * (1.0 + gamma) + beta, slope)


def _modulate_fwd(y, gamma, beta, slope):
  out = _modulate(y, gamma, beta, slope)
  return out, (out, y, gamma)


def _modulate_bwd(slope, res, d):
  out, y, gamma = res
  d = _leaky_vjp(out, d, slope)
  return d * (1.0 + gamma), d * y, d


_modulate.defvjp(_modulate_fwd, _modulate_bwd)
