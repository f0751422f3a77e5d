"""The velocity network against the paper's specification (section IV-A)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_ode_jax import kernels, model
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


@pytest.mark.parametrize("use_pe,use_spade,spade_time", [
    (True, True, "hidden"), (False, True, "hidden"), (True, False, "hidden"),
    (True, True, "gain"), (False, True, "gain")])
def test_conditioning_switches(use_pe, use_spade, spade_time):
  """V depends on t only with PE on, and on m_0 only with SPADE on."""
  cfg = ModelConfig(enc_channels=(8, 8), dec_channels=(8, 8, 8), pe_dim=8, spade_hidden=4,
                    use_pe=use_pe, use_spade=use_spade, spade_time=spade_time)
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


def _conv3x3_same(x, k, b):
  """Hand-written 3x3 SAME cross-correlation (float64): x (N, H, W, Ci), k (3, 3, Ci, Co)."""
  n, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, w, k.shape[-1])) + b
  for i in range(3):
    for j in range(3):
      out += xp[:, i:i + h, j:j + w, :] @ k[i, j]
  return out


@pytest.mark.parametrize("time", ["hidden", "gain"])
@pytest.mark.parametrize("native", ["on", "off"])
def test_spade_time_is_the_documented_formula(time, native, monkeypatch):
  """SpadeTime against its docstring in float64 numpy:
  hidden: gamma, beta = gamma_beta(relu(shared(m_0) + time(PE(t)))), per knot;
  gain:   gamma, beta = gamma_beta(relu(shared(m_0))) * (1 + time(PE(t))), per channel;
  out = leaky_relu(norm(f) (1 + gamma) + beta, 0.2); with the native kernels
  (convs, kernels.norm_modulate) and with XLA's ops (ECHO_ODE_NATIVE=off)."""
  if native == "on" and (jax.default_backend() != "cpu" or not kernels.native_available()):
    pytest.skip("native kernels unavailable")
  monkeypatch.setenv("ECHO_ODE_NATIVE", native)
  k, h, w, c, hidden, pe_dim = 3, 6, 5, 4, 3, 8
  spade = model.SpadeTime(c, hidden, time=time)
  rng = np.random.default_rng(0)
  f = rng.normal(2.0, 1.5, size=(k, h, w, c)).astype(np.float32)
  m0 = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=(h, w))]
  pe = np.asarray(model.positional_encoding(jnp.array([0.0, 0.3, 0.8]), pe_dim))
  params = spade.init(jax.random.PRNGKey(0), f, m0, pe)["params"]
  params = jax.tree_util.tree_map(lambda p: p + rng.normal(0, 0.3, size=p.shape), params)
  got = np.asarray(spade.apply({"params": params}, f, m0, pe))
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  hid = _conv3x3_same(m0[None].astype(np.float64), p["shared"]["kernel"], p["shared"]["bias"])
  tproj = pe @ p["time"]["kernel"] + p["time"]["bias"]
  if time == "hidden":
    hid = hid + tproj[:, None, None, :]
  gb = _conv3x3_same(np.maximum(hid, 0), p["gamma_beta"]["kernel"], p["gamma_beta"]["bias"])
  gamma, beta = gb[..., :c], gb[..., c:]
  if time == "gain":
    assert gb.shape[0] == 1 and tproj.shape == (k, 2 * c)
    gamma = gamma * (1 + tproj[:, None, None, :c])
    beta = beta * (1 + tproj[:, None, None, c:])
  norm = (f - f.mean(axis=(1, 2), keepdims=True)) / np.sqrt(f.var(axis=(1, 2), keepdims=True)
                                                             + 1e-5)
  z = norm * (1 + gamma) + beta
  want = np.where(z >= 0, z, 0.2 * z)
  assert np.mean(want < 0) > 0.1 and np.std(gamma) > 0.1
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_spade_time_gain_runs_the_gamma_beta_conv_once_per_sequence(monkeypatch):
  """The point of spade_time="gain": m_0's gamma_beta convs see one map, not K."""
  # XLA's ops only: every conv is a top-level conv_general_dilated in the jaxpr.
  monkeypatch.setenv("ECHO_ODE_NATIVE", "off")
  kw = dict(enc_channels=(8, 8), dec_channels=(8, 8, 8), pe_dim=8, spade_hidden=4)
  imgs, m0 = jnp.zeros((5, 16, 16, 1)), jax.nn.one_hot(jnp.zeros((16, 16), jnp.int32), 4)
  t = jnp.linspace(0, 0.8, 5)

  def conv_batches(time):
    cfg = ModelConfig(spade_time=time, **kw)
    params = model.init_params(cfg, jax.random.PRNGKey(0), (16, 16))
    jaxpr = jax.make_jaxpr(lambda p: VelocityUNet(cfg).apply({"params": p}, imgs, m0, t))(params)
    return sorted(e.invars[0].aval.shape[0] for e in jaxpr.eqns
                  if e.primitive.name == "conv_general_dilated")

  # shared (1) + gamma_beta (K for hidden, 1 for gain) per decoder layer.
  assert conv_batches("hidden").count(1) == 3
  assert conv_batches("gain").count(1) == 6


