"""kernels.sum_spatial / sum_to / sum_leading / add / instance_norm / modulate(_gain) against jnp and its autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_ode_jax.kernels import (add, instance_norm, modulate, modulate_gain, sum_leading,
                                  sum_spatial, sum_to)
from echo_ode_jax.kernels._reduce import LANES, _rows


@pytest.mark.parametrize("shape", [(3, 16, 16, 32), (2, 7, 9, 3), (1, 1, 1, 5), (4, 8, 6, 2),
                                   (2, 32, 32, 300)])
def test_sum_spatial_equals_float64_sum(shape):
  x = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
  got = jax.jit(sum_spatial)(jnp.asarray(x))
  np.testing.assert_allclose(got, x.astype(np.float64).sum(axis=(1, 2)), rtol=1e-5, atol=1e-4)


def test_rows_factor():
  """r is the largest power of two dividing H * W with r * C <= LANES."""
  assert _rows(128 * 128, 32) == LANES // 32
  assert _rows(128 * 128, 2) == LANES // 2
  assert _rows(63, 16) == 1          # odd: no row-first view
  assert _rows(6 * 4, 16) == 8       # 24 = 8 * 3
  assert _rows(4096, 300) == 1       # wider than LANES already


@pytest.mark.parametrize("target", [(5,), (1, 1, 1, 5), (3, 1, 1, 5), (1, 8, 6, 5), (3, 8, 6, 5),
                                    (8, 6, 1), (1, 1, 6, 1)])
def test_sum_to_is_the_transpose_of_broadcasting(target):
  g = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 6, 5))
  _, vjp = jax.vjp(lambda a: jnp.broadcast_to(a, g.shape), jnp.zeros(target))
  np.testing.assert_allclose(sum_to(g, target), vjp(g)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a_shape,b_shape", [((4, 8, 8, 6), (6,)), ((1, 8, 8, 6), (4, 1, 1, 6)),
                                             ((4, 8, 8, 6), (4, 1, 1, 6)), ((3, 5), (5,))])
def test_add_value_and_gradients_match_jnp(a_shape, b_shape):
  ka, kb, kg = jax.random.split(jax.random.PRNGKey(1), 3)
  a, b = jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape)
  out, vjp = jax.vjp(add, a, b)
  ref, vjp_ref = jax.vjp(jnp.add, a, b)
  np.testing.assert_array_equal(out, ref)
  g = jax.random.normal(kg, out.shape)
  for got, want in zip(jax.jit(vjp)(g), vjp_ref(g)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _instance_norm_ref(x, eps):
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  return (x - mean) / jnp.sqrt(jnp.var(x, axis=(1, 2), keepdims=True) + eps)


@pytest.mark.parametrize("shape", [(3, 16, 16, 32), (2, 5, 7, 3)])
def test_instance_norm_matches_formula_and_autodiff(shape):
  kx, kg = jax.random.split(jax.random.PRNGKey(2))
  x = 3.0 + 2.0 * jax.random.normal(kx, shape)
  y, vjp = jax.vjp(lambda x_: instance_norm(x_, 1e-5), x)
  y_ref, vjp_ref = jax.vjp(lambda x_: _instance_norm_ref(x_, 1e-5), x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  # Zero mean and unit variance per image and channel.
  np.testing.assert_allclose(np.mean(y, axis=(1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(np.var(y, axis=(1, 2)), 1, atol=1e-3)
  g = jax.random.normal(kg, shape)
  np.testing.assert_allclose(jax.jit(vjp)(g)[0], vjp_ref(g)[0], rtol=1e-4, atol=1e-4)


def test_instance_norm_gradient_against_finite_differences():
  x = np.random.default_rng(3).normal(size=(1, 3, 4, 2))
  w = np.random.default_rng(4).normal(size=x.shape)
  with jax.enable_x64():
    f = lambda x_: jnp.sum(instance_norm(x_, 1e-5) * w)
    grad = np.asarray(jax.grad(f)(jnp.asarray(x)))
    fd = np.zeros_like(x)
    h = 1e-6
    for i in np.ndindex(x.shape):
      e = np.zeros_like(x)
      e[i] = h
      fd[i] = (f(jnp.asarray(x + e)) - f(jnp.asarray(x - e))) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)


def test_sum_leading_equals_float64_sum():
  x = np.random.default_rng(5).normal(size=(10, 6, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(sum_leading)(jnp.asarray(x)),
                             x.astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-5)


def _leaky(z, slope):
  return jnp.where(z >= 0, z, slope * z)


def _check_vjp(f, f_ref, args, key):
  out, vjp = jax.vjp(f, *args)
  ref, vjp_ref = jax.vjp(f_ref, *args)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  assert np.mean(np.asarray(ref) < 0) > 0.2          # both branches of the activation
  g = jax.random.normal(key, out.shape)
  for got, want in zip(jax.jit(vjp)(g), vjp_ref(g)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gamma_shape,beta_shape", [((3, 8, 6, 5), (3, 8, 6, 5)),
                                                     ((1, 8, 6, 5), (1, 8, 6, 5)),
                                                     ((3, 8, 6, 5), (5,))])
def test_modulate_matches_jnp_and_autodiff(gamma_shape, beta_shape):
  """leaky_relu(y (1 + gamma) + beta) and its VJP (from the saved output), with
  gamma and beta of y's shape or broadcast to it (their gradients summed back)."""
  ks = jax.random.split(jax.random.PRNGKey(6), 4)
  y, gamma, beta = (jax.random.normal(k, s) for k, s in
                    zip(ks[:3], ((3, 8, 6, 5), gamma_shape, beta_shape)))
  _check_vjp(lambda *a: modulate(*a, 0.2),
             lambda y_, g_, b_: _leaky(y_ * (1 + g_) + b_, 0.2), (y, gamma, beta), ks[3])


