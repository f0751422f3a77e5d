"""Semi-synthetic sequences from real ED/ES pairs: the map, the warped frames, the files."""
import dataclasses

import numpy as np
import pytest
from scipy import integrate, ndimage

import camus_fakes as fakes
from conftest import camus_dir
from echo_ode_jax.data import convert, hdf5, semisynthetic as ss, synthetic
from echo_ode_jax.metrics import jacobian_determinant_np

SIZE = 48
CFG = ss.MapConfig(steps=80)          # few steps: fast, still a good fit at 48^2
QUIET = ss.NoiseConfig(speckle=0.0, noise=0.0)


def _pair(seed=3, size=SIZE, ef=0.5):
  """A two-frame (ED, ES) Sequence from the analytic generator (known sector, shapes)."""
  seq, _ = synthetic.make_sequence(seed, size=size, num_frames=9, ef=ef)
  return dataclasses.replace(seq, img=seq.img[[0, -1]], gt=seq.gt[[0, -1]])


def _onehot_pullback(labels, phi):
  """Independent reference: argmax of scipy's bilinear (mode nearest) one-hot samples."""
  coords = np.moveaxis(np.asarray(phi, np.float64), -1, 0)
  prob = np.stack([ndimage.map_coordinates((labels == c).astype(np.float64), coords,
                                           order=1, mode="nearest") for c in range(4)])
  return prob.argmax(0), np.sort(prob, 0)[-1] - np.sort(prob, 0)[-2]


def _dice(a, b):
  return 2.0 * np.sum(a & b) / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def made():
  pair = _pair()
  seq, phi, rep = ss.semisynthetic_sequence(pair, seed=1, num_frames=7, map_cfg=CFG,
                                            noise_cfg=QUIET)
  noisy, phi_n, _ = ss.semisynthetic_sequence(pair, seed=1, num_frames=7, map_cfg=CFG)
  return pair, seq, phi, rep, noisy, phi_n


def test_frames_are_ed_pulled_back_by_flow_true(made):
  pair, seq, phi, _, _, _ = made
  assert seq.img.shape == (7, SIZE, SIZE) and seq.gt.shape == (7, SIZE, SIZE)
  assert phi.shape == (7, SIZE, SIZE, 2) and phi.dtype == np.float32
  inside = synthetic.sector_mask(SIZE) > 0.999          # the analytic field of view
  coords_all = np.moveaxis(phi.astype(np.float64), -1, 1)
  for t in range(7):
    ref, margin = _onehot_pullback(pair.gt[0], phi[t])
    clear = margin > 1e-3                                # not a tie between two labels
    np.testing.assert_array_equal(seq.gt[t][clear], ref[clear])
    ref_img = ndimage.map_coordinates(pair.img[0].astype(np.float64), coords_all[t],
                                      order=1, mode="nearest")
    # Where phi(p) samples only pixels of the fan (all 4 bilinear corners inside it).
    r0 = np.clip(np.floor(phi[t][..., 0]).astype(int), 0, SIZE - 2)
    c0 = np.clip(np.floor(phi[t][..., 1]).astype(int), 0, SIZE - 2)
    corners = inside[r0, c0] & inside[r0 + 1, c0] & inside[r0, c0 + 1] & inside[r0 + 1, c0 + 1]
    ok = inside & corners
    assert ok.sum() > 0.5 * inside.sum()
    np.testing.assert_allclose(seq.img[t][ok], ref_img[ok], atol=1e-5)
  assert np.all(seq.img[:, synthetic.sector_mask(SIZE) == 0] == 0)   # outside the fan: 0


def test_sector_edge_is_not_pulled_inside():
  """A map that samples beyond the fan's edge gives the nearest fan values, not black."""
  img = np.zeros((SIZE, SIZE), np.float32)
  img[:, :30] = 0.6                      # the "fan": columns 0..29, 0.6 everywhere
  ed = np.zeros((SIZE, SIZE), np.uint8)
  ed[10:30, 12:27] = 1
  es = np.zeros((SIZE, SIZE), np.uint8)
  es[10:30, 4:19] = 1                    # moved left: the map samples to the right
  pair = hdf5.Sequence("p", "4CH", np.stack([img, img]), np.stack([ed, es]),
                       {"voxelspacing": np.array([1.0, 1.0])})
  seq, phi, _ = ss.semisynthetic_sequence(pair, num_frames=3, map_cfg=CFG, noise_cfg=QUIET)
  fan = np.zeros((SIZE, SIZE), bool)
  fan[:, :30] = True
  assert phi[-1][fan][:, 1].max() > 30.5        # some fan pixels sample beyond its edge
  np.testing.assert_allclose(seq.img[:, fan], 0.6, atol=1e-6)
  assert np.all(seq.img[:, ~fan] == 0)


