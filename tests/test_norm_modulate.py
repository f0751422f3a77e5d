"""kernels.norm_modulate (SPADE's instance norm, modulation and activation; the
fused native CPU kernel) against float64 numpy, jnp autodiff and finite
differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_ode_jax.kernels import norm_modulate
from echo_ode_jax.kernels.cpu import native as _native


@pytest.fixture(autouse=True)
def _native_where_it_applies(monkeypatch):
  """The native kernel wherever it applies, without timing (ECHO_ODE_NATIVE=on);
  a test sets "off" for XLA's composition."""
  monkeypatch.setenv("ECHO_ODE_NATIVE", "on")


needs_native = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not _native.available(),
    reason=f"native kernels unavailable: {_native.why_unavailable() or 'not CPU'}")


def _reference64(x, gb, bias, slope, eps):
  """The formula in float64 numpy."""
  x, gb, bias = (np.asarray(a, np.float64) for a in (x, gb, bias))
  c = x.shape[-1]
  gamma, beta = gb[..., :c] + bias[:c], gb[..., c:] + bias[c:]
  y = (x - x.mean(axis=(1, 2), keepdims=True)) / np.sqrt(x.var(axis=(1, 2), keepdims=True) + eps)
  z = y * (1 + gamma) + beta
  return np.where(z >= 0, z, slope * z)


def _jnp_formula(x, gb, bias, slope, eps):
  """The formula in plain jnp (its autodiff is the reference gradient)."""
  c = x.shape[-1]
  gamma, beta = gb[..., :c] + bias[:c], gb[..., c:] + bias[c:]
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.var(x, axis=(1, 2), keepdims=True)
  z = (x - mean) * jax.lax.rsqrt(var + eps) * (1 + gamma) + beta
  return jnp.where(z >= 0, z, slope * z)


def _inputs(shape, seed, offset=3.0):
  rng = np.random.default_rng(seed)
  # An offset mean and a per-channel scale: the variance must not cancel.
  x = offset + rng.normal(size=shape) * rng.uniform(0.5, 4.0, size=shape[-1])
  gb = rng.normal(0, 0.5, size=shape[:-1] + (2 * shape[-1],))
  bias = rng.normal(0, 0.3, size=(2 * shape[-1],))
  return tuple(jnp.asarray(a, jnp.float32) for a in (x, gb, bias))


# Channels below, at and between the vector widths (8, 16, 32 floats), the
# decoder's 16 and 32; images from one pixel row to the 64^2 block boundaries.
@needs_native
@pytest.mark.parametrize("shape", [(3, 5, 7, 3), (2, 9, 13, 16), (1, 33, 17, 32), (2, 8, 8, 40),
                                   (10, 64, 64, 16), (1, 1, 70, 1), (4, 16, 12, 48)])
def test_native_matches_float64_formula_and_jnp_autodiff(shape):
  x, gamma, beta = _inputs(shape, seed=sum(shape))
  got = jax.jit(lambda *a: norm_modulate(*a, 0.2, 1e-5))(x, gamma, beta)
  want = _reference64(x, gamma, beta, 0.2, 1e-5)
  assert np.mean(want < 0) > 0.2                        # both branches of the activation
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  cot = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  _, vjp = jax.vjp(lambda *a: norm_modulate(*a, 0.2, 1e-5), x, gamma, beta)
  _, vjp_ref = jax.vjp(lambda *a: _jnp_formula(*a, 0.2, 1e-5), x, gamma, beta)
  for name, g, w in zip(("dx", "dgb", "dbias"), jax.jit(vjp)(cot), vjp_ref(cot)):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * float(np.abs(w).max()), err_msg=name)


@needs_native
def test_native_gradient_against_finite_differences():
  """d/dx of sum(w * norm_modulate(x, gamma, beta)) by central differences of the
  float64 formula: the instance norm's gradient through mean and variance."""
  shape = (2, 4, 5, 3)
  x, gb, bias = _inputs(shape, seed=11, offset=0.5)
  w = np.random.default_rng(12).normal(size=shape)
  grads = jax.grad(lambda *a: jnp.sum(norm_modulate(*a, 0.2, 1e-5) * w),
                   argnums=(0, 1, 2))(x, gb, bias)
  args = [np.asarray(a, np.float64) for a in (x, gb, bias)]
  h = 1e-5
  for i, g in enumerate(grads):
    fd = np.zeros(args[i].shape)
    for j in np.ndindex(args[i].shape):
      plus, minus = [a.copy() for a in args], [a.copy() for a in args]
      plus[i][j] += h
      minus[i][j] -= h
      fd[j] = (np.sum(_reference64(*plus, 0.2, 1e-5) * w)
               - np.sum(_reference64(*minus, 0.2, 1e-5) * w)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-3)


@needs_native
def test_native_is_deterministic_and_uses_the_kernel():
  x, gb, bias = _inputs((5, 32, 32, 16), seed=2)
  f = jax.jit(jax.grad(lambda *a: jnp.sum(norm_modulate(*a) ** 2),
                       argnums=(0, 1, 2)))
  hlo = f.lower(x, gb, bias).as_text()
  assert "echo_ode_norm_modulate_f32" in hlo and "echo_ode_norm_modulate_bwd_f32" in hlo
  a, b = f(x, gb, bias), f(x, gb, bias)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)