def test_modulate_rejects_what_its_vjp_cannot_do():
  """A slope <= 0 (the VJP reads the branch from the output's sign, and -0.0 >= 0)
  and maps that do not broadcast (modulate_gain: shared maps and per-knot gains)."""
  y = jnp.ones((2, 4, 4, 3))
  for slope in (0.0, -0.5):
    with pytest.raises(ValueError, match="slope must be a Python number > 0"):
      modulate(y, y, y, slope)
    with pytest.raises(ValueError, match="slope must be a Python number > 0"):
      modulate_gain(y, y[:1], y[:1], jnp.ones((2, 3)), jnp.ones((2, 3)), slope)
  with pytest.raises(ValueError, match="do not broadcast to y's shape"):
    modulate(y, jnp.ones((2, 4, 5, 3)), y)
  with pytest.raises(ValueError, match="modulate_gain: y .* needs g and b of shape"):
    modulate_gain(y, y, y, jnp.ones((2, 3)), jnp.ones((2, 3)))


@pytest.mark.parametrize("shape", [(4, 16, 16, 8), (3, 5, 7, 3)])
def test_modulate_gain_matches_jnp_and_autodiff(shape):
  """leaky_relu(y (1 + g s_g) + b s_b) with g, b shared by the knots and per-knot,
  per-channel gains: values and all five gradients (sums over the knots and
  over (H, W)) against jnp's broadcasting and autodiff."""
  k, h, w, c = shape
  ks = jax.random.split(jax.random.PRNGKey(7), 6)
  args = (jax.random.normal(ks[0], shape), jax.random.normal(ks[1], (1, h, w, c)),
          jax.random.normal(ks[2], (1, h, w, c)), 1 + 0.5 * jax.random.normal(ks[3], (k, c)),
          1 + 0.5 * jax.random.normal(ks[4], (k, c)))
  ref = lambda y, g, b, sg, sb: _leaky(
      y * (1 + g * sg[:, None, None, :]) + b * sb[:, None, None, :], 0.1)
  _check_vjp(lambda *a: modulate_gain(*a, 0.1), ref, args, ks[5])


def test_modulate_gain_gradient_against_finite_differences():
  rng = np.random.default_rng(8)
  shapes = [(2, 3, 4, 2), (1, 3, 4, 2), (1, 3, 4, 2), (2, 2), (2, 2)]
  args = [rng.normal(size=s) for s in shapes]
  w = rng.normal(size=shapes[0])
  with jax.enable_x64():
    f = lambda *a: jnp.sum(modulate_gain(*a, 0.2) * w)
    grads = jax.grad(f, argnums=tuple(range(5)))(*map(jnp.asarray, args))
    h = 1e-6
    for i, (a, g) in enumerate(zip(args, grads)):
      fd = np.zeros_like(a)
      for j in np.ndindex(a.shape):
        e = np.zeros_like(a)
        e[j] = h
        lo, hi = list(args), list(args)
        lo[i], hi[i] = a - e, a + e
        fd[j] = (f(*map(jnp.asarray, hi)) - f(*map(jnp.asarray, lo))) / (2 * h)
      np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-6, atol=1e-7)
