"""FitConfig.ensemble: K fits from K initialisations, phi the flow of their mean velocity,
masks from it or fused from the members' labels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

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
  phi, masks, fold, terms, _ = fit._final_fn(cfg, False)(state, seq)
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


@pytest.mark.parametrize("fusion,n", [("velocity", 2), ("labels", 3)])
def test_fit_batch_ensemble_agrees_across_modes_and_with_fit_sequence(fusion, n):
  """Loop and vmap modes and fit_sequence give the same ensemble; vmap mode
  splits the batch over 2 devices (3 sequences: shares of 2, the second
  padded)."""
  seqs = [fit.prepare_sequence(s.img, s.gt[0], None, cfg=CFG)
          for s in (synthetic.make_sequence(i, size=SIZE, num_frames=4)[0] for i in range(n))]
  cfg = CFG.replace(ensemble=2, ensemble_fusion=fusion)
  keys = [jax.random.PRNGKey(9 + i) for i in range(n)]
  loop = fit.fit_batch(seqs, cfg, keys=keys)
  vmap = fit.fit_batch(seqs, cfg, keys=keys, batch_mode="vmap",
                       mesh=fit.batch_mesh(jax.devices()[:2]))
  assert len(vmap) == n
  for i, (s, k, a, b) in enumerate(zip(seqs, keys, loop, vmap)):
    for r in (b, fit.fit_sequence(s, cfg, key=k)) if i == 0 else (b,):
      np.testing.assert_allclose(r.phi, a.phi, atol=1e-4)
      assert r.final["loss"] == pytest.approx(a.final["loss"], rel=1e-4)
      if fusion == "labels":
        np.testing.assert_allclose(r.member_phi, a.member_phi, atol=1e-4)
        assert np.mean(r.masks == a.masks) > 0.99
      else:
        assert r.member_phi is None
    assert a.phi.shape == (4, SIZE, SIZE, 2) and a.masks.shape == (4, SIZE, SIZE)
    assert a.history["loss"].shape == (CFG.steps,) and not a.failed and a.best_step == -1
    assert set(a.final) == set(losses.TERMS) | {"loss"}


def _square_m0(size):
  """Labels: an LV square inside a myocardium ring, background 3 pixels deep
  at the borders; (size, size) int."""
  m0 = np.zeros((size, size), np.int32)
  m0[4:size - 3, 3:size - 5] = 2
  m0[6:size - 5, 5:size - 7] = 1
  return m0


def _vote(m0, shifts, num_classes=fit.NUM_CLASSES):
  """(argmax over classes of the mean one-hot of m0(x + c) over integer shifts
  c, where that argmax is decisive: no tie between classes) (numpy)."""
  onehot = np.eye(num_classes)[m0]
  mean = np.mean([np.roll(onehot, (-c[0], -c[1]), axis=(0, 1)) for c in shifts], axis=0)
  top = np.sort(mean, axis=-1)
  return np.argmax(mean, axis=-1), top[..., -1] - top[..., -2] > 0.1


@pytest.mark.parametrize("failed", [(False, False, False), (False, True, False)])
def test_label_fusion_votes_the_members_labels(seq, failed):
  """ensemble_fusion "labels": with constant member velocities c_m (integer
  pixels at t = 1) the ES masks are the per-pixel vote of m_0(x + c_m) over
  the members kept, which differs from m_0 moved by the mean velocity; terms
  and folding are the members' means; the members' maps are returned."""
  cfg = CFG.replace(ensemble=3, ensemble_fusion="labels")
  biases = [(2.0, 0.0), (0.0, -2.0), (1.0, 1.0)]
  m0 = _square_m0(SIZE)
  s = dict(seq, m0=jnp.eye(fit.NUM_CLASSES)[m0])
  state = _translation_state(cfg, biases, failed)
  phi, masks, fold, terms, members = jax.device_get(fit._final_fn(cfg, False)(state, s))
  kept = [c for c, f in zip(biases, failed) if not f]
  last = int(seq["es_index"])
  assert float(np.asarray(seq["frame_times"])[last]) == 1.0
  want, decisive = _vote(m0, [tuple(int(v) for v in c) for c in kept])
  assert decisive.mean() > 0.7
  np.testing.assert_array_equal(masks[last][decisive], want[decisive])
  if len(kept) == 3:        # mean velocity (1, -1/3): m_0 moved by it votes otherwise
    assert np.any((want != _vote(m0, [(1, 0)])[0])[decisive])
  grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij"), -1)
  t = np.asarray(seq["frame_times"])[:, None, None, None]
  valid = np.asarray(seq["frame_valid"]) > 0
  for m, c in enumerate(biases):
    np.testing.assert_allclose(members[m][valid], (grid + t * np.asarray(c))[valid], atol=1e-4)
  want_terms = [losses.terms_from_phi(jnp.asarray(grid + t * np.asarray(c), jnp.float32), s, cfg)
                for c in kept]
  for k in losses.TERMS:
    assert float(terms[k]) == pytest.approx(np.mean([float(w[k]) for w in want_terms]),
                                            rel=1e-5, abs=1e-9)
  assert float(np.max(fold)) == 0.0
  res = fit._result(phi, masks, fold, jax.device_get(s), {"loss": np.zeros((5, 3))},
                    np.asarray(failed), np.asarray(state.fail_step), 1.0, True, 0, terms,
                    members)
  assert res.member_phi.shape == (len(kept), last + 1, SIZE, SIZE, 2)


def test_propagate_labels_fuses_member_maps():
  """Members' maps (K, T, h, w, 2) on m_0's own grid: the per-pixel vote of
  m_0 moved by each (scipy.ndimage.shift, exact for integer shifts); K copies of
  one map give that map's labels, in every propagation mode."""
  size, t = 20, 3
  m0 = _square_m0(size)
  grid = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij"), -1)
  shifts = [(2, 0), (0, -2), (1, 1)]
  phis = np.stack([np.stack([grid + k / (t - 1) * np.asarray(c) for k in range(t)])
                   for c in shifts]).astype(np.float32)
  got = fit.propagate_labels(phis, m0)
  onehot = np.eye(fit.NUM_CLASSES)[m0]
  moved = [ndimage.shift(onehot, (-c[0], -c[1], 0), order=0, mode="nearest") for c in shifts]
  want, decisive = _vote(m0, shifts)
  np.testing.assert_array_equal(np.argmax(np.mean(moved, 0), -1), want)   # the helper, by scipy
  np.testing.assert_array_equal(got[-1][decisive], want[decisive])
  np.testing.assert_array_equal(got[0], m0)
  masks = np.stack([m0] * t)
  for prop in fit.PROPAGATIONS:
    one = fit.labels_from_maps(prop, phis[0], m0, m0, masks)
    three = fit.labels_from_maps(prop, np.stack([phis[0]] * 3), m0, m0, masks)
    np.testing.assert_array_equal(three, one)
  with pytest.raises(ValueError, match="phi: expected"):
    fit.propagate_labels(phis[0, 0], m0)


