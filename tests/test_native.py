"""The native CPU kernels (kernels.cpu.native: conv weight gradient and forward pass)
against float64 numpy sums, and their build and availability handling."""
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_ode_jax.kernels.cpu import native as _native

needs_native = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not _native.available(),
    reason=f"native conv kernel unavailable: {_native.why_unavailable() or 'not CPU'}")


def _reference(x, g, kernel_hw, pads):
  """dW[i, j] = sum_{n, y, x} x_pad[n, y + i, x + j] (x) g[n, y, x], in float64."""
  kh, kw = kernel_hw
  ho, wo = g.shape[1:3]
  xp = np.pad(x.astype(np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  return np.stack([np.stack([np.einsum("nyxc,nyxo->co", xp[:, i:i + ho, j:j + wo], g)
                             for j in range(kw)]) for i in range(kh)])


# Channel counts on both sides of the vector widths (8, 16) and of every register
# tile (1, 2 and 4 vectors; 3 to 24 broadcast rows), either side vectorised;
# kernels 3x3, the decoder's 2x2 phase kernels with one-sided padding, 1x3, 1x1;
# images wide enough for one block of rows and tall enough for several.
@needs_native
@pytest.mark.parametrize("n,h,w,ci,co,kernel_hw,pads", [
    (2, 9, 7, 3, 5, (3, 3), ((1, 1), (1, 1))),
    (3, 16, 16, 16, 2, (3, 3), ((1, 1), (1, 1))),
    (1, 8, 12, 33, 32, (2, 2), ((1, 0), (0, 1))),
    (2, 8, 12, 32, 33, (2, 2), ((0, 1), (1, 0))),
    (2, 5, 6, 24, 40, (3, 3), ((0, 0), (2, 1))),
    (3, 40, 70, 17, 65, (3, 3), ((1, 1), (1, 1))),
    (1, 37, 90, 70, 15, (3, 3), ((1, 1), (1, 1))),
    (2, 11, 13, 1, 1, (1, 3), ((0, 0), (1, 1))),
    (1, 6, 5, 48, 64, (1, 1), ((0, 0), (0, 0))),
    (4, 3, 3, 8, 16, (3, 3), ((2, 2), (2, 2))),
])
def test_native_weight_grad_against_float64(n, h, w, ci, co, kernel_hw, pads):
  rng = np.random.default_rng(h * 100 + ci)
  ho = h + sum(pads[0]) - kernel_hw[0] + 1
  wo = w + sum(pads[1]) - kernel_hw[1] + 1
  x = rng.normal(size=(n, h, w, ci)).astype(np.float32)
  g = rng.normal(size=(n, ho, wo, co)).astype(np.float32)
  got = jax.jit(lambda a, b: _native.conv_weight_grad(a, b, kernel_hw, pads))(x, g)
  ref = _reference(x, g, kernel_hw, pads)
  assert got.shape == ref.shape and got.dtype == jnp.float32
  # Entries are sums of K = n*ho*wo unit-variance products, of size ~sqrt(K); a
  # wrong tap or channel is off by that much, float32 summation by << 1e-6 K.
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * n * ho * wo)


@needs_native
@pytest.mark.parametrize("n,h,w,ci,co,kernel_hw,pads", [
    (2, 9, 7, 3, 5, (3, 3), ((1, 1), (1, 1))),
    (1, 8, 12, 33, 32, (2, 2), ((1, 0), (0, 1))),
    (2, 5, 6, 24, 40, (3, 3), ((0, 0), (2, 1))),
    (3, 20, 30, 16, 2, (3, 3), ((1, 1), (1, 1))),
    (1, 7, 9, 70, 65, (3, 3), ((2, 2), (2, 2))),
    (2, 40, 70, 1, 17, (3, 3), ((1, 1), (1, 1))),
    (1, 6, 5, 48, 64, (1, 1), ((0, 0), (0, 0))),
])
def test_native_conv_against_float64(n, h, w, ci, co, kernel_hw, pads):
  """y[n, y, x] = sum_{i, j} x_pad[n, y + i, x + j] . W[i, j], in float64."""
  rng = np.random.default_rng(h * 100 + co)
  x = rng.normal(size=(n, h, w, ci)).astype(np.float32)
  k = rng.normal(size=kernel_hw + (ci, co)).astype(np.float32)
  got = jax.jit(lambda a, b: _native.conv(a, b, pads))(x, k)
  kh, kw = kernel_hw
  xp = np.pad(x.astype(np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  ref = sum(np.einsum("nyxc,co->nyxo", xp[:, i:i + ho, j:j + wo], k[i, j])
            for i in range(kh) for j in range(kw))
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * kh * kw * ci)


@needs_native
def test_native_weight_grad_under_vmap():
  """vmap runs the kernel once per batch element (ffi_call's sequential rule)."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 2, 10, 9, 4)).astype(np.float32)
  g = rng.normal(size=(3, 2, 10, 9, 6)).astype(np.float32)
  pads = ((1, 1), (1, 1))
  got = jax.vmap(lambda a, b: _native.conv_weight_grad(a, b, (3, 3), pads))(x, g)
  for b in range(3):
    np.testing.assert_allclose(got[b], _reference(x[b], g[b], (3, 3), pads), rtol=0, atol=1e-4)


@needs_native
def test_native_weight_grad_rejects_a_mismatched_cotangent():
  with pytest.raises(ValueError, match="stride-1 conv"):
    _native.conv_weight_grad(jnp.zeros((1, 8, 8, 2)), jnp.zeros((1, 7, 8, 3)), (3, 3),
                             ((1, 1), (1, 1)))


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
  """A fresh load attempt, building into tmp_path (the real state is restored after)."""
  monkeypatch.setattr(_native, "_state", {})
  monkeypatch.setenv("ECHO_ODE_NATIVE_CACHE", str(tmp_path / "cache"))
  return tmp_path


def test_native_can_be_turned_off(fresh_state, monkeypatch):
  monkeypatch.setenv("ECHO_ODE_NATIVE", "off")
  assert not _native.available()
  assert _native.why_unavailable() == "ECHO_ODE_NATIVE=off"
  with pytest.raises(RuntimeError, match="ECHO_ODE_NATIVE=off"):
    _native.conv_weight_grad(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4, 4, 1)), (3, 3),
                             ((1, 1), (1, 1)))


def test_native_without_a_compiler(fresh_state, monkeypatch):
  monkeypatch.setattr(_native, "_compiler", lambda: None)
  assert not _native.available()
  assert "no C++ compiler" in _native.why_unavailable()


def test_native_build_error_names_the_source(fresh_state, monkeypatch):
  if _native._compiler() is None:
    pytest.skip("no C++ compiler on this host")
  bad = fresh_state / "broken_kernel.cc"
  bad.write_text("this is not C++\n")
  monkeypatch.setattr(_native, "SOURCE", str(bad))
  assert not _native.available()
  why = _native.why_unavailable()
  assert "broken_kernel.cc" in why and "failed" in why
  assert "error" in why.split("failed on", 1)[1]   # the compiler's error, not "terminated"
  assert not list((fresh_state / "cache").glob("*.so*"))   # no partial library left


def test_native_library_name_follows_the_source(monkeypatch, tmp_path):
  """A changed source (or compiler, jaxlib, CPU) gets a new library, never a stale one."""
  cxx = _native._compiler()
  if cxx is None:
    pytest.skip("no C++ compiler on this host")
  monkeypatch.setenv("ECHO_ODE_NATIVE_CACHE", str(tmp_path))
  paths = []
  for text in ("int a;\n", "int b;\n"):
    src = tmp_path / "k.cc"
    src.write_text(text)
    monkeypatch.setattr(_native, "SOURCE", str(src))
    paths.append(_native.library_path(cxx))
  assert paths[0] != paths[1] and all(p.startswith(str(tmp_path)) for p in paths)


@needs_native
def test_native_weight_grad_of_an_empty_output_is_zero():
  """No output positions: the gradient is an empty sum (no division by a zero width)."""
  x = jnp.ones((1, 4, 0, 2))
  g = jnp.ones((1, 4, 0, 3))
  got = _native.conv_weight_grad(x, g, (1, 1), ((0, 0), (0, 0)))
  np.testing.assert_array_equal(got, np.zeros((1, 1, 2, 3), np.float32))


def test_native_library_is_readable_by_others(tmp_path, monkeypatch):
  """A build in the cache is group/other-readable (as the umask allows; mkstemp
  alone gives 0600), so a shared cache works for every user."""
  cxx = _native._compiler()
  if cxx is None:
    pytest.skip("no C++ compiler on this host")
  src = tmp_path / "tiny.cc"
  src.write_text('extern "C" int echo_ode_tiny() { return 1; }\n')
  monkeypatch.setattr(_native, "SOURCE", str(src))
  path = str(tmp_path / "cache" / "tiny.so")
  _native._build(cxx, path)
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o755 & ~umask
  assert os.listdir(tmp_path / "cache") == ["tiny.so"]   # no temporary file left
