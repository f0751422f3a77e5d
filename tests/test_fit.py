"""Echo-ODE fit: correctness of the formulation, batching, sharding, failures, bad input."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_ode_jax import fit, kernels, losses
from echo_ode_jax.data import synthetic
from echo_ode_jax.model import ModelConfig, VelocityUNet

# A small network of the same structure (encoder, SPADE decoder, PE) compiles
# fast; the quality test below uses the paper's widths.
TINY = ModelConfig(enc_channels=(8, 8), dec_channels=(8, 8, 8), pe_dim=8, spade_hidden=4)
TINY_CFG = fit.FitConfig(steps=3, log_every=3, model=TINY)


def _dice(a, b):
  return 2 * np.sum(a & b) / max(1, np.sum(a) + np.sum(b))


@pytest.fixture(scope="module")
def small_seqs():
  # T in 5..7 all pad to the same T bucket (8), so every fit below shares one
  # compiled step per batch size.
  return [synthetic.make_sequence(i, size=32, num_frames=n)[0]
          for i, n in enumerate((6, 5, 7, 6))]


def _prep(seq, cfg=TINY_CFG, **kw):
  return fit.prepare_sequence(seq.img, seq.gt[0], seq.gt[-1], cfg=cfg, **kw)


def _perturbed_params(cfg, key, hw):
  """Random non-zero parameters (the zero-initialised last layers make V = 0)."""
  p = fit.init_state(cfg, key, hw)[0]
  leaves, tree = jax.tree_util.tree_flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(tree, leaves)


def test_batched_knots_equal_inloop_reference():
  """The one design fact: V evaluated once at the knots == V called inside the solver."""
  cfg = TINY_CFG.replace(dt=0.25)
  s = synthetic.make_sequence(5, size=16, num_frames=4)[0]
  seq = jax.tree_util.tree_map(jnp.asarray, _prep(s, cfg))
  params = _perturbed_params(cfg, jax.random.PRNGKey(0), (16, 16))
  apply_fn = VelocityUNet(cfg.model).apply
  f = lambda form: jax.jit(jax.value_and_grad(
      lambda p: losses.loss_fn(p, seq, cfg, apply_fn, form)[0]))
  (lb, gb), (li, gi) = f("batched")(params), f("inloop")(params)
  assert float(lb) > 0
  np.testing.assert_allclose(lb, li, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(gb), jax.tree_util.tree_leaves(gi)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_loss_terms_against_hand_computed_cases(small_seqs):
  """At the identity flow (V = 0): L_seg = Dice loss of m_0 vs m_1, L_EF = |0 - EF_guide|."""
  cfg = TINY_CFG
  s = small_seqs[0]
  seq = jax.tree_util.tree_map(jnp.asarray, _prep(s))
  params = fit.init_state(cfg, jax.random.PRNGKey(0), (32, 32))[0]   # V = 0 exactly
  terms, phi = losses.loss_terms(params, seq, cfg, VelocityUNet(cfg.model).apply)
  grid = np.stack(np.meshgrid(np.arange(32.0), np.arange(32.0), indexing="ij"), -1)
  np.testing.assert_allclose(phi, np.broadcast_to(grid, phi.shape), atol=1e-6)
  m0, m1 = s.gt[0], s.gt[-1]
  dices = [(2 * np.sum((m0 == c) & (m1 == c)) + 1) / (np.sum(m0 == c) + np.sum(m1 == c) + 1)
           for c in (1, 2, 3)]
  np.testing.assert_allclose(terms["seg"], 1 - np.mean(dices), rtol=1e-5)
  ef_guide = 1 - np.sum(m1 == 1) / np.sum(m0 == 1)
  np.testing.assert_allclose(terms["ef"], ef_guide, rtol=1e-4)
  assert float(terms["jdet"]) == 0 and float(terms["smt"]) == 0
  # L_sim at the identity: mean over frames of the MSE of smoothed I_0 vs smoothed I_t.
  from scipy import ndimage
  sm = ndimage.gaussian_filter(s.img.astype(np.float64), (0, 1, 1), mode="reflect")
  np.testing.assert_allclose(terms["sim"], np.mean((sm - sm[0]) ** 2), rtol=1e-4)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_fit_batch_equals_single_fits_and_failure_is_isolated(small_seqs, mode):
  cfg = TINY_CFG
  preps = [_prep(s) for s in small_seqs]
  keys = [jax.random.PRNGKey(10 + i) for i in range(4)]
  singles = [fit.fit_sequence(p, cfg, key=k) for p, k in zip(preps, keys)]
  batch = fit.fit_batch(preps, cfg, keys=keys, batch_mode=mode)
  assert len(batch) == len(singles) == 4
  for s, b, q in zip(singles, batch, small_seqs):
    assert b.masks.shape == (q.img.shape[0], 32, 32)
    np.testing.assert_array_equal(s.masks, b.masks)
    # vmap runs grouped convolutions (another summation order); float32
    # rounding grows over the Adam steps to ~1e-4 pixels.
    np.testing.assert_allclose(s.phi, b.phi, atol=5e-4)
    np.testing.assert_allclose(s.history["loss"], b.history["loss"], rtol=1e-4)
    assert not b.failed
  # A non-finite loss in one sequence marks it failed; the other carries on unchanged.
  bad = dict(preps[1])
  bad["images_smooth"] = np.array(bad["images_smooth"])
  bad["images_smooth"][1, 3, 3] = np.nan
  res = fit.fit_batch([preps[0], bad] + preps[2:], cfg, keys=keys, batch_mode=mode)
  assert [r.failed for r in res] == [False, True, False, False]
  assert "step 0" in res[1].reason
  for i in (0, 2, 3):
    np.testing.assert_array_equal(res[i].masks, batch[i].masks)


@pytest.mark.parametrize("mode", ["single", "vmap", "loop"])
def test_keep_best_returns_the_parameters_of_the_lowest_loss(small_seqs, mode):
  """The loss of step i belongs to the parameters after i updates, so a fit that
  keeps the best of N steps equals a plain fit stopped after best_step steps."""
  cfg = TINY_CFG.replace(steps=9, lr=0.1, lr_decay="constant", clip_norm=None)
  seq, key = _prep(small_seqs[0], cfg), jax.random.PRNGKey(3)
  if mode == "single":
    best = fit.fit_sequence(seq, cfg, key=key)
  else:
    best = fit.fit_batch([seq, _prep(small_seqs[1], cfg)], cfg, keys=[key, key],
                         batch_mode=mode)[0]
  loss = best.history["loss"]
  assert 0 < best.best_step < cfg.steps - 1 and loss[-1] > loss.min()   # lr 0.1 overshoots
  assert best.best_step == int(np.argmin(loss))
  assert best.final["loss"] == pytest.approx(float(loss.min()))
  stopped = fit.fit_sequence(seq, cfg.replace(steps=best.best_step, keep_best=False), key=key)
  np.testing.assert_array_equal(best.masks, stopped.masks)
  np.testing.assert_allclose(best.phi, stopped.phi, atol=1e-4)
  last = fit.fit_sequence(seq, cfg.replace(keep_best=False), key=key)
  assert last.best_step == -1
  assert last.final["loss"] == pytest.approx(float(last.history["loss"][-1]), rel=1e-6)
  # Same trajectory as the keep-best fit (vmap's grouped convs round differently,
  # and lr 0.1 amplifies that over the 9 steps: the overshoot at step 5 takes
  # a 1e-6 difference to ~0.5% by step 8).
  np.testing.assert_allclose(last.history["loss"][:5], loss[:5], rtol=1e-4)
  np.testing.assert_allclose(last.history["loss"], loss, rtol=1e-4 if mode != "vmap" else 1e-2)


def test_optimizer_clipping_and_cosine_decay_against_hand_computed_adam():
  """clip_by_global_norm rescales the gradient to the clip norm; the cosine lr
  follows lr * (f + (1 - f) (1 + cos(pi t / steps)) / 2). With a constant
  gradient Adam's bias-corrected update is -lr_t * g / (|g| + eps)."""
  params = {"w": jnp.zeros(3)}
  g = {"w": jnp.asarray([3.0, -4.0, 0.0])}   # global norm 5
  cfg = fit.FitConfig(steps=10, lr=0.1, lr_decay="cosine", lr_final=0.2, clip_norm=0.5)
  opt = fit._optimizer(cfg)
  state = opt.init(params)
  unit = np.asarray([3.0, -4.0, 0.0]) / 5 * 0.5     # the clipped gradient
  for t in range(cfg.steps):
    upd, state = opt.update(g, state, params)
    lr_t = 0.1 * (0.2 + 0.8 * (1 + np.cos(np.pi * t / 10)) / 2)
    np.testing.assert_allclose(upd["w"], -lr_t * unit / (np.abs(unit) + 1e-8), rtol=1e-5,
                               atol=1e-7)
  with pytest.raises(ValueError, match="lr_decay"):
    fit._optimizer(fit.FitConfig(lr_decay="linear"))


