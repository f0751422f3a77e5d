"""FitConfig.ensemble: K fits from K initialisations, phi the flow of their mean velocity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_ode_jax import fit, losses
from echo_ode_jax.data import synthetic
from echo_ode_jax.model import ModelConfig

TINY = ModelConfig(enc_channels=(8, 8), dec_channels=(8, 8, 8), pe_dim=8, spade_hidden=4)
CFG = fit.FitConfig(steps=3, coarse_steps=2, log_every=3, model=TINY)
SIZE = 16


@pytest.fixture(scope="module")
def seq():
  s = synthetic.make_sequence(2, size=SIZE, num_frames=4)[0]
  return jax.tree_util.tree_map(jnp.asarray, fit.prepare_sequence(s.img, s.gt[0], None, cfg=CFG))


def _params(cfg, key, seq):
  (state,), _, _ = fit._fit_levels(cfg, [key], [seq], False, False, "test")
  if cfg.ensemble > 1:
    return jax.vmap(lambda st: fit.final_params(cfg, st))(state)
  return fit.final_params(cfg, state)


def test_members_are_the_single_fits_from_their_keys(seq):
  """Member 0 is the fit from the key itself, member 1 the fit from
  fold_in(key, 1), each fitted alone (its own clipping, Adam and best step);
  on a pyramid every level's network follows its member. (The vmapped and
  single programs round differently; 1e-4 is a hundredth of an Adam step,
  far below what a wrong key or member order would give.)"""
  cfg = CFG.replace(pyramid_levels=2)
  key = jax.random.PRNGKey(4)
  members = _params(cfg.replace(ensemble=2), key, seq)
  for m, k in enumerate((key, jax.random.fold_in(key, 1))):
    alone = _params(cfg, k, seq)
    got = jax.tree_util.tree_map(lambda x: x[m], members)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(alone)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
  leaves = jax.tree_util.tree_leaves(members)
  assert any(not np.allclose(x[0], x[1]) for x in leaves)   # different initialisations


def _translation_state(cfg, biases, failed):
  """An ensemble state whose member m's velocity is the constant biases[m]
  (the zero-initialised last layer's bias), marked failed[m]."""
  keys = jnp.stack([jax.random.PRNGKey(m) for m in range(len(biases))])
  state = jax.vmap(lambda k: fit.level_state(cfg, 0, k, (SIZE, SIZE)))(keys)
  params = dict(state.best_params)
  params["flow"] = dict(params["flow"], bias=jnp.asarray(biases, jnp.float32))
  return state._replace(params=params, best_params=params,
                        best_loss=jnp.zeros(len(biases), jnp.float32),
                        failed=jnp.asarray(failed), fail_step=jnp.where(
                            jnp.asarray(failed), 2, -1).astype(jnp.int32))


@pytest.mark.parametrize("failed,want", [
    ((False, False, False), (1.0, -1.0)),        # the mean of the three
    ((False, True, False), (1.5, -0.25)),       # member 1 left out
    ((True, True, True), (1.0, -1.0)),          # all failed: all of them
])
def test_phi_is_the_flow_of_the_mean_velocity(seq, failed, want):
  """Constant velocities c_m (pixels per unit time) give phi_t(x) = x + t * mean(c_m)
  over the members that did not fail; a translation has R_smt = R_Jdet = 0."""
  cfg = CFG.replace(ensemble=3)
  biases = [(2.0, -0.5), (0.0, -2.5), (1.0, 0.0)]
  state = _translation_state(cfg, biases, failed)
  phi, masks, fold, terms = fit._final_fn(cfg, False)(state, seq)
  grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij"), -1)
  times = np.asarray(seq["frame_times"])
  valid = np.asarray(seq["frame_valid"]) > 0
  expect = grid[None] + times[:, None, None, None] * np.asarray(want)
  np.testing.assert_allclose(np.asarray(phi)[valid], expect[valid], atol=1e-4)
  assert float(terms["smt"]) == pytest.approx(0.0, abs=1e-8)
  assert float(terms["jdet"]) == 0.0 and float(np.max(fold)) == 0.0
  np.testing.assert_allclose(float(terms["loss"]), float(losses.total_loss(terms, cfg)), rtol=1e-6)

  # A failed member logs a non-finite loss from its failure on; the history
  # averages the others (all members when every one failed).
  hist = np.where(np.asarray(failed), np.nan, [1.0, 2.0, 4.0]) * np.ones((5, 1))
  res = fit._result(*jax.device_get((phi, masks, fold)), jax.device_get(seq),
                    {"loss": hist}, np.asarray(failed), np.asarray(state.fail_step),
                    1.0, True, 0, jax.device_get(terms))
  assert res.failed == all(failed)
  assert res.history["loss"].shape == (5,)
  if all(failed):
    assert np.isnan(res.history["loss"]).all()
  else:
    np.testing.assert_allclose(res.history["loss"], 2.5 if any(failed) else 7 / 3)
  if any(failed):
    assert res.reason.startswith(f"{sum(failed)} of 3 ensemble members")
  else:
    assert res.reason == ""


def test_fit_batch_ensemble_agrees_across_modes_and_with_fit_sequence():
  seqs = [fit.prepare_sequence(s.img, s.gt[0], None, cfg=CFG)
          for s in (synthetic.make_sequence(i, size=SIZE, num_frames=4)[0] for i in (0, 1))]
  cfg = CFG.replace(ensemble=2)
  keys = [jax.random.PRNGKey(9), jax.random.PRNGKey(10)]
  loop = fit.fit_batch(seqs, cfg, keys=keys)
  vmap = fit.fit_batch(seqs, cfg, keys=keys, batch_mode="vmap",
                       mesh=fit.batch_mesh(jax.devices()[:2]))   # sharded members
  for s, k, a, b in zip(seqs, keys, loop, vmap):
    alone = fit.fit_sequence(s, cfg, key=k)
    for r in (b, alone):
      np.testing.assert_allclose(r.phi, a.phi, atol=1e-4)
      assert r.final["loss"] == pytest.approx(a.final["loss"], rel=1e-4)
    assert a.phi.shape == (4, SIZE, SIZE, 2) and a.masks.shape == (4, SIZE, SIZE)
    assert a.history["loss"].shape == (CFG.steps,) and not a.failed and a.best_step == -1
    assert set(a.final) == set(losses.TERMS) | {"loss"}


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_ensemble_must_be_a_positive_integer(bad):
  with pytest.raises(ValueError, match="FitConfig.ensemble must be an integer >= 1"):
    fit.FitConfig(ensemble=bad)
