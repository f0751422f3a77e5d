"""Warp, Jacobian-determinant and Gaussian kernels against independent references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import echo_ode_jax as eo
from echo_ode_jax import kernels


def _scipy_warp(img, coords, mode):
  pts = np.moveaxis(np.asarray(coords, np.float64), -1, 0)
  return np.stack([ndimage.map_coordinates(np.asarray(img[..., k], np.float64), pts,
                                           order=1, mode=mode)
                   for k in range(img.shape[-1])], axis=-1)


def _random_case(rng, h=13, w=17, c=3, hp=9, wp=11, margin=3.0):
  img = rng.normal(size=(h, w, c)).astype(np.float32)
  coords = np.stack([rng.uniform(-margin, h - 1 + margin, (hp, wp)),
                     rng.uniform(-margin, w - 1 + margin, (hp, wp))], -1).astype(np.float32)
  return img, coords


def _reference_warp(img, coords, padding="border"):
  """Plain bilinear warp (no custom VJP), differentiated by JAX autodiff."""
  h, w, _ = img.shape
  r, c = coords[..., 0], coords[..., 1]
  if padding == "border":
    r = jnp.clip(r, 0, h - 1)
    c = jnp.clip(c, 0, w - 1)
  r0 = jnp.floor(jax.lax.stop_gradient(r))
  c0 = jnp.floor(jax.lax.stop_gradient(c))
  out = 0.0
  for dr in (0, 1):
    for dc in (0, 1):
      rr, cc = r0 + dr, c0 + dc
      wgt = (1 - jnp.abs(r - rr)) * (1 - jnp.abs(c - cc))
      valid = (rr >= 0) & (rr <= h - 1) & (cc >= 0) & (cc <= w - 1)
      ri = jnp.clip(rr, 0, h - 1).astype(jnp.int32)
      ci = jnp.clip(cc, 0, w - 1).astype(jnp.int32)
      out = out + (wgt * valid)[..., None] * img[ri, ci]
  return out


@pytest.mark.parametrize("padding,mode", [("border", "nearest"), ("zeros", "grid-constant")])
def test_warp_matches_scipy(rng, padding, mode):
  img, coords = _random_case(rng)
  out = np.asarray(eo.warp(img, coords, padding=padding) if padding != "border"
                   else eo.warp(img, coords))
  np.testing.assert_allclose(out, _scipy_warp(img, coords, mode), atol=1e-5)


def test_warp_identity_and_integer_shift(rng):
  img = rng.normal(size=(8, 10, 2)).astype(np.float32)
  grid = eo.identity_grid(8, 10)
  np.testing.assert_allclose(eo.warp(img, grid), img, atol=1e-6)
  shifted = eo.warp(img, grid + jnp.array([2.0, -3.0]), padding="zeros")
  expect = np.zeros_like(img)
  expect[:6, 3:] = img[2:, :7]
  np.testing.assert_allclose(shifted, expect, atol=1e-6)


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_warp_vjp_matches_autodiff_of_reference(rng, padding):
  img, coords = _random_case(rng)
  cot = rng.normal(size=coords.shape[:2] + (img.shape[-1],)).astype(np.float32)
  f = lambda i, c: jnp.sum(eo.warp(i, c, padding=padding) * cot)
  g = lambda i, c: jnp.sum(_reference_warp(i, c, padding) * cot)
  gi, gc = jax.grad(f, argnums=(0, 1))(img, coords)
  ri, rc = jax.grad(g, argnums=(0, 1))(img, coords)
  np.testing.assert_allclose(gi, ri, atol=1e-5)
  np.testing.assert_allclose(gc, rc, atol=1e-4)


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_warp_vjp_matches_finite_differences_float64(rng, padding):
  img, coords = _random_case(rng, h=7, w=8, c=2, hp=4, wp=5, margin=1.5)
  # Keep sample points away from grid lines, where bilinear is not differentiable.
  coords = np.floor(coords) + rng.uniform(0.2, 0.8, coords.shape)
  cot = rng.normal(size=(4, 5, 2))
  with jax.enable_x64(True):
    img64, co64, cot64 = (jnp.asarray(a, jnp.float64) for a in (img, coords, cot))
    f = jax.jit(lambda i, c: jnp.sum(eo.warp(i, c, padding=padding) * cot64))
    gi, gc = jax.grad(f, argnums=(0, 1))(img64, co64)
    eps = 1e-6
    fd_c = np.zeros(coords.shape)
    for idx in np.ndindex(coords.shape):
      e = np.zeros(coords.shape)
      e[idx] = eps
      fd_c[idx] = (f(img64, co64 + e) - f(img64, co64 - e)) / (2 * eps)
    fd_i = np.zeros(img.shape)
    for idx in np.ndindex(img.shape):
      e = np.zeros(img.shape)
      e[idx] = eps
      fd_i[idx] = (f(img64 + e, co64) - f(img64 - e, co64)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(gc), fd_c, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gi), fd_i, atol=1e-6)


def test_warp_data_has_no_image_gradient_and_same_coord_gradient(rng):
  img, coords = _random_case(rng)
  f = lambda i, c: jnp.sum(eo.warp_data(i, c) ** 2)
  g = lambda i, c: jnp.sum(eo.warp(i, c) ** 2)
  gi, gc = jax.grad(f, argnums=(0, 1))(img, coords)
  _, rc = jax.grad(g, argnums=(0, 1))(img, coords)
  assert np.all(np.asarray(gi) == 0)
  np.testing.assert_allclose(gc, rc, atol=1e-5)
  # The compiled coordinate gradient of warp_data contains no scatter.
  hlo = jax.jit(jax.grad(f, argnums=1)).lower(img, coords).as_text()
  assert "scatter" not in hlo


def test_warp_jit_vmap_matches_loop(rng):
  imgs = rng.normal(size=(3, 10, 12, 2)).astype(np.float32)
  coords = rng.uniform(-1, 11, size=(3, 6, 7, 2)).astype(np.float32)
  batched = jax.jit(jax.vmap(eo.warp))(imgs, coords)
  for b in range(3):
    np.testing.assert_allclose(batched[b], _scipy_warp(imgs[b], coords[b], "nearest"),
                               atol=1e-5)


def test_warp_labels_soft_and_hard(rng):
  labels = np.zeros((20, 20), np.int32)
  labels[5:12, 6:14] = 1
  labels[12:16, 6:14] = 2
  grid = np.asarray(eo.identity_grid(20, 20))
  coords = grid + np.array([1.0, -2.0], np.float32)   # integer shift: exact
  soft = eo.warp_labels(labels, coords, num_classes=3)
  np.testing.assert_allclose(np.sum(soft, -1), 1.0, atol=1e-6)
  expect = ndimage.map_coordinates(labels, np.moveaxis(coords, -1, 0), order=0, mode="nearest")
  np.testing.assert_array_equal(eo.hard_labels(soft), expect)


def _analytic_map(kind, h=24, w=28):
  r, c = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                     indexing="ij")
  if kind == "identity":
    return np.stack([r, c], -1), np.ones((h, w))
  if kind == "scale":
    a, b = 1.7, 0.6
    return np.stack([a * r, b * c], -1), np.full((h, w), a * b)
  if kind == "rotation":
    th = 0.7
    return np.stack([np.cos(th) * r - np.sin(th) * c, np.sin(th) * r + np.cos(th) * c],
                    -1), np.ones((h, w))
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["identity", "scale", "rotation"])
def test_jacobian_determinant_linear_maps(kind):
  phi, det = _analytic_map(kind)
  np.testing.assert_allclose(eo.jacobian_determinant(jnp.asarray(phi, jnp.float32)), det,
                             rtol=1e-5, atol=1e-5)


def test_jacobian_determinant_sinusoidal_map():
  h, w, a, k = 64, 64, 2.0, 2 * np.pi / 64
  r, c = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                     indexing="ij")
  phi = np.stack([r + a * np.sin(k * c), c + a * np.sin(k * r)], -1)
  det_exact = 1.0 - (a * k) ** 2 * np.cos(k * c) * np.cos(k * r)
  got = np.asarray(eo.jacobian_determinant(jnp.asarray(phi, jnp.float32)))
  # Central differences are second-order accurate inside; one-sided first-order at the border.
  np.testing.assert_allclose(got[1:-1, 1:-1], det_exact[1:-1, 1:-1], atol=2e-3)
  np.testing.assert_allclose(got, det_exact, atol=3e-2)
  # Independent finite differences (numpy.gradient uses the same stencils).
  gr = np.gradient(phi[..., 0], axis=(0, 1))
  gc = np.gradient(phi[..., 1], axis=(0, 1))
  np.testing.assert_allclose(got, gr[0] * gc[1] - gr[1] * gc[0], atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 2), (2, 5), (7, 3), (9, 11)])
def test_jacobian_vjp_matches_autodiff_and_fd(rng, shape):
  phi = rng.normal(size=shape + (2,))
  cot = rng.normal(size=shape)

  def ref_det(p):
    gr = jnp.gradient(p[..., 0], axis=(0, 1))
    gc = jnp.gradient(p[..., 1], axis=(0, 1))
    return gr[0] * gc[1] - gr[1] * gc[0]

  with jax.enable_x64(True):
    p64, c64 = jnp.asarray(phi), jnp.asarray(cot)
    f = jax.jit(lambda p: jnp.sum(eo.jacobian_determinant(p) * c64))
    g = jax.grad(f)(p64)
    np.testing.assert_allclose(g, jax.grad(lambda p: jnp.sum(ref_det(p) * c64))(p64),
                               atol=1e-10)
    eps = 1e-6
    fd = np.zeros(phi.shape)
    for idx in np.ndindex(phi.shape):
      e = np.zeros(phi.shape)
      e[idx] = eps
      fd[idx] = (f(p64 + e) - f(p64 - e)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(g), fd, atol=1e-6)


def test_folding_fraction_and_penalty():
  phi, _ = _analytic_map("identity", 10, 10)
  flip = phi.copy()
  flip[..., 1] = -flip[..., 1]           # a mirror: det = -1 everywhere
  assert float(eo.folding_fraction(jnp.asarray(phi, jnp.float32))) == 0.0
  assert float(eo.folding_fraction(jnp.asarray(flip, jnp.float32))) == 1.0
  assert float(eo.jdet_penalty(jnp.asarray(phi, jnp.float32))) == 0.0
  np.testing.assert_allclose(float(eo.jdet_penalty(jnp.asarray(flip, jnp.float32))), 1.0,
                             rtol=1e-6)
  # A uniform shrink by 0.2 per axis: det 0.04 everywhere, no folding; a margin
  # of 0.1 penalises it by (0.1 - 0.04)^2, the paper's margin 0 not at all.
  shrink = jnp.asarray(phi * 0.2, jnp.float32)
  assert float(eo.jdet_penalty(shrink)) == 0.0
  np.testing.assert_allclose(float(eo.jdet_penalty(shrink, 0.1)), 0.06 ** 2, rtol=1e-4)
  np.testing.assert_allclose(float(eo.jdet_penalty(jnp.asarray(flip, jnp.float32), 0.1)),
                             1.1 ** 2, rtol=1e-6)
  half = phi.copy()
  half[:, :, 1] *= 0.5 - 1.0 * (np.arange(10) >= 5)[:, None]   # bottom half mirrored x0.5
  expect_fold = np.mean(np.gradient(half[..., 0], axis=0) * np.gradient(half[..., 1], axis=1)
                        - np.gradient(half[..., 0], axis=1) * np.gradient(half[..., 1], axis=0)
                        <= 0)
  np.testing.assert_allclose(float(eo.folding_fraction(jnp.asarray(half, jnp.float32))),
                             expect_fold)


@pytest.mark.parametrize("sigma", [0.7, 1.5, 3.0])
def test_gaussian_blur_matches_scipy(rng, sigma):
  x = rng.normal(size=(2, 30, 26)).astype(np.float32)
  got = kernels.gaussian_blur(jnp.asarray(x), sigma)
  ref = ndimage.gaussian_filter(x.astype(np.float64), (0, sigma, sigma), mode="reflect")
  np.testing.assert_allclose(got, ref, atol=1e-5)