@pytest.mark.parametrize("decay", ["cosine", "constant"])
def test_warmup_scales_the_lr_linearly_from_zero(decay):
  """With warmup_steps = 4 Adam's update at step t is the same as without, times
  min(1, t / 4) (a constant gradient: -lr_t * sign(g)); the first is zero."""
  params = {"w": jnp.zeros(2)}
  g = {"w": jnp.asarray([0.3, -2.0])}
  cfg = fit.FitConfig(steps=10, lr=0.1, lr_decay=decay, lr_final=0.2, clip_norm=None,
                      warmup_steps=4)
  opt = fit._optimizer(cfg)
  state = opt.init(params)
  for t in range(cfg.steps):
    upd, state = opt.update(g, state, params)
    lr_t = 0.1 * (0.2 + 0.8 * (1 + np.cos(np.pi * t / 10)) / 2) if decay == "cosine" else 0.1
    np.testing.assert_allclose(upd["w"], -lr_t * min(1.0, t / 4) * np.sign([0.3, -2.0]),
                               rtol=1e-4, atol=1e-9)
  with pytest.raises(ValueError, match="warmup_steps"):
    fit.FitConfig(warmup_steps=-1)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_batch_over_2_devices_equals_one_device(small_seqs, mode):
  if jax.device_count() < 2:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=2 or more (see conftest)")
  cfg = TINY_CFG
  preps = [_prep(s) for s in small_seqs]
  keys = [jax.random.PRNGKey(10 + i) for i in range(4)]
  one = fit.fit_batch(preps, cfg, keys=keys, batch_mode=mode)
  # Programs compile once per device, so the four sequences go to two
  # (loop: devices 0, 1, 0, 1; vmap: a share of two on each) to keep the test lean.
  four = fit.fit_batch(preps, cfg, keys=keys, mesh=fit.batch_mesh(jax.devices()[:2]),
                       batch_mode=mode)
  if mode == "loop":   # each sequence runs the same program, on another device
    for a, b in zip(one, four):
      np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-6)
      np.testing.assert_allclose(a.phi, b.phi, atol=1e-5)
      np.testing.assert_array_equal(a.masks, b.masks)
    return
  for a, b in zip(one, four):
    # The same step vmapped over 4 sequences or 2: losses agree to float rounding. Adam
    # divides by sqrt(v), which amplifies rounding in parameters whose gradient
    # is ~0, so phi may move by a few hundredths of a pixel and a handful of
    # boundary pixels (where two classes tie) may flip.
    np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(a.phi, b.phi, atol=0.25)
    assert np.mean(a.masks == b.masks) > 0.995


