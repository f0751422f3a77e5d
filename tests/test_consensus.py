"""Consensus propagation (FitConfig.propagation="consensus"): every frame's
segmentation carried to ED through the inverse maps, averaged, carried back."""
import h5py
import numpy as np
import pytest

from echo_ode_jax import fit, runner
from echo_ode_jax.data import hdf5, synthetic
from echo_ode_jax.errors import InputError

from test_fit import TINY_CFG


def _grid(h, w):
  return np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).astype(np.float32)


def _disk(h, w, centre, radius):
  x = _grid(h, w)
  return (np.hypot(*(x - np.asarray(centre)).transpose(2, 0, 1)) < radius).astype(np.int32)


def test_identity_maps_give_the_per_pixel_majority_vote():
  """phi_t = id: the fused mask is the majority label of the T masks at each
  pixel (no ties by construction), the same on every frame."""
  rng = np.random.default_rng(0)
  h = w = 24
  base = rng.integers(0, 4, (h, w))
  masks = np.repeat(base[None], 5, 0)
  # Two of five frames relabel random pixels: never a majority.
  for k in (1, 3):
    flip = rng.random((h, w)) < 0.3
    masks[k][flip] = (base[flip] + k) % 4
  phi = np.repeat(_grid(h, w)[None], 5, 0)
  out = fit.consensus_labels(phi, masks)
  np.testing.assert_array_equal(out, np.repeat(base[None], 5, 0))


def test_a_moving_disk_with_a_spurious_frame_is_recovered_on_every_frame():
  """phi_t = translation by t d and masks_k = the disk moved with it, except that
  frame 2's mask is a disk elsewhere: the fused labels are the analytic moving
  disk on every frame (one perimeter of interpolation ties at most)."""
  h = w = 48
  d = np.array([6.0, -4.0], np.float32)
  ts = np.linspace(0, 1, 5)
  phi = np.stack([_grid(h, w) + t * d for t in ts])
  # m_t = m_0 o phi_t: the disk centred at c - t d.
  masks = np.stack([_disk(h, w, (22 - 6 * t, 24 + 4 * t), 9) for t in ts])
  masks[2] = _disk(h, w, (10, 10), 6)
  out = fit.consensus_labels(phi, masks)
  for k, t in enumerate(ts):
    want = _disk(h, w, (22 - 6 * t, 24 + 4 * t), 9)
    assert np.sum(out[k] != want) <= 2 * np.pi * 9, (k, np.sum(out[k] != want))
  with pytest.raises(ValueError, match="masks"):
    fit.consensus_labels(phi, masks[:-1])


def test_fit_grid_maps_are_resampled_to_the_masks_grid():
  phi = np.repeat(_grid(16, 16)[None], 3, 0)
  masks = np.stack([_disk(32, 32, (16, 16), r) for r in (9, 10, 11)])
  out = fit.consensus_labels(phi, masks)
  assert out.shape == (3, 32, 32)
  np.testing.assert_array_equal(out[1], masks[1])   # the median disk of three nested ones


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Two synthetic sequences and a 'segmentation' file holding their gt masks."""
  d = tmp_path_factory.mktemp("consensus")
  data, seg = str(d / "data.h5"), str(d / "seg.h5")
  with h5py.File(data, "w") as f, h5py.File(seg, "w") as g:
    hdf5.set_root_attrs(f, 32)
    g.attrs["format_version"] = hdf5.FORMAT_VERSION
    for i, n in enumerate((6, 5)):
      s = synthetic.make_sequence(i, size=32, num_frames=n)[0]
      hdf5.write_sequence(f, s)
      g.require_group(s.key).create_dataset("pred", data=s.gt.astype(np.uint8))
  return data, seg


def test_runner_consensus_fuses_the_segmentation_and_needs_one(files, tmp_path):
  data, seg = files
  cfg = TINY_CFG.replace(propagation="consensus")
  with pytest.raises(InputError, match="consensus.*segmenter"):
    runner.fit_file(data, str(tmp_path / "x.h5"), cfg, init="gt", guide="gt")
  out = str(tmp_path / "c.h5")
  runner.fit_file(data, out, cfg, init="segmenter", guide="none", segmentation=seg,
                  size=24, save_flow=True)
  with h5py.File(out, "r") as f:
    for key in hdf5.list_keys(data):
      flow, pred = f[key]["flow"][:], f[key]["pred"][:]
      gt = hdf5.read_sequence(data, key).gt[:len(flow)]
      assert flow.shape[1:3] == (24, 24) and pred.shape == gt.shape
      np.testing.assert_array_equal(pred, fit.consensus_labels(flow, gt))
