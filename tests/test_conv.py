"""conv2d's hand-written VJP (shifted-GEMM weight gradient) against lax and its autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from echo_ode_jax.kernels import conv2d, weight_grad_shifted
from echo_ode_jax.model import ModelConfig, VelocityUNet, init_params


def _lax_conv(x, w, strides, padding="SAME"):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Odd and even sizes as the U-Net produces them (128 -> 64 -> ... and odd crops),
# stride 1 and 2, channel counts that are not multiples of anything.
@pytest.mark.parametrize("n,h,w,ci,co,s", [
    (2, 17, 23, 3, 5, 1), (3, 16, 16, 4, 6, 2), (1, 9, 7, 2, 3, 2), (2, 33, 32, 5, 4, 1),
    (1, 5, 5, 1, 2, 1), (4, 12, 10, 8, 8, 2)])
def test_conv2d_matches_lax_and_its_autodiff(n, h, w, ci, co, s):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(n * 100 + h), 3)
  x = jax.random.normal(kx, (n, h, w, ci))
  k = jax.random.normal(kw, (3, 3, ci, co)) * 0.3
  y_ref, vjp_ref = jax.vjp(lambda x_, k_: _lax_conv(x_, k_, (s, s)), x, k)
  y, vjp = jax.vjp(lambda x_, k_: conv2d(x_, k_, (s, s), impl="shifted"), x, k)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  for a, b in zip(jax.jit(vjp)(g), vjp_ref(g)):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale)


def test_weight_grad_against_float64_numpy_sum():
  """dW[i, j] = sum over positions of x_pad[s*y + i, s*x + j] (x) g[y, x], by loops."""
  rng = np.random.default_rng(0)
  for s in (1, 2):
    x = rng.normal(size=(2, 7, 6, 3))
    ho, wo = -(-7 // s), -(-6 // s)
    g = rng.normal(size=(2, ho, wo, 4))
    pads = lax.padtype_to_pads((7, 6), (3, 3), (s, s), "SAME")
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ref = np.zeros((3, 3, 3, 4))
    for i in range(3):
      for j in range(3):
        win = xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]
        ref[i, j] = np.einsum("nyxc,nyxo->co", win, g)
    got = weight_grad_shifted(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32),
                              (3, 3), (s, s), pads)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_conv2d_under_vmap_and_jit():
  """Batched over independent kernels (as fit_batch's vmap mode) == a loop."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 10, 11, 4))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4, 5))
  loss = lambda x_, k_: jnp.sum(jnp.sin(conv2d(x_, k_, (1, 1), impl="shifted")))
  gv = jax.jit(jax.vmap(jax.grad(loss, argnums=1)))(x, k)
  ref = [jax.grad(lambda k_: jnp.sum(jnp.sin(_lax_conv(x[b], k_, (1, 1)))))(k[b])
         for b in range(3)]
  np.testing.assert_allclose(gv, np.stack(ref), rtol=1e-4, atol=1e-5)


def test_velocity_net_gradients_equal_for_both_impls():
  cfg = ModelConfig(enc_channels=(8, 8), dec_channels=(8, 8, 8), pe_dim=8, spade_hidden=4)
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

  for a, b in zip(jax.tree_util.tree_leaves(grads("shifted")),
                  jax.tree_util.tree_leaves(grads("xla"))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b)) + 1))


def test_bad_impl_is_rejected():
  with pytest.raises(ValueError, match="impl"):
    conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), impl="cudnn")
