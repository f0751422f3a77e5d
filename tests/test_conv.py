"""conv2d's hand-written VJPs ("native", "split" and "shifted" weight gradients) and the
decoder's conv2d_up_concat, against lax and its autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from echo_ode_jax.kernels import (_native, conv2d, conv2d_up_concat, native_available,
                                  weight_grad_native, weight_grad_shifted, weight_grad_split)
from echo_ode_jax.model import ModelConfig, VelocityUNet, init_params

# "native" needs the C++ kernel built on this host (a compiler, the CPU backend).
_NO_NATIVE = jax.default_backend() != "cpu" or not native_available()
NATIVE = pytest.param("native", marks=pytest.mark.skipif(
    _NO_NATIVE, reason=f"native conv kernel unavailable: {_native.why_unavailable() or 'not CPU'}"))


def _lax_conv(x, w, strides, padding="SAME"):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Odd and even sizes as the U-Net produces them (128 -> 64 -> ... and odd crops),
# stride 1 and 2, channel counts that are not multiples of anything; "split"
# groups output channels by 16, so 17, 33 and 40 give a short last group.
@pytest.mark.parametrize("impl", [NATIVE, "shifted", "split"])
@pytest.mark.parametrize("n,h,w,ci,co,s", [
    (2, 17, 23, 3, 5, 1), (3, 16, 16, 4, 6, 2), (1, 9, 7, 2, 3, 2), (2, 33, 32, 5, 4, 1),
    (1, 5, 5, 1, 2, 1), (4, 12, 10, 8, 8, 2), (2, 15, 9, 3, 17, 1), (1, 13, 11, 4, 33, 2),
    (2, 8, 8, 33, 40, 1)])
def test_conv2d_matches_lax_and_its_autodiff(impl, n, h, w, ci, co, s):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(n * 100 + h), 3)
  x = jax.random.normal(kx, (n, h, w, ci))
  k = jax.random.normal(kw, (3, 3, ci, co)) * 0.3
  y_ref, vjp_ref = jax.vjp(lambda x_, k_: _lax_conv(x_, k_, (s, s)), x, k)
  y, vjp = jax.vjp(lambda x_, k_: conv2d(x_, k_, (s, s), impl=impl), x, k)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  for a, b in zip(jax.jit(vjp)(g), vjp_ref(g)):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("weight_grad", [
    pytest.param(weight_grad_native, marks=NATIVE.marks), weight_grad_shifted, weight_grad_split])
def test_weight_grad_against_float64_numpy_sum(weight_grad):
  """dW[i, j] = sum over positions of x_pad[s*y + i, s*x + j] (x) g[y, x], by loops."""
  rng = np.random.default_rng(0)
  for s in (1, 2):
    x = rng.normal(size=(2, 7, 6, 3))
    ho, wo = -(-7 // s), -(-6 // s)
    g = rng.normal(size=(2, ho, wo, 19))   # 19 output channels: groups of 16 and 3
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


@pytest.mark.parametrize("impl", [NATIVE, "shifted", "split"])
def test_conv2d_under_vmap_and_jit(impl):
  """Batched over independent kernels (as fit_batch's vmap mode) == a loop."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 10, 11, 4))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4, 20))
  loss = lambda x_, k_: jnp.sum(jnp.sin(conv2d(x_, k_, (1, 1), impl=impl)))
  gv = jax.jit(jax.vmap(jax.grad(loss, argnums=1)))(x, k)
  ref = [jax.grad(lambda k_: jnp.sum(jnp.sin(_lax_conv(x[b], k_, (1, 1)))))(k[b])
         for b in range(3)]
  ref = np.stack(ref)
  np.testing.assert_allclose(gv, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("impl", [NATIVE, "shifted", "split"])
def test_velocity_net_gradients_equal_for_custom_and_xla_impls(impl):
  # 20 channels somewhere, so "split" has more than one group of 16.
  cfg = ModelConfig(enc_channels=(8, 20), dec_channels=(20, 8, 8), pe_dim=8, spade_hidden=4)
  params = init_params(cfg, jax.random.PRNGKey(0), (20, 18))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  imgs = jax.random.uniform(jax.random.PRNGKey(1), (3, 20, 18, 1))
  m0 = jax.nn.one_hot(jax.random.randint(jax.random.PRNGKey(2), (20, 18), 0, 4), 4)
  t = jnp.array([0.0, 0.4, 0.9])

  def grads(impl):
    net = VelocityUNet(cfg.replace(conv_impl=impl))
    return jax.grad(lambda p: jnp.sum(net.apply({"params": p}, imgs, m0, t) ** 2))(params)

  # The decoder biases come right before an instance norm: their true gradient
  # is 0 (float32 noise), so compare every leaf on the scale of the largest gradient.
  ref = jax.tree_util.tree_leaves(grads("xla"))
  scale = max(float(jnp.max(jnp.abs(b))) for b in ref)
  for a, b in zip(jax.tree_util.tree_leaves(grads(impl)), ref):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * scale)


def _up_concat_reference(x, skip, k):
  """lax conv of the materialised concat([np.repeat x2 upsampling cropped, skip])."""
  hh, ww = skip.shape[1:3]
  up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)[:, :hh, :ww]
  return _lax_conv(jnp.concatenate([up, skip], axis=-1), k, (1, 1))


