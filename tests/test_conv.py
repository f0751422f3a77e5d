"""conv2d on both of its paths (native CPU kernels; XLA's ops) and the decoder's
conv2d_up_concat, against lax and its autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from echo_ode_jax.kernels import conv2d, conv2d_up_concat, native_available, weight_grad_xla
from echo_ode_jax.kernels.cpu import native as _native
from echo_ode_jax.model import ModelConfig, VelocityUNet, init_params

# "native" needs the C++ kernels built on this host (a compiler, the CPU backend).
_NO_NATIVE = jax.default_backend() != "cpu" or not native_available()
_WHY = f"native kernels unavailable: {_native.why_unavailable() or 'not CPU'}"
NATIVE = pytest.param("native", marks=pytest.mark.skipif(_NO_NATIVE, reason=_WHY))


@pytest.fixture(params=[NATIVE, "xla"])
def path(request, monkeypatch):
  """Runs the test with the native kernels wherever they apply (ECHO_ODE_NATIVE=on)
  or with XLA's ops only (off)."""
  monkeypatch.setenv("ECHO_ODE_NATIVE", "on" if request.param == "native" else "off")
  return request.param


def _calls_native(fn, *args) -> bool:
  return "ffi_call" in str(jax.make_jaxpr(fn)(*args))


def _lax_conv(x, w, strides, padding="SAME"):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Odd and even sizes as the U-Net produces them (128 -> 64 -> ... and odd crops),
# stride 1 and 2, channel counts that are not multiples of anything (17, 33, 40
# leave the vector lanes partly filled).
@pytest.mark.parametrize("n,h,w,ci,co,s", [
    (2, 17, 23, 3, 5, 1), (3, 16, 16, 4, 6, 2), (1, 9, 7, 2, 3, 2), (2, 33, 32, 5, 4, 1),
    (1, 5, 5, 1, 2, 1), (4, 12, 10, 8, 8, 2), (2, 15, 9, 3, 17, 1), (1, 13, 11, 4, 33, 2),
    (2, 8, 8, 33, 40, 1)])
def test_conv2d_matches_lax_and_its_autodiff(path, n, h, w, ci, co, s):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(n * 100 + h), 3)
  x = jax.random.normal(kx, (n, h, w, ci))
  k = jax.random.normal(kw, (3, 3, ci, co)) * 0.3
  y_ref, vjp_ref = jax.vjp(lambda x_, k_: _lax_conv(x_, k_, (s, s)), x, k)
  f = lambda x_, k_: conv2d(x_, k_, (s, s))
  y, vjp = jax.vjp(f, x, k)
  assert _calls_native(jax.grad(lambda a, b: jnp.sum(f(a, b)), (0, 1)), x, k) == (
      path == "native" and s == 1)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  for a, b in zip(jax.jit(vjp)(g), vjp_ref(g)):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale)


def _native_weight_grad(x, g, kernel_hw, strides, pads):
  assert strides == (1, 1)
  return _native.conv_weight_grad(x, g, kernel_hw, pads)


@pytest.mark.parametrize("weight_grad,strides", [
    pytest.param(_native_weight_grad, (1,), marks=NATIVE.marks), (weight_grad_xla, (1, 2))])