@needs_native
def test_native_under_vmap():
  """vmap runs the kernel once per batch element (ffi_call's sequential rule)."""
  x, gb, _ = _inputs((3, 2, 6, 5, 4), seed=4)
  bias = jnp.asarray(np.random.default_rng(5).normal(size=(3, 8)), jnp.float32)
  got = jax.vmap(lambda *a: norm_modulate(*a))(x, gb, bias)
  for b in range(3):
    np.testing.assert_allclose(got[b], _reference64(x[b], gb[b], bias[b], 0.2, 1e-5),
                               rtol=0, atol=1e-4)


def test_xla_and_fallbacks_match_the_formula(monkeypatch):
  """XLA's composition add -> instance_norm -> modulate (ECHO_ODE_NATIVE=off, and
  where the kernel does not apply: a gb shared by the knots, no bias, bfloat16)."""
  x, gb, bias = _inputs((3, 6, 5, 4), seed=5)
  want = _reference64(x, gb, bias, 0.1, 1e-3)
  monkeypatch.setenv("ECHO_ODE_NATIVE", "off")
  f = lambda *a: norm_modulate(*a, 0.1, 1e-3)
  assert "ffi_call" not in str(jax.make_jaxpr(f)(x, gb, bias))
  got = f(x, gb, bias)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  monkeypatch.setenv("ECHO_ODE_NATIVE", "on")
  shared = norm_modulate(x, gb[:1], bias, 0.1, 1e-3)
  want_shared = _reference64(x, np.broadcast_to(gb[:1], gb.shape), bias, 0.1, 1e-3)
  np.testing.assert_allclose(shared, want_shared, rtol=0, atol=1e-5 * np.abs(want).max())
  no_bias = norm_modulate(x, gb, None, 0.1, 1e-3)
  np.testing.assert_allclose(no_bias, _reference64(x, gb, np.zeros(8), 0.1, 1e-3), rtol=0,
                             atol=1e-5 * np.abs(want).max())
  bf = norm_modulate(*(a.astype(jnp.bfloat16) for a in (x, gb, bias)), 0.1, 1e-3)
  assert bf.dtype == jnp.bfloat16
  np.testing.assert_allclose(bf.astype(np.float32), want, rtol=0, atol=0.05 * np.abs(want).max())


@needs_native
def test_native_statistics_do_not_depend_on_which_pixel_is_an_outlier():
  """The variance with one outlier pixel (100 standard deviations) at the start
  of the image or of a 64-pixel block: float64 accuracy as for any other image
  (a one-pass sum of squares shifted by the first pixel loses ~1e-4 of it)."""
  rng = np.random.default_rng(21)
  shape = (2, 64, 64, 8)
  x = rng.normal(size=shape)
  x[0, 0, 0] = 100.0
  x[1, 1, 0] = -100.0                                    # pixel 64: a block's first
  gb = rng.normal(0, 0.5, size=shape[:-1] + (16,))
  bias = rng.normal(0, 0.3, size=(16,))
  x, gb, bias = (jnp.asarray(a, jnp.float32) for a in (x, gb, bias))
  got = norm_modulate(x, gb, bias, 0.2, 1e-5)
  want = _reference64(x, gb, bias, 0.2, 1e-5)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
  cot = jnp.asarray(rng.normal(size=shape), jnp.float32)
  _, vjp = jax.vjp(lambda *a: norm_modulate(*a, 0.2, 1e-5), x, gb, bias)
  _, vjp_ref = jax.vjp(lambda *a: _jnp_formula(*a, 0.2, 1e-5), x, gb, bias)
  for name, g, w in zip(("dx", "dgb", "dbias"), vjp(cot), vjp_ref(cot)):
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * float(np.abs(w).max()), err_msg=name)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_shared_gb_gradients_are_summed_over_the_images(mode, monkeypatch):
  """gb (1, H, W, 2C) shared by the K images: every gradient equals jnp autodiff
  of the formula with gb broadcast (gb's summed over the images)."""
  x, gb, bias = _inputs((3, 6, 5, 4), seed=6)
  gb1 = gb[:1]
  monkeypatch.setenv("ECHO_ODE_NATIVE", mode)
  cot = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), jnp.float32)
  _, vjp = jax.vjp(lambda *a: norm_modulate(*a, 0.2, 1e-5), x, gb1, bias)
  _, vjp_ref = jax.vjp(lambda x_, g_, b_: _jnp_formula(x_, jnp.broadcast_to(g_, gb.shape), b_,
                                                       0.2, 1e-5), x, gb1, bias)
  for name, g, w in zip(("dx", "dgb", "dbias"), jax.jit(vjp)(cot), vjp_ref(cot)):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * float(np.abs(w).max()), err_msg=name)


def test_bad_shapes_are_rejected():
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match="2 x 2 channels"):
    norm_modulate(x, x)
  with pytest.raises(ValueError, match=r"gb must be \(1 or 1, 4, 4, 4\) for x"):
    norm_modulate(x, jnp.zeros((1, 4, 5, 4)))
  with pytest.raises(ValueError, match=r"gb must be \(3 or 1, 4, 4, 4\)"):
    norm_modulate(jnp.zeros((3, 4, 4, 2)), jnp.zeros((2, 4, 4, 4)))
  for slope in (0.0, -0.2):
    with pytest.raises(ValueError, match="norm_modulate: the leaky ReLU's slope must be"):
      norm_modulate(x, jnp.zeros((1, 4, 4, 4)), slope=slope)
  with pytest.raises(ValueError, match="eps must be a Python number > 0"):
    norm_modulate(x, jnp.zeros((1, 4, 4, 4)), eps=0.0)
  if _native.available():
    with pytest.raises(ValueError, match="non-empty"):
      _native.norm_modulate(x, jnp.zeros((1, 4, 2, 4)), jnp.zeros(4), 1e-5, 0.2)