# (h, w) -> (H, W): even (the four-phase path) and odd crops (the materialised
# path), one to several channels, and enough output channels for two "split" groups.
@pytest.mark.parametrize("impl", ["xla", NATIVE, "split", "shifted"])
@pytest.mark.parametrize("n,h,w,hh,ww,cx,cs,co", [
    (2, 4, 5, 8, 10, 3, 2, 5), (1, 8, 8, 16, 16, 32, 1, 32), (3, 5, 3, 10, 6, 4, 4, 20),
    (2, 4, 4, 7, 8, 3, 2, 4), (1, 5, 6, 9, 11, 2, 3, 17), (1, 1, 1, 2, 2, 2, 1, 3)])
def test_conv2d_up_concat_matches_materialised_lax(impl, n, h, w, hh, ww, cx, cs, co):
  kx, ks, kk, kg = jax.random.split(jax.random.PRNGKey(h * 10 + hh), 4)
  x = jax.random.normal(kx, (n, h, w, cx))
  skip = jax.random.normal(ks, (n, hh, ww, cs))
  k = jax.random.normal(kk, (3, 3, cx + cs, co)) * 0.3
  y_ref, vjp_ref = jax.vjp(_up_concat_reference, x, skip, k)
  y, vjp = jax.vjp(lambda *a: conv2d_up_concat(*a, impl=impl), x, skip, k)
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


@pytest.mark.parametrize("flag,spade_time", [("subpixel_up", "hidden"),
                                             ("split_gamma_beta", "hidden"),
                                             ("row_sums", "hidden"), ("row_sums", "gain")])