def test_weight_grad_against_float64_numpy_sum(weight_grad, strides):
  """dW[i, j] = sum over positions of x_pad[s*y + i, s*x + j] (x) g[y, x], by loops."""
  rng = np.random.default_rng(0)
  for s in strides:
    x = rng.normal(size=(2, 7, 6, 3))
    ho, wo = -(-7 // s), -(-6 // s)
    g = rng.normal(size=(2, ho, wo, 19))   # 19 output channels: a partial vector
    pads = lax.padtype_to_pads((7, 6), (3, 3), (s, s), "SAME")
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ref = np.zeros((3, 3, 3, 19))
    for i in range(3):
      for j in range(3):
        win = xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]
        ref[i, j] = np.einsum("nyxc,nyxo->co", win, g)
    got = weight_grad(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32),
                      (3, 3), (s, s), pads)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_conv2d_under_vmap_and_jit(path):
  """Batched over independent kernels (as fit_batch's vmap mode) == a loop."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 10, 11, 4))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4, 20))
  loss = lambda x_, k_: jnp.sum(jnp.sin(conv2d(x_, k_, (1, 1))))
  gv = jax.jit(jax.vmap(jax.grad(loss, argnums=1)))(x, k)
  ref = [jax.grad(lambda k_: jnp.sum(jnp.sin(_lax_conv(x[b], k_, (1, 1)))))(k[b])
         for b in range(3)]
  ref = np.stack(ref)
  np.testing.assert_allclose(gv, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("spade_time", ["hidden", "gain"])
@pytest.mark.skipif(_NO_NATIVE, reason=_WHY)
def test_velocity_net_is_the_same_on_the_native_and_xla_paths(spade_time, monkeypatch):
  """The network's values and gradients with the native kernels (convs and
  SPADE's norm_modulate) equal those with XLA's ops only, with either way of
  feeding t to SPADE; 20 and 32 channels leave partial vectors and 64 gamma_beta
  outputs."""
  hw = (20, 18)   # 20 -> 10 -> 5 and 18 -> 9 -> 5: even and odd-cropped skips
  cfg = ModelConfig(enc_channels=(8, 20), dec_channels=(32, 20, 8), pe_dim=8, spade_hidden=4,
                    spade_time=spade_time)
  params = init_params(cfg, jax.random.PRNGKey(0), hw)
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  imgs = jax.random.uniform(jax.random.PRNGKey(1), (3, 20, 18, 1))
  m0 = jax.nn.one_hot(jax.random.randint(jax.random.PRNGKey(2), (20, 18), 0, 4), 4)
  t = jnp.array([0.0, 0.4, 0.9])

  def run(mode):
    monkeypatch.setenv("ECHO_ODE_NATIVE", mode)
    f = lambda p: VelocityUNet(cfg).apply({"params": p}, imgs, m0, t)
    both = lambda p: (f(p), jax.grad(lambda q: jnp.sum(f(q) ** 2))(p))
    native = "ffi_call" in str(jax.make_jaxpr(both)(params))
    return native, jax.jit(both)(params)

  (nat_on, (v_on, g_on)), (nat_off, (v_off, g_off)) = run("on"), run("off")
  assert nat_on and not nat_off    # the two paths are different programs
  np.testing.assert_allclose(v_on, v_off, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(v_off))))
  # The decoder convs' biases come right before an instance norm, which cancels
  # them: their gradient is 0, so compare every leaf on the scale of the largest.
  ref = jax.tree_util.tree_leaves(g_off)
  scale = max(float(jnp.max(jnp.abs(b))) for b in ref)
  for a, b in zip(jax.tree_util.tree_leaves(g_on), ref):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * scale)


def _up_concat_reference(x, skip, k):
  """lax conv of the materialised concat([np.repeat x2 upsampling cropped, skip])."""
  hh, ww = skip.shape[1:3]
  up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)[:, :hh, :ww]
  return _lax_conv(jnp.concatenate([up, skip], axis=-1), k, (1, 1))


# (h, w) -> (H, W): even (the four-phase path) and odd crops (the materialised
# path), one to many channels.
@pytest.mark.parametrize("n,h,w,hh,ww,cx,cs,co", [
    (2, 4, 5, 8, 10, 3, 2, 5), (1, 8, 8, 16, 16, 32, 1, 32), (3, 5, 3, 10, 6, 4, 4, 20),
    (2, 4, 4, 7, 8, 3, 2, 4), (1, 5, 6, 9, 11, 2, 3, 17), (1, 1, 1, 2, 2, 2, 1, 3)])
def test_conv2d_up_concat_matches_materialised_lax(path, n, h, w, hh, ww, cx, cs, co):
  kx, ks, kk, kg = jax.random.split(jax.random.PRNGKey(h * 10 + hh), 4)
  x = jax.random.normal(kx, (n, h, w, cx))
  skip = jax.random.normal(ks, (n, hh, ww, cs))
  k = jax.random.normal(kk, (3, 3, cx + cs, co)) * 0.3
  y_ref, vjp_ref = jax.vjp(_up_concat_reference, x, skip, k)
  y, vjp = jax.vjp(conv2d_up_concat, x, skip, k)
  assert y.shape == (n, hh, ww, co)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-5 * float(jnp.max(jnp.abs(y_ref))))
  g = jax.random.normal(kg, y.shape)
  for a, b in zip(jax.jit(vjp)(g), vjp_ref(g)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def test_conv2d_up_concat_centre_tap_is_the_upsampled_map():
  """A kernel with only the centre tap, identity on x and zero on skip: out = up2(x)."""
  x = jnp.arange(2 * 3 * 4 * 2, dtype=jnp.float32).reshape(2, 3, 4, 2)
  k = jnp.zeros((3, 3, 3, 2)).at[1, 1, :2, :].set(jnp.eye(2))
  out = conv2d_up_concat(x, jnp.ones((2, 6, 8, 1)), k)
  np.testing.assert_array_equal(out, np.repeat(np.repeat(np.asarray(x), 2, 1), 2, 2))


@pytest.mark.parametrize("kernel_hw,padding,hw", [
    ((9, 9), "SAME", (12, 11)),      # 81 taps: over the native forward kernel's 64
    ((3, 3), "VALID", (2, 2)),       # an empty output
    ((1, 3), "VALID", (4, 2)),       # an empty output row (width 0)
])
def test_conv2d_outside_the_native_kernels_range_matches_lax(path, kernel_hw, padding, hw):
  """Convs the native kernels do not take fall back to XLA's, with the same results."""
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(kernel_hw[0]), 3)
  x = jax.random.normal(kx, (2,) + hw + (3,))
  k = jax.random.normal(kw, kernel_hw + (3, 4)) * 0.3
  y_ref, vjp_ref = jax.vjp(lambda x_, k_: _lax_conv(x_, k_, (1, 1), padding), x, k)
  y, vjp = jax.vjp(lambda x_, k_: conv2d(x_, k_, padding=padding), x, k)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  for a, b in zip(jax.jit(vjp)(g), vjp_ref(g)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * (float(jnp.max(jnp.abs(b)))
                                                          if b.size else 1.0))


def test_the_backend_picks_the_path(monkeypatch):
  """On CPU with the kernels built a stride-1 float32 conv and its gradient call
  them (ECHO_ODE_NATIVE=on); never with ECHO_ODE_NATIVE=off, without the
  kernels, for a bfloat16 or strided conv, or off CPU."""
  x = jnp.ones((1, 6, 6, 2))
  def native(k, strides=(1, 1)):
    return _calls_native(jax.grad(lambda k_: jnp.sum(conv2d(x.astype(k_.dtype), k_, strides))),
                         k)
  k = jnp.ones((3, 3, 2, 3))
  monkeypatch.setenv("ECHO_ODE_NATIVE", "off")
  assert not native(k)
  monkeypatch.setenv("ECHO_ODE_NATIVE", "on")
  if jax.default_backend() != "cpu":
    assert not native(k)
    return
  assert not native(k.astype(jnp.bfloat16)) and not native(k, (2, 2))
  with pytest.MonkeyPatch.context() as m:
    m.setattr(_native, "available", lambda: False)
    assert not native(k)
  if _NO_NATIVE:
    pytest.skip(_WHY)
  assert native(k)