def test_bad_spade_time_is_rejected():
  with pytest.raises(ValueError, match="spade_time"):
    ModelConfig(spade_time="film")


@pytest.mark.skipif(jax.default_backend() != "cpu" or not kernels.native_available(),
                    reason="native kernels unavailable (CPU with a C++ compiler)")
def test_native_and_xla_paths_are_the_same_network(monkeypatch):
  """The network with the native kernels (convs, kernels.norm_modulate in every
  SPADE) and with XLA's ops only (ECHO_ODE_NATIVE=off): the same velocity and
  parameter gradients up to float32 rounding; the decoder convs' biases, left
  out before the instance norm that cancels them, get a zero gradient on both
  paths; the native program has the norm_modulate kernel in it."""
  cfg = ModelConfig(enc_channels=(8, 16), dec_channels=(16, 16, 8), pe_dim=8, spade_hidden=4)
  params = _perturbed(cfg)
  rng = np.random.default_rng(3)
  imgs = jnp.asarray(rng.uniform(size=(3, 32, 32, 1)), jnp.float32)
  m0 = jax.nn.one_hot(jnp.asarray(rng.integers(0, 4, (32, 32))), 4)
  t = jnp.array([0.0, 0.4, 0.9])
  r = jnp.asarray(rng.normal(size=(3, 32, 32, 2)), jnp.float32)

  def loss(cfg):
    return lambda p: jnp.sum(VelocityUNet(cfg).apply({"params": p}, imgs, m0, t) * r)

  def run(mode):
    monkeypatch.setenv("ECHO_ODE_NATIVE", mode)
    hlo = jax.jit(jax.grad(loss(cfg))).lower(params).as_text()
    return hlo, jax.jit(jax.value_and_grad(loss(cfg)))(params)

  (hlo, (v_on, g_on)), (hlo_off, (v_off, g_off)) = run("on"), run("off")
  assert "echo_ode_norm_modulate_f32" in hlo and "echo_ode_norm_modulate_bwd_f32" in hlo
  assert "echo_ode" not in hlo_off
  assert abs(float(v_off)) > 1.0
  np.testing.assert_allclose(v_on, v_off, rtol=1e-5)
  # The scale is the largest gradient entry (the decoder biases' is 0).
  for i in range(3):
    np.testing.assert_array_equal(g_on[f"dec{i}"]["bias"], 0.0)
    np.testing.assert_array_equal(g_off[f"dec{i}"]["bias"], 0.0)
  leaves_off = jax.tree_util.tree_leaves(g_off)
  scale = max(float(np.max(np.abs(b))) for b in leaves_off)
  for a, b in zip(jax.tree_util.tree_leaves(g_on), leaves_off):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