@pytest.mark.parametrize("case", ["shape", "mask_shape", "t1", "labels"])
def test_prepare_rejects_bad_input(small_seqs, case):
  s = small_seqs[0]
  with pytest.raises(ValueError) as e:
    if case == "shape":
      fit.prepare_sequence(s.img[0], s.gt[0], s.gt[-1])
    elif case == "mask_shape":
      fit.prepare_sequence(s.img, s.gt[0][:20], s.gt[-1])
    elif case == "t1":
      fit.prepare_sequence(s.img[:1], s.gt[0], s.gt[-1])
    else:
      fit.prepare_sequence(s.img, s.gt[0] + 4, s.gt[-1])
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("stride,native", [(1, "off"), (2, "on")])
def test_fit_tracks_synthetic_motion_better_than_copying_m0(stride, native, monkeypatch):
  """48^2, 8 frames, the paper's network (at full and half resolution): Dice
  over all frames beats copying m_0. Full resolution runs on XLA's ops, half
  on the native CPU kernels (ECHO_ODE_NATIVE), so each kernel path fits motion;
  on CPUs without AVX-512 the native convolutions are several times slower than
  XLA's at 48^2."""
  monkeypatch.setenv("ECHO_ODE_NATIVE", native)
  seq, _ = synthetic.make_sequence(3, size=48, num_frames=8, ef=0.6)
  cfg = fit.FitConfig(steps=120, log_every=60, velocity_stride=stride)
  res = fit.fit_sequence(_prep(seq, cfg), cfg)
  lv_fit = np.mean([_dice(res.masks[t] == 1, seq.gt[t] == 1) for t in range(8)])
  lv_copy = np.mean([_dice(seq.gt[0] == 1, seq.gt[t] == 1) for t in range(8)])
  es_fit = _dice(res.masks[-1] == 1, seq.gt[-1] == 1)
  es_copy = _dice(seq.gt[0] == 1, seq.gt[-1] == 1)
  assert lv_fit > lv_copy + 0.04, (lv_fit, lv_copy)
  assert es_fit > 0.9 and es_fit > es_copy + 0.1, (es_fit, es_copy)
  assert res.folding_fraction < 0.01
  assert res.history["loss"][-1] < 0.5 * res.history["loss"][0]