def test_label_fusion_fit_masks_vote_the_member_maps():
  """An end-to-end labels-fused ensemble fit: the kept members' maps come
  back, and the fit-grid masks are the vote of m_0 warped bilinearly by each
  (scipy.ndimage.map_coordinates)."""
  cfg = CFG.replace(ensemble=2, ensemble_fusion="labels")
  s = synthetic.make_sequence(3, size=SIZE, num_frames=4)[0]
  prepared = fit.prepare_sequence(s.img, s.gt[0], None, cfg=cfg)
  res = fit.fit_sequence(prepared, cfg, key=jax.random.PRNGKey(1))
  assert res.member_phi.shape == (2,) + res.phi.shape and not res.failed
  onehot = np.eye(fit.NUM_CLASSES)[np.asarray(s.gt[0])]
  soft = np.mean([[np.stack([ndimage.map_coordinates(onehot[..., c], np.moveaxis(p, -1, 0),
                                                      order=1, mode="nearest")
                             for c in range(fit.NUM_CLASSES)], -1) for p in member]
                  for member in res.member_phi], axis=0)
  agree = np.mean(np.argmax(soft, -1) == res.masks)
  assert agree > 0.995, agree      # float ties at a few boundary pixels may break differently
  assert not np.allclose(res.member_phi[0], res.member_phi[1])


@pytest.mark.parametrize("bad", ["mean", "", None])
def test_ensemble_fusion_must_be_known(bad):
  with pytest.raises(ValueError, match="FitConfig.ensemble_fusion must be one of velocity, labels"):
    fit.FitConfig(ensemble_fusion=bad)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_ensemble_must_be_a_positive_integer(bad):
  with pytest.raises(ValueError, match="FitConfig.ensemble must be an integer >= 1"):
    fit.FitConfig(ensemble=bad)