def test_noise_is_fresh_per_frame_and_keeps_the_sector(made):
  pair, seq, _, _, noisy, phi_n = made
  np.testing.assert_array_equal(noisy.gt, seq.gt)        # noise leaves the masks alone
  np.testing.assert_allclose(phi_n, made[2])
  assert np.all(noisy.img[:, synthetic.sector_mask(SIZE) == 0] == 0)
  inside = synthetic.sector_mask(SIZE) > 0.999
  res = noisy.img - seq.img
  assert np.all((noisy.img >= 0) & (noisy.img <= 1))
  assert 0.01 < res[:, inside].std() < 0.2
  # Different draws on different frames: residuals of two frames barely correlate.
  r = np.corrcoef(res[1][inside], res[2][inside])[0, 1]
  assert abs(r) < 0.3


def test_map_is_a_diffeomorphism_starting_at_identity(made):
  pair, seq, phi, rep, _, _ = made
  ident = np.stack(np.indices((SIZE, SIZE)), -1).astype(np.float32)
  np.testing.assert_array_equal(phi[0], ident)
  np.testing.assert_array_equal(seq.gt[0], pair.gt[0])
  np.testing.assert_allclose(seq.img[0][pair.img[0] > 0], pair.img[0][pair.img[0] > 0], atol=1e-6)
  assert jacobian_determinant_np(phi).min() > 0.05
  s = np.asarray(seq.attrs["time_s"])
  assert s[0] == 0 and s[-1] == pytest.approx(1.0) and np.all(np.diff(s) > 0)
  assert seq.attrs["ed_index"] == 0 and seq.attrs["es_index"] == 6
  assert (seq.attrs["ed"], seq.attrs["es"], seq.attrs["nbframe"]) == (1, 7, 7)


def test_phi_is_the_flow_of_v_at_time_s():
  """exp(s v) by scaling and squaring against scipy's ODE solver on x' = v(x)."""
  pair = _pair()
  fitted = ss.fit_map(pair.gt[0], pair.gt[1], CFG)
  v = fitted.v.astype(np.float64)
  s = np.array([0.3, 0.7, 1.0])
  phi = fitted.phi(s)
  rng = np.random.default_rng(0)
  pts = rng.uniform(8, SIZE - 9, (12, 2))

  def rhs(_, x):
    c = x.reshape(-1, 2).T
    return np.stack([ndimage.map_coordinates(v[..., k], c, order=1, mode="nearest")
                     for k in range(2)], -1).ravel()

  sol = integrate.solve_ivp(rhs, (0, 1), pts.ravel(), t_eval=s, rtol=1e-8, atol=1e-8)
  assert np.abs(v).max() > 1.0                            # it does move
  for i in range(len(s)):
    ref = sol.y[:, i].reshape(-1, 2)
    got = np.stack([ndimage.map_coordinates(phi[i][..., k].astype(np.float64), pts.T, order=1)
                    for k in range(2)], -1)
    np.testing.assert_allclose(got, ref, atol=0.1)


def test_disk_pair_es_mask_reaches_the_true_es_disk():
  r, c = np.indices((SIZE, SIZE))
  d = np.hypot(r - 24, c - 24)
  ed = np.where(d < 14, 1, np.where(d < 18, 2, 0)).astype(np.uint8)
  es = np.where(d < 10, 1, np.where(d < 15, 2, 0)).astype(np.uint8)
  fitted = ss.fit_map(ed, es, CFG)
  phi = fitted.phi(1.0)
  got, _ = _onehot_pullback(ed, phi)
  assert _dice(got == 1, es == 1) > 0.93
  assert _dice(got > 0, es > 0) > 0.95
  assert jacobian_determinant_np(phi).min() > 0


def test_es_mask_matches_the_es_of_the_analytic_pair(made):
  pair, seq, _, rep, _, _ = made
  es, real = seq.gt[-1], pair.gt[1]
  assert _dice(es == 1, real == 1) > 0.9
  assert _dice(np.isin(es, (1, 2)), np.isin(real, (1, 2))) > 0.9
  assert rep["dice_endo"] == pytest.approx(_dice(es == 1, real == 1))
  assert seq.attrs["es_dice_epi"] == pytest.approx(_dice(np.isin(es, (1, 2)),
                                                         np.isin(real, (1, 2))))
  ef = 1 - np.sum(es == 1) / np.sum(pair.gt[0] == 1)
  assert seq.attrs["ef_true"] == pytest.approx(ef)