def test_fused_step_loop_has_no_host_transfers(small_seqs):
  """The GPU path: log_every steps in one lax.scan, state donated, no host round-trip."""
  cfg = TINY_CFG
  seq = jax.device_put(_prep(small_seqs[0], cfg))
  state = jax.device_put(fit.init_state(cfg, jax.random.PRNGKey(0), (32, 32)))
  start = jax.device_put(np.int32(0))
  run = fit._chunk_fn(cfg, 3, False)
  run(jax.tree_util.tree_map(jnp.copy, state), seq, start)   # compile outside the guard
  with jax.transfer_guard("disallow"):
    new_state, terms = run(state, seq, start)
    jax.block_until_ready(new_state)
  assert terms["loss"].shape == (3,)
  # The donated input buffers were consumed (reused for the new state).
  assert jax.tree_util.tree_leaves(state)[0].is_deleted()
  # The guard is live: an implicit host-to-device transfer fails.
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    with jax.transfer_guard("disallow"):
      run(new_state, _prep(small_seqs[0], cfg), start)


def test_fit_programs_have_no_host_callbacks(small_seqs):
  """The step and final programs hold no host callback, so no host round-trip
  and the persistent compilation cache can store them (XLA never caches a
  program with one). diffrax's SaveAt(ts) on traced frame times used to add
  two."""
  cfg = TINY_CFG
  seq = _prep(small_seqs[0], cfg)
  state = fit.init_state(cfg, jax.random.PRNGKey(0), (32, 32))
  step = fit._chunk_fn(cfg, 2, False).lower(state, seq, np.int32(0)).as_text()
  final = fit._final_fn(cfg, False).lower(state, seq).as_text()
  assert "convolution" in step and "convolution" in final   # the lowered programs
  for text in (step, final):
    assert "callback" not in text


def test_bfloat16_convs_track_float32():
  """compute_dtype=bfloat16 runs the convs in bf16; the loss stays close to float32's."""
  s = synthetic.make_sequence(1, size=32, num_frames=5)[0]
  cfg32 = TINY_CFG
  cfg16 = TINY_CFG.replace(**{"model.compute_dtype": "bfloat16"})
  seq = jax.tree_util.tree_map(jnp.asarray, _prep(s, cfg32))
  params = _perturbed_params(cfg32, jax.random.PRNGKey(0), (32, 32))
  l32 = losses.loss_fn(params, seq, cfg32, VelocityUNet(cfg32.model).apply)[0]
  l16 = losses.loss_fn(params, seq, cfg16, VelocityUNet(cfg16.model).apply)[0]
  v16 = losses.velocity_knots(params, seq, cfg16, VelocityUNet(cfg16.model).apply)
  assert v16.dtype == jnp.float32            # the velocity is returned in float32
  np.testing.assert_allclose(l16, l32, rtol=0.05)
  assert float(l16) != float(l32)             # the bf16 path really ran


def test_compiler_options_keep_the_function(small_seqs, monkeypatch):
  """The CPU fit programs' XLA options (YNNPACK fusions off with more than one
  core) and the backend's kernel choice change speed only: the loss gradient
  equals XLA's default compilation of the network with XLA's ops only
  (ECHO_ODE_NATIVE=off)."""
  from echo_ode_jax.kernels import _backend
  cfg = TINY_CFG
  off = {"xla_cpu_experimental_ynn_fusion_type": ""}
  on_cpu = jax.default_backend() == "cpu"
  assert kernels.compiler_options() == (off if on_cpu and kernels.cpu_threads() > 1 else None)
  with mock.patch.object(_backend, "cpu_threads", lambda: 1):
    assert kernels.compiler_options() is None
  with mock.patch.object(_backend, "cpu_threads", lambda: 2):
    assert kernels.compiler_options() == (off if on_cpu else None)
  assert fit.steps_per_call(cfg) == (1 if on_cpu else cfg.log_every)
  seq = jax.tree_util.tree_map(jnp.asarray, _prep(small_seqs[0]))
  params = fit.init_state(cfg, jax.random.PRNGKey(3), (32, 32))[0]
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)   # nonzero velocity
  def grad():
    apply = VelocityUNet(cfg.model).apply
    return jax.grad(lambda p: losses.total_loss(losses.loss_terms(p, seq, cfg, apply)[0], cfg))
  a = jax.jit(grad(), compiler_options=kernels.compiler_options())(params)   # the fit's
  monkeypatch.setenv("ECHO_ODE_NATIVE", "off")
  b = jax.jit(grad())(params)     # XLA's defaults, XLA's ops
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(y))) + 1e-7)


