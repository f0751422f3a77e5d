"""The velocity network against the paper's specification (section IV-A)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_ode_jax import model
from echo_ode_jax.model import ModelConfig, VelocityUNet


def test_positional_encoding_is_the_transformer_formula():
  t = np.array([0.0, 0.1, 0.5, 1.0])
  dim, half = 8, 4
  got = np.asarray(model.positional_encoding(jnp.asarray(t, jnp.float32), dim))
  ang = 1000.0 * t[:, None] / 1e4 ** (np.arange(half) / half)[None]
  want = np.concatenate([np.sin(ang), np.cos(ang)], -1)
  np.testing.assert_allclose(got, want, atol=2e-4)
  np.testing.assert_array_equal(got[0], [0] * half + [1] * half)   # t = 0
  with pytest.raises(ValueError, match="even"):
    model.positional_encoding(jnp.asarray(t), 7)


def test_architecture_is_the_papers_unet():
  """Encoder 4 strided convs [16, 32, 32, 32], decoder 7 convs [32, 32, 32, 32,
  32, 16, 16] with skips, a final 2-channel conv initialised to V = 0."""
  cfg = ModelConfig(use_spade=False, use_pe=False)
  params = model.init_params(cfg, jax.random.PRNGKey(0), (32, 32))
  enc = [params[f"enc{i}"]["kernel"].shape for i in range(4)]
  assert [s[-1] for s in enc] == [16, 32, 32, 32]
  assert [s[-2] for s in enc] == [1, 16, 32, 32]           # each feeds the next
  dec = [params[f"dec{i}"]["kernel"].shape for i in range(7)]
  assert [s[-1] for s in dec] == [32, 32, 32, 32, 32, 16, 16]
  # Inputs: dec0 takes the bottleneck; dec1..dec4 take the previous decoder
  # map concatenated with the skip of the level it was upsampled to.
  assert [s[-2] for s in dec] == [32, 32 + 32, 32 + 32, 32 + 16, 32 + 1, 32, 16]
  assert params["flow"]["kernel"].shape == (3, 3, 16, 2)
  assert not any(k.startswith(("enc4", "dec7")) for k in params)
  net = VelocityUNet(cfg)
  imgs = jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 32, 1))
  m0 = jax.nn.one_hot(jnp.zeros((32, 32), jnp.int32), 4)
  _, inter = net.apply({"params": params}, imgs, m0, jnp.array([0.0, 0.5, 1.0]),
                       capture_intermediates=True, mutable=["intermediates"])
  sizes = [inter["intermediates"][f"enc{i}"]["__call__"][0].shape[1] for i in range(4)]
  assert sizes == [16, 8, 4, 2]                            # stride 2 each
  v = net.apply({"params": params}, imgs, m0, jnp.array([0.0, 0.5, 1.0]))
  assert v.shape == (3, 32, 32, 2) and not np.any(np.asarray(v))   # zero last layer


def _perturbed(cfg, hw=(32, 32)):
  p = model.init_params(cfg, jax.random.PRNGKey(0), hw)
  leaves, tree = jax.tree_util.tree_flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("use_pe,use_spade", [(True, True), (False, True), (True, False)])
def test_conditioning_switches(use_pe, use_spade):
  """V depends on t only with PE on, and on m_0 only with SPADE on."""
  cfg = ModelConfig(enc_channels=(8, 8), dec_channels=(8, 8, 8), pe_dim=8, spade_hidden=4,
                    use_pe=use_pe, use_spade=use_spade)
  params = _perturbed(cfg)
  apply = jax.jit(lambda im, m, t: VelocityUNet(cfg).apply({"params": params}, im, m, t))
  img = jnp.broadcast_to(jax.random.uniform(jax.random.PRNGKey(2), (1, 32, 32, 1)),
                         (2, 32, 32, 1))
  lab_a = np.zeros((32, 32), np.int32)
  lab_a[8:20, 10:22] = 1
  lab_b = np.roll(lab_a, 6, axis=1)
  m_a, m_b = jax.nn.one_hot(lab_a, 4), jax.nn.one_hot(lab_b, 4)
  ts = jnp.array([0.1, 0.9])
  v = np.asarray(apply(img, m_a, ts))
  dt = np.max(np.abs(v[0] - v[1]))                       # same image, two times
  dm = np.max(np.abs(v - np.asarray(apply(img, m_b, ts))))  # two masks
  scale = np.max(np.abs(v))
  assert scale > 1e-3
  assert (dt > 1e-3 * scale) == use_pe, dt
  assert (dm > 1e-3 * scale) == use_spade, dm
  # Without the switch the difference is float rounding across the batch.
  assert use_pe or dt < 1e-5 * scale
  assert use_spade or dm < 1e-5 * scale