def test_nifti_round_trips_through_the_converter(made, tmp_path):
  _, _, _, _, noisy, _ = made
  noisy = dataclasses.replace(noisy, patient="patient0007")
  ss.write_camus_view(tmp_path / "db", noisy)
  out = tmp_path / "conv.h5"
  convert.convert_camus(tmp_path / "db", out, size=SIZE)
  back = hdf5.read_sequence(out, "patient0007/4CH")
  np.testing.assert_allclose(back.img, noisy.img, atol=0.5 / 255 + 1e-6)
  np.testing.assert_array_equal(back.gt, noisy.gt)
  assert back.attrs["ed_index"] == 0 and back.attrs["es_index"] == noisy.num_frames - 1
  assert back.attrs["ed"] == 1 and back.attrs["es"] == noisy.num_frames
  assert back.attrs["source_kind"] == "half_sequence"
  np.testing.assert_allclose(back.attrs["voxelspacing"], noisy.attrs["voxelspacing"], rtol=1e-5)


def test_make_dataset_on_fake_camus(tmp_path):
  db = tmp_path / "db"
  for i, pid in enumerate(("patient0001", "patient0002", "patient0003")):
    fakes.patient_edes(db, pid, seed=i, h=SIZE, w=40)
  (tmp_path / "splits.json").write_text('{"train": ["patient0001"], '
                                        '"valid": ["patient0002", "patient0003"]}')
  out = tmp_path / "semi.h5"
  rows = ss.make_dataset(db, out, size=SIZE, seed=0, splits=tmp_path / "splits.json",
                         split="valid", nifti_out=tmp_path / "nii", map_cfg=CFG,
                         progress=False)
  assert [r["patient"] for r in rows] == ["patient0002", "patient0003"]
  assert hdf5.list_keys(out) == ["patient0002/4CH", "patient0003/4CH"]
  for r in rows:
    key = f"{r['patient']}/4CH"
    seq = hdf5.read_sequence(out, key)
    flow = hdf5.read_dataset(out, key, "flow_true")
    lo, hi = synthetic.DEFAULT_FRAMES
    assert lo <= seq.num_frames <= hi and flow.shape == (seq.num_frames, SIZE, SIZE, 2)
    assert not np.any(seq.gt == hdf5.UNANNOTATED)
    src = convert.to_sequence(ss.camus.read_view(db / r["patient"], "4CH"), SIZE)
    np.testing.assert_array_equal(seq.gt[0], src.gt[0])
    assert seq.attrs["es_dice_endo"] == pytest.approx(_dice(seq.gt[-1] == 1, src.gt[1] == 1))
    assert (tmp_path / "nii" / r["patient"] / "Info_4CH.cfg").is_file()
  text = ss.report_csv_path(out).read_text().splitlines()
  assert text[0].startswith("patient,view,frames,dice_endo") and len(text) == 3
  # The same seed gives the same sequence; the selection does not change it.
  rows2 = ss.make_dataset(db, tmp_path / "one.h5", size=SIZE, seed=0, patients=["3"],
                          map_cfg=CFG, progress=False)
  a = hdf5.read_sequence(out, "patient0003/4CH")
  b = hdf5.read_sequence(tmp_path / "one.h5", "patient0003/4CH")
  np.testing.assert_array_equal(a.img, b.img)
  assert rows2[0]["frames"] == a.num_frames


# ---------------------------------------------------------------------------
# Real data (the shared CAMUS copy)
# ---------------------------------------------------------------------------

CAMUS = camus_dir()


@pytest.mark.camus
@pytest.mark.skipif(not CAMUS.is_dir(), reason=f"CAMUS data not found at {CAMUS} "
                    "(set ECHO_ODE_CAMUS_DIR)")
def test_real_camus_es_mask_matches_real_es():
  folders = ss.camus.find_patients(CAMUS)[:2]
  for d in folders:
    src = convert.to_sequence(ss.camus.read_view(d, "4CH"), 64)
    seq, phi, _ = ss.semisynthetic_sequence(src, seed=0, num_frames=12)
    real = src.gt[-1]
    assert _dice(seq.gt[-1] == 1, real == 1) > 0.90, d.name
    assert _dice(np.isin(seq.gt[-1], (1, 2)), np.isin(real, (1, 2))) > 0.93, d.name
    assert jacobian_determinant_np(phi).min() > 0, d.name
    np.testing.assert_array_equal(seq.gt[0], src.gt[0])
