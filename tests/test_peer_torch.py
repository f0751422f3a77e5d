"""benchmarks/peer_torch.py (the PyTorch peer of the fit step) against the JAX step.

Skipped where torch is not installed (it is not a project dependency).
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from echo_ode_jax import fit, losses  # noqa: E402
from echo_ode_jax.data import synthetic  # noqa: E402
from echo_ode_jax.model import ModelConfig, VelocityUNet, init_params  # noqa: E402

SIZE, FRAMES = 32, 7   # frames at k/6: most fall between Euler steps (dt 0.1)


def _load_peer():
  path = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_torch.py"
  spec = importlib.util.spec_from_file_location("peer_torch", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


peer = _load_peer()


def _perturbed(params, key, scale=0.05):
  """params + scale * N(0, 1): the zero-initialised last conv gives a zero velocity."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _leaves(tree):
  return {"/".join(p.key for p in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def case():
  # velocity_scale 6 moves phi by up to ~6 px and folds a few pixels (R_Jdet > 0);
  # lambda_smt > 0 so that every term enters the gradient.
  cfg = fit.FitConfig(lambda_smt=0.1, lambda_ncc=0.0).replace(
      **{"model.velocity_scale": 6.0})
  s, _ = synthetic.make_sequence(1, size=SIZE, num_frames=FRAMES)
  seq = fit.prepare_sequence(s.img, s.gt[0], s.gt[-1], cfg=cfg)   # T padded to 8
  params = _perturbed(init_params(cfg.model, jax.random.PRNGKey(0), (SIZE, SIZE)),
                      jax.random.PRNGKey(1))
  jseq = jax.tree_util.tree_map(jnp.asarray, seq)
  apply_fn = fit._model(cfg).apply
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda p: losses.loss_fn(p, jseq, cfg, apply_fn), has_aux=True))
  (loss, terms), grads = value_and_grad(params)
  return dict(cfg=cfg, seq=seq, params=params, loss=float(loss),
              terms={k: float(v) for k, v in terms.items()}, grads=grads,
              value_and_grad=value_and_grad, jseq=jseq, apply_fn=apply_fn)


def _torch_terms(fitter):
  terms, _ = fitter.loss_terms(0)
  return {k: v.item() for k, v in terms.items()}


def _assert_terms_close(got, want, rtol=1e-4):
  """The peer's terms (the paper's) match; the JAX terms beyond them are off (0)."""
  assert set(got) == set(peer.TERMS) and set(want) - {"loss"} == set(losses.TERMS)
  for k in set(want) - set(got) - {"loss"}:
    assert want[k] == 0, k
  for k in got:
    assert got[k] == pytest.approx(want[k], rel=rtol, abs=1e-7), k


@pytest.mark.parametrize("model_kw,hw", [
    ({}, (32, 32)),
    ({"use_pe": False}, (40, 24)),            # odd sizes below: (1, 1) SAME pads, crops
    ({"use_spade": False, "input_i0": True}, (40, 24)),
    ({"use_pe": False, "use_spade": False}, (32, 32)),
    ({"spade_time": "gain"}, (40, 24)),
])
def test_velocity_network_matches_flax(model_kw, hw):
  mcfg = ModelConfig(**model_kw)
  h, w = hw
  params = _perturbed(init_params(mcfg, jax.random.PRNGKey(2), hw), jax.random.PRNGKey(3))
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(3, h, w, 1)).astype(np.float32)
  m0 = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=(h, w))]
  t = np.array([0.0, 0.35, 0.9], np.float32)
  want = np.asarray(VelocityUNet(mcfg).apply({"params": params}, images, m0, t, images[0]))
  model = peer.params_from_flax(peer.TorchVelocityUNet(mcfg), params)
  nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
  with torch.no_grad():
    got = model(nchw(images), nchw(m0[None])[0], torch.from_numpy(t), nchw(images[:1])[0])
  got = got.permute(0, 2, 3, 1).numpy()
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
  # The round trip to the flax layout is exact.
  back = _leaves(peer.to_flax(model))
  for k, v in _leaves(params).items():
    np.testing.assert_array_equal(back[k], v)