def test_propagate_labels_warps_m0_on_its_own_grid():
  """An affine map fitted on a 16^2 grid, applied to a 48^2 m_0: the labels equal
  scipy's bilinear warp of the one-hot m_0 at the hand-derived 48^2 map (argmax),
  away from the border."""
  from scipy import ndimage
  h, big = 16, 48
  a, b = np.array([[0.85, 0.1], [-0.05, 0.9]]), np.array([1.0, 0.5])
  g = lambda n: np.stack(np.meshgrid(np.arange(n, dtype=np.float64),
                                     np.arange(n, dtype=np.float64), indexing="ij"), -1)
  phi = np.stack([g(h), g(h) @ a.T + b])
  yy, xx = np.mgrid[:big, :big]
  m0 = ((yy - 24) ** 2 / 14 ** 2 + (xx - 22) ** 2 / 9 ** 2 < 1).astype(np.uint8)
  m0[(yy - 24) ** 2 / 8 ** 2 + (xx - 22) ** 2 / 5 ** 2 < 1] = 2
  got = fit.propagate_labels(phi, m0)
  assert got.shape == (2, big, big) and got.dtype == np.uint8
  s = h / big
  xs = (g(big) + 0.5) * s - 0.5
  coords = (xs @ a.T + b + 0.5) / s - 0.5
  onehot = np.eye(4)[m0]
  soft = np.stack([ndimage.map_coordinates(onehot[..., c], np.moveaxis(coords, -1, 0),
                                           order=1, mode="nearest") for c in range(4)], -1)
  want = np.argmax(soft, -1)
  inner = (slice(3, -3), slice(3, -3))
  ties = np.sort(soft, -1)[..., -1] - np.sort(soft, -1)[..., -2] < 1e-4
  assert np.all((got[1] == want)[inner] | ties[inner])
  np.testing.assert_array_equal(got[0][inner], m0[inner])


def test_from_dict_ignores_fields_of_earlier_versions():
  """A config saved by a version with the flags that only chose how the fit ran
  (scan_steps, xla_cpu_ynn, model.conv_impl, ...) reads as today's config."""
  import json
  cfg = fit.FitConfig(steps=7, model=ModelConfig(pe_dim=8, spade_time="gain"))
  old = json.loads(cfg.to_json())
  old.update(scan_steps=3, xla_cpu_ynn=False)
  old["model"].update(conv_impl="split", subpixel_up=False, split_gamma_beta=True,
                      row_sums=False, fused_norm=True)
  assert fit.FitConfig.from_dict(old) == cfg
  with pytest.raises(TypeError):
    fit.FitConfig.from_dict({**json.loads(cfg.to_json()), "no_such_field": 1})


def test_velocity_sigma_smooths_v_like_scipy():
  """cfg.velocity_sigma blurs each velocity component over (H, W) as
  scipy.ndimage.gaussian_filter (mode "reflect"), at every knot."""
  from scipy import ndimage
  cfg = TINY_CFG
  s = synthetic.make_sequence(2, size=16, num_frames=3)[0]
  seq = jax.tree_util.tree_map(jnp.asarray, _prep(s, cfg))
  params = _perturbed_params(cfg, jax.random.PRNGKey(0), (16, 16))
  apply_fn = VelocityUNet(cfg.model).apply
  raw = np.asarray(losses.velocity_knots(params, seq, cfg, apply_fn), np.float64)
  smooth = losses.velocity_knots(params, seq, cfg.replace(velocity_sigma=1.5), apply_fn)
  assert np.std(raw) > 1e-3
  ref = ndimage.gaussian_filter(raw, (0, 1.5, 1.5, 0), mode="reflect")
  np.testing.assert_allclose(smooth, ref, atol=1e-5)