def test_velocity_net_implementation_flags_keep_the_function(flag, spade_time):
  """ModelConfig.subpixel_up / split_gamma_beta / row_sums only change how the
  network is computed (row_sums: with either way of feeding t to SPADE)."""
  hw = (10, 12)   # 10 -> 5 -> 3: the deeper skip is an odd crop, the other even
  # 32 channels in dec0, so split_gamma_beta applies there (SPLIT_GAMMA_BETA_MIN).
  # conv_impl="xla": the convs are top-level conv_general_dilated ops to count.
  on = ModelConfig(enc_channels=(4, 6), dec_channels=(32, 5, 4), pe_dim=8, spade_hidden=4,
                   spade_time=spade_time, conv_impl="xla")
  off = on.replace(**{flag: False})
  params = init_params(on, jax.random.PRNGKey(0), hw)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      init_params(off, jax.random.PRNGKey(0), hw))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  imgs = jax.random.uniform(jax.random.PRNGKey(1), (3, *hw, 1))
  m0 = jax.nn.one_hot(jax.random.randint(jax.random.PRNGKey(2), hw, 0, 4), 4)
  t = jnp.array([0.0, 0.4, 0.9])

  def run(cfg):
    f = lambda p: VelocityUNet(cfg).apply({"params": p}, imgs, m0, t)
    return jax.jit(lambda p: (f(p), jax.grad(lambda q: jnp.sum(f(q) ** 2))(p)))(params)

  def count(cfg, op):
    jaxpr = jax.make_jaxpr(lambda p: VelocityUNet(cfg).apply({"params": p}, imgs, m0, t))
    return str(jaxpr(params)).count(op)

  op = "custom_vjp" if flag == "row_sums" else "conv_general_dilated"
  assert count(on, op) > count(off, op)   # the flag changes the program

  (v_on, g_on), (v_off, g_off) = run(on), run(off)
  np.testing.assert_allclose(v_on, v_off, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(v_off))))
  # The decoder biases come right before an instance norm: their true gradient
  # is 0, so compare every leaf on the scale of the largest gradient.
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree_util.tree_leaves(g_off))
  for a, b in zip(jax.tree_util.tree_leaves(g_on), jax.tree_util.tree_leaves(g_off)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("impl", [NATIVE, "shifted", "split"])
@pytest.mark.parametrize("kernel_hw,padding,hw", [
    ((9, 9), "SAME", (12, 11)),      # 81 taps: over the native forward kernel's 64
    ((3, 3), "VALID", (2, 2)),       # an empty output
    ((1, 3), "VALID", (4, 2)),       # an empty output row (width 0)
])
def test_conv2d_outside_the_native_kernels_range_matches_lax(impl, kernel_hw, padding, hw):
  """Convs the native kernels do not take fall back to XLA's, with the same results."""
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(kernel_hw[0]), 3)
  x = jax.random.normal(kx, (2,) + hw + (3,))
  k = jax.random.normal(kw, kernel_hw + (3, 4)) * 0.3
  y_ref, vjp_ref = jax.vjp(lambda x_, k_: _lax_conv(x_, k_, (1, 1), padding), x, k)
  y, vjp = jax.vjp(lambda x_, k_: conv2d(x_, k_, padding=padding, impl=impl), x, k)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  for a, b in zip(jax.jit(vjp)(g), vjp_ref(g)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * (float(jnp.max(jnp.abs(b)))
                                                          if b.size else 1.0))


def test_bad_impl_is_rejected():
  with pytest.raises(ValueError, match="impl"):
    conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), impl="cudnn")


def test_default_impl_on_cpu(monkeypatch):
  """impl=None on CPU: "native" when the kernel is available (its custom call is
  in the gradient's jaxpr), else "split" above SPLIT_CHANNELS output channels."""
  from echo_ode_jax.kernels import _conv
  if jax.default_backend() != "cpu":
    pytest.skip("the default differs off CPU")
  x = jnp.zeros((1, 6, 6, 2))
  def jaxpr(co, grad):
    f = lambda k: jnp.sum(conv2d(x, k))
    return str(jax.make_jaxpr(jax.grad(f) if grad else f)(jnp.zeros((3, 3, 2, co))))
  monkeypatch.setattr(_native, "available", lambda: False)
  assert "custom_vjp" not in jaxpr(_conv.SPLIT_CHANNELS, grad=False)
  assert "custom_vjp" in jaxpr(_conv.SPLIT_CHANNELS + 1, grad=False)
  assert "ffi_call" not in jaxpr(_conv.SPLIT_CHANNELS + 1, grad=True)
  monkeypatch.undo()
  if _NO_NATIVE:
    pytest.skip(f"native conv kernel unavailable: {_native.why_unavailable()}")
  assert _conv.default_impl(3) == "native"
  assert "ffi_call" in jaxpr(3, grad=True)
  assert "ffi_call" in jaxpr(_conv.SPLIT_CHANNELS + 1, grad=True)
