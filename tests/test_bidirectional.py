"""Bidirectional propagation (FitConfig.propagation): map inversion, fusion, runner."""
import h5py
import numpy as np
import pytest

from echo_ode_jax import fit, flow, runner
from echo_ode_jax.data import hdf5, synthetic
from echo_ode_jax.errors import InputError

from test_fit import TINY_CFG


def _grid(h, w):
  return np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).astype(np.float32)


def test_invert_map_of_an_affine_map_is_the_inverse_matrix():
  h = w = 40
  x = _grid(h, w)
  c, d = np.array([19.5, 19.5]), np.array([1.5, -2.0])
  m = np.array([[1.25, 0.1], [-0.05, 0.8]])
  phi = (c + (x - c) @ m.T + d).astype(np.float32)
  psi = np.asarray(flow.invert_map(phi))
  want = c + (x - c - d) @ np.linalg.inv(m).T
  inner = np.all((phi > 1) & (phi < h - 2), -1) & np.all((want > 2) & (want < h - 3), -1)
  np.testing.assert_allclose(psi[inner], want[inner], atol=1e-3)


def test_invert_map_of_a_smooth_warp_composes_to_the_identity():
  h = w = 48
  x = _grid(h, w)
  u = np.stack([3 * np.sin(x[..., 1] / 7.0), 2.5 * np.cos(x[..., 0] / 9.0)], -1)
  phi = (x + u).astype(np.float32)
  psi = flow.invert_map(phi)
  back = np.asarray(flow.compose_maps(phi, psi))        # phi(psi(p))
  inner = (slice(5, -5), slice(5, -5))
  np.testing.assert_allclose(back[inner], x[inner], atol=5e-3)


def _disk(h, w, centre, radius):
  x = _grid(h, w)
  return (np.hypot(*(x - centre).transpose(2, 0, 1)) < radius).astype(np.int32)


def test_identity_maps_switch_from_m0_to_m_es_at_mid_time():
  h = w = 32
  m0, m_es = _disk(h, w, (12, 16), 7), 2 * _disk(h, w, (20, 16), 6)
  phi = np.repeat(_grid(h, w)[None], 5, 0)              # t = 0, .25, .5, .75, 1
  out = fit.propagate_labels(phi, m0, m_es)
  np.testing.assert_array_equal(out[0], m0)
  np.testing.assert_array_equal(out[1], m0)
  np.testing.assert_array_equal(out[3], m_es)
  np.testing.assert_array_equal(out[4], m_es)
  np.testing.assert_array_equal(fit.propagate_labels(phi, m0), np.repeat(m0[None], 5, 0))


def test_a_consistent_es_mask_gives_the_forward_propagation():
  """phi_t = translation by t d; m_es = m0 o phi_1: both directions agree, so the
  fused labels equal m0 o phi_t (the analytic disk shifted by -t d)."""
  h = w = 40
  d = np.array([6.0, -4.0], np.float32)
  phi = np.stack([_grid(h, w) + t * d for t in np.linspace(0, 1, 5)])
  m0 = _disk(h, w, (18, 20), 8)
  m_es = _disk(h, w, (18 - 6, 20 + 4), 8)
  out = fit.propagate_labels(phi, m0, m_es)
  fwd = fit.propagate_labels(phi, m0)
  for k, t in enumerate(np.linspace(0, 1, 5)):
    assert np.sum(out[k] != fwd[k]) <= 2, k
    # Bilinear warping of a hard disk loses its ties at half-pixel shifts: one
    # perimeter's worth of pixels at most.
    want = _disk(h, w, (18 - 6 * t, 20 + 4 * t), 8)
    assert np.sum(out[k] != want) <= 2 * np.pi * 8, (k, np.sum(out[k] != want))


def test_the_fit_grid_maps_are_resampled_to_the_masks_grid():
  h = w = 20
  phi = np.repeat(_grid(h, w)[None], 3, 0)
  m0, m_es = _disk(40, 40, (20, 20), 9), _disk(40, 40, (20, 20), 6)
  out = fit.propagate_labels(phi, m0, m_es)
  assert out.shape == (3, 40, 40)
  np.testing.assert_array_equal(out[-1], m_es)
  with pytest.raises(ValueError, match="m_es"):
    fit.propagate_labels(phi, m0, m_es[:-1])


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("bidir") / "data.h5"
  with h5py.File(path, "w") as f:
    hdf5.set_root_attrs(f, 32)
    for i, n in enumerate((6, 5)):
      hdf5.write_sequence(f, synthetic.make_sequence(i, size=32, num_frames=n)[0])
  return str(path)


def test_runner_bidirectional_ends_on_the_es_guide_and_needs_one(data_file, tmp_path):
  cfg = TINY_CFG.replace(propagation="bidirectional")
  with pytest.raises(InputError, match="bidirectional.*guide"):
    runner.fit_file(data_file, str(tmp_path / "none.h5"), cfg, guide="none")
  with pytest.raises(ValueError, match="propagation"):
    TINY_CFG.replace(propagation="both")
  out = str(tmp_path / "bi.h5")
  runner.fit_file(data_file, out, cfg, guide="gt", size=24)
  fwd = str(tmp_path / "fwd.h5")
  runner.fit_file(data_file, fwd, TINY_CFG, guide="gt", size=24)
  with h5py.File(out, "r") as f, h5py.File(fwd, "r") as g:
    for key in hdf5.list_keys(data_file):
      gt = hdf5.read_sequence(data_file, key).gt
      pred, pred_fwd = f[key]["pred"][:], g[key]["pred"][:]
      np.testing.assert_array_equal(pred[0], gt[0])
      # The ES frame is the ES guide itself (up to the map inversion's interpolation).
      assert np.mean(pred[-1] != gt[len(pred) - 1]) < 0.01
      assert np.mean(pred_fwd[-1] != gt[len(pred) - 1]) > np.mean(pred[-1] != gt[len(pred) - 1])