def test_batched_loss_and_gradients_match_jax(case):
  assert case["terms"]["jdet"] > 0 and case["terms"]["seg"] > 0  # non-trivial terms
  fitter = peer.TorchFit([case["seq"]], case["cfg"], jax_params=case["params"])
  terms, _ = fitter.loss_terms(0)
  _assert_terms_close({k: v.item() for k, v in terms.items()}, case["terms"])
  loss = peer.total_loss(terms, case["cfg"])
  assert loss.item() == pytest.approx(case["loss"], rel=1e-4)
  loss.backward()
  got = _leaves(peer.to_flax(fitter.models[0], grads=True))
  want = _leaves(case["grads"])
  assert set(got) == set(want)
  total = np.sqrt(sum(np.sum(g ** 2) for g in want.values()))
  for k, g in want.items():
    # Bias gradients of the decoder convs are ~0 (instance norm removes a bias):
    # compare them against the norm of the whole gradient.
    err = np.linalg.norm(got[k] - g)
    assert err <= 1e-3 * np.linalg.norm(g) + 1e-6 * total, (k, err, np.linalg.norm(g))


def test_adam_step_matches_optax(case):
  """One step of fit's optimizer with the clip active; the cosine lr per step."""
  cfg = case["cfg"].replace(steps=3)
  assert cfg.clip_norm is not None and cfg.lr_decay == "cosine"
  assert optax.global_norm(case["grads"]) > cfg.clip_norm     # the clip is active
  params, opt = case["params"], fit._optimizer(cfg)
  fitter = peer.TorchFit([case["seq"], case["seq"]], cfg, jax_params=params)
  # PyTorch's own gradient at the start, as step() computes it.
  peer.total_loss(fitter.loss_terms(0)[0], cfg).backward()
  g_torch = _leaves(peer.to_flax(fitter.models[0], grads=True))
  fitter.models[0].zero_grad(set_to_none=True)
  l0 = fitter.step()
  assert l0 == pytest.approx([case["loss"]] * 2, rel=1e-4)
  # The update itself: optax's chain on the same gradient gives the same parameters.
  g = jax.tree_util.tree_map_with_path(
      lambda path, _: jnp.asarray(g_torch["/".join(k.key for k in path)]), params)
  updates, _ = opt.update(g, opt.init(params), params)
  want = _leaves(optax.apply_updates(params, updates))
  for model in fitter.models:
    got = _leaves(peer.to_flax(model))
    for k, v in want.items():
      np.testing.assert_allclose(got[k], v, rtol=0, atol=1e-6, err_msg=k)
  # End to end, each side with its own gradient. Adam's first update is about
  # lr * sign(g) for every weight, so weights whose gradient is near 0 move by
  # +-lr on float rounding alone: two JAX programs that differ only in summation
  # order (ModelConfig.subpixel_up) differ by 1.4e-3 here; a 10% larger
  # learning rate moves the loss by 1.4e-2.
  jax_updates, _ = opt.update(case["grads"], opt.init(params), params)
  (loss1, _), _ = case["value_and_grad"](optax.apply_updates(params, jax_updates))
  assert fitter.step() == pytest.approx([float(loss1)] * 2, rel=2.5e-3)
  schedule = optax.cosine_decay_schedule(cfg.lr, cfg.steps, alpha=cfg.lr_final)
  for i in range(5):
    assert fitter.lr(i) == pytest.approx(float(schedule(i)), rel=1e-6)


def test_odeint_loss_matches_jax_inloop(case):
  pytest.importorskip("torchdiffeq")
  _, want = jax.jit(lambda p: losses.loss_fn(p, case["jseq"], case["cfg"], case["apply_fn"],
                                             formulation="inloop"))(case["params"])
  fitter = peer.TorchFit([case["seq"]], case["cfg"], jax_params=case["params"],
                         formulation="odeint")
  _assert_terms_close(_torch_terms(fitter), {k: float(v) for k, v in want.items()})


def test_default_init_and_non_finite_guard():
  cfg = fit.FitConfig(lambda_ncc=0.0)
  s, _ = synthetic.make_sequence(0, size=16, num_frames=3)
  seq = fit.prepare_sequence(s.img, s.gt[0], s.gt[-1], cfg=cfg)
  fitter = peer.TorchFit([seq], cfg)             # fit_batch's keys: fold_in(seed, i)
  want = init_params(cfg.model, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0), (16, 16))
  got = _leaves(peer.to_flax(fitter.models[0]))
  for k, v in _leaves(want).items():
    np.testing.assert_array_equal(got[k], v)
  with torch.no_grad():
    fitter.models[0].flow.bias.fill_(float("nan"))
  before = [p.detach().clone() for p in fitter.models[0].parameters()]
  assert not np.isfinite(fitter.step()[0])
  assert fitter.failed == [True]
  for p, q in zip(fitter.models[0].parameters(), before):
    assert torch.equal(p.detach(), q) or torch.isnan(q).all()
