"""Resampling to the stored grid and back; CAMUS -> HDF5 conversion (layout, idempotency, errors)."""
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

import camus_fakes as fakes
from conftest import camus_dir
from echo_ode_jax.data import camus, hdf5
from echo_ode_jax.data.convert import convert_camus
from echo_ode_jax.data.resample import Resampling, from_source, resample_image, to_source
from echo_ode_jax.errors import InputError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------


def test_resampling_geometry_hand_computed():
  # 40 x 60 source pixels of 0.15 x 0.3 mm: 6 mm x 18 mm. At 32: 18/32 mm per pixel.
  res = Resampling.fit((40, 60), (0.15, 0.3), 32)
  assert res.spacing == pytest.approx(18 / 32)
  assert res.scale == pytest.approx((18 / 32 / 0.15, 18 / 32 / 0.3))
  assert res.content == (11, 32)            # round(6 / 0.5625 = 10.67)
  assert res.pad == (10, 0)
  # voxelspacing = source spacing x source extent / stored extent: exactly on the
  # longer axis, up to the rounding of the content to whole pixels on the other.
  assert res.spacing == pytest.approx(0.3 * 60 / 32)
  assert abs(0.15 * 40 / res.content[0] - res.spacing) <= 0.5 / res.content[0] * res.spacing * 1.01
  # Stored pixel j covers source pixels: centre of content pixel 0 is at source
  # row (0.5 * scale - 0.5): the content spans exactly the source extent.
  assert res.pad[0] * res.scale[0] + res.offset[0] == pytest.approx(0.5 * res.scale[0] - 0.5)


def test_resample_image_is_bilinear():
  """Bilinear interpolation is exact on a linear ramp: compare with the analytic values."""
  h, w, size = 30, 50, 40
  res = Resampling.fit((h, w), (0.2, 0.3), size)
  i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ramp = 0.01 * i + 0.003 * j
  out = resample_image(ramp, res)
  assert out.shape == (size, size)
  rr = np.arange(size) * res.scale[0] + res.offset[0]
  cc = np.arange(size) * res.scale[1] + res.offset[1]
  want = 0.01 * np.clip(rr, 0, h - 1)[:, None] + 0.003 * np.clip(cc, 0, w - 1)[None]
  sl = tuple(slice(p, p + c) for p, c in zip(res.pad, res.content))
  np.testing.assert_allclose(out[sl], want[sl], atol=1e-6)
  pad = np.ones((size, size), bool)
  pad[sl] = False
  assert np.all(out[pad] == 0)
  # Same with scipy on a random image (independent sampler).
  img = np.random.default_rng(0).random((h, w))
  rr_c, cc_c = np.meshgrid(rr[sl[0]], cc[sl[1]], indexing="ij")
  ref = ndimage.map_coordinates(img, [rr_c, cc_c], order=1, mode="nearest")
  np.testing.assert_allclose(resample_image(img, res)[sl], ref, atol=1e-6)


def _blocks(rng, shape, block):
  coarse = rng.integers(0, 4, size=(shape[0] // block + 1, shape[1] // block + 1))
  return np.kron(coarse, np.ones((block, block), np.uint8))[: shape[0], : shape[1]].astype(
      np.uint8)


@pytest.mark.parametrize("shape,spacing,size", [((20, 30), (0.3, 0.3), 64),    # upsampling
                                                ((25, 14), (0.15, 0.3), 48)])  # anisotropic
def test_round_trip_exact_when_stored_grid_is_finer(shape, spacing, size):
  res = Resampling.fit(shape, spacing, size)
  assert max(res.scale) <= 1.0
  m = np.random.default_rng(1).integers(0, 4, size=(3,) + shape).astype(np.uint8)
  back = to_source(from_source(m, res), res.attrs())
  assert back.shape == m.shape
  np.testing.assert_array_equal(back, m)


@pytest.mark.parametrize("shape,spacing,size", [((150, 210), (0.308, 0.308), 64),
                                                ((190, 100), (0.154, 0.308), 48)])
def test_round_trip_blocks_when_downsampling(shape, spacing, size):
  """scale > 1: pixels farther than ceil((scale + 1) / 2) from a label change come back."""
  res = Resampling.fit(shape, spacing, size)
  m = _blocks(np.random.default_rng(2), shape, 12)
  m[0, 0] = 255                        # 255 (not annotated) is just another value
  back = to_source(from_source(m, res), res.attrs())
  assert back.shape == m.shape and back.dtype == m.dtype
  r = [int(np.ceil((s + 1) / 2)) for s in res.scale]
  k = (2 * r[0] + 1, 2 * r[1] + 1)
  interior = (ndimage.maximum_filter(m, k, mode="nearest")
              == ndimage.minimum_filter(m, k, mode="nearest"))
  assert interior.mean() > 0.3
  np.testing.assert_array_equal(back[interior], m[interior])
  assert (back == m).mean() > 0.9


@pytest.mark.parametrize("shape,spacing,size", [((150, 210), (0.308, 0.308), 64),
                                                ((190, 100), (0.154, 0.308), 48)])
def test_stored_to_source_and_back_exact_when_downsampling(shape, spacing, size):
  """scale >= 1: any stored mask (0 in the padding) survives to_source -> from_source."""
  res = Resampling.fit(shape, spacing, size)
  assert min(res.scale) >= 1.0
  m = np.zeros((2, size, size), np.uint8)
  sl = (slice(None),) + tuple(slice(p, p + c) for p, c in zip(res.pad, res.content))
  m[sl] = np.random.default_rng(4).integers(0, 4, m[sl].shape)
  np.testing.assert_array_equal(from_source(to_source(m, res.attrs()), res.attrs()), m)


def test_identity_resampling():
  m = np.random.default_rng(3).integers(0, 4, (2, 16, 16)).astype(np.uint8)
  res = Resampling.identity((16, 16))
  np.testing.assert_array_equal(from_source(m, res), m)
  np.testing.assert_array_equal(to_source(m, res.attrs()), m)


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path):
  root = tmp_path / "database_nifti"
  fakes.patient_2023(root, "patient0001", h=36, w=48, frames=5, spacing=(0.2, 0.3))
  fakes.patient_2019(root, "patient0002", h=40, w=24, frames=8, ed=2, es=6)
  fakes.patient_edes(root, "patient0003")
  return root


def test_convert_layout(db, tmp_path):
  out = tmp_path / "camus.h5"
  rep = convert_camus(tmp_path, out, size=32)     # the parent holding database_nifti/
  assert rep.converted == ["patient0001/4CH", "patient0002/2CH", "patient0003/4CH"]
  assert sorted(rep.missing) == ["patient0001/2CH", "patient0002/4CH", "patient0003/2CH"]
  assert hdf5.list_keys(out) == rep.converted
  with h5py.File(out) as f:
    assert f.attrs["size"] == 32 and f.attrs["format_version"] == hdf5.FORMAT_VERSION
    g = f["patient0002/2CH"]
    assert g["img"].dtype == np.float32 and g["img"].shape == (5, 32, 32)
    assert g["gt"].dtype == np.uint8 and g["gt"].shape == (5, 32, 32)
  for key in rep.converted:
    seq = hdf5.read_sequence(out, key)
    src = camus.read_view(db / seq.patient, seq.view)
    a = seq.attrs
    assert 0.0 <= seq.img.min() and seq.img.max() <= 1.0
    assert a["ed_index"] == 0 and a["es_index"] == seq.num_frames - 1 == src.num_frames - 1
    np.testing.assert_array_equal(a["source_shape"], src.img.shape[1:])
    np.testing.assert_allclose(a["source_voxelspacing"], src.spacing)
    # Isotropic stored pixels: voxelspacing = source spacing x source extent / stored extent.
    extent = np.array(src.spacing) * np.array(src.img.shape[1:])
    np.testing.assert_allclose(a["voxelspacing"], [extent.max() / 32] * 2)
    np.testing.assert_allclose(extent / a["content_shape"], a["voxelspacing"],
                               rtol=0.5 / a["content_shape"].min() + 1e-9)
    # Labels: nearest neighbour, 255 kept on frames without masks.
    assert set(np.unique(seq.gt)) <= {0, 1, 2, 3, 255}
    back = to_source(seq.gt, a)
    assert back.shape == src.gt.shape
    for t in range(seq.num_frames):
      if src.gt[t, 0, 0] == 255:
        assert np.all(seq.gt[t] == 255)
        continue
      assert (back[t] == src.gt[t]).mean() > 0.85   # tiny images: boundaries are most pixels
      rows = lambda k: np.nonzero(seq.gt[t] == k)[0]
      assert rows(1).mean() < rows(3).mean()        # orientation kept: LV above LA
  a1 = hdf5.read_sequence(out, "patient0001/4CH").attrs
  assert a1["ed"] == 1 and a1["es"] == 5 and a1["sex"] == "F" and a1["framerate"] == 30
  assert a1["source_kind"] == "half_sequence"
  a2 = hdf5.read_sequence(out, "patient0002/2CH").attrs
  assert a2["ed"] == 2 and a2["es"] == 6 and a2["lvedv"] == pytest.approx(100.5)


def test_convert_image_matches_bilinear_resampling(db, tmp_path):
  out = tmp_path / "c.h5"
  convert_camus(db, out, size=32, patients=["3"])
  seq = hdf5.read_sequence(out, "patient0003/4CH")
  src = camus.read_view(db / "patient0003", "4CH")
  res = Resampling.from_attrs(seq.attrs)
  rr = np.arange(32) * res.scale[0] + res.offset[0]
  cc = np.arange(32) * res.scale[1] + res.offset[1]
  sl = tuple(slice(p, p + c) for p, c in zip(res.pad, res.content))
  r, c = np.meshgrid(rr[sl[0]], cc[sl[1]], indexing="ij")
  ref = ndimage.map_coordinates(src.img[1].astype(float) / 255, [r, c], order=1, mode="nearest")
  np.testing.assert_allclose(seq.img[1][sl], ref, atol=1e-5)


def test_convert_is_idempotent_and_adds_missing(db, tmp_path):
  out = tmp_path / "c.h5"
  rep = convert_camus(db, out, size=32, patients=["patient0001"])
  assert rep.converted == ["patient0001/4CH"]
  with h5py.File(out, "a") as f:
    f["patient0001/4CH"].attrs["marker"] = 42      # must survive the second run
  rep = convert_camus(db, out, size=32)
  assert rep.existing == ["patient0001/4CH"]
  assert rep.converted == ["patient0002/2CH", "patient0003/4CH"]
  assert hdf5.read_sequence(out, "patient0001/4CH").attrs["marker"] == 42
  before = {k: hdf5.read_sequence(out, k).img for k in hdf5.list_keys(out)}
  rep = convert_camus(db, out, size=32)
  assert rep.converted == [] and len(rep.existing) == 3
  for k, v in before.items():
    np.testing.assert_array_equal(hdf5.read_sequence(out, k).img, v)
  with pytest.raises(InputError, match="size 32"):
    convert_camus(db, out, size=64)


def test_skip_bad_and_nothing_lost(db, tmp_path):
  out = tmp_path / "c.h5"
  convert_camus(db, out, size=32, patients=["patient0003"])
  bad_file = db / "patient0002" / "Info_2CH.cfg"
  bad_file.unlink()                                # sequence without a cfg
  data_before = out.read_bytes()
  with pytest.raises(InputError, match="cfg missing"):
    convert_camus(db, out, size=32)
  assert out.read_bytes() == data_before           # failed run: output untouched
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
  rep = convert_camus(db, out, size=32, skip_bad=True)
  assert list(rep.bad) == ["patient0002"] and str(bad_file) in rep.bad["patient0002"]
  assert rep.converted == ["patient0001/4CH"]
  assert hdf5.list_keys(out) == ["patient0001/4CH", "patient0003/4CH"]


def test_views_explicit_missing_everywhere_is_an_error(db, tmp_path):
  for p in ("patient0001", "patient0003"):
    for f in (db / p).glob("*"):
      f.unlink()
    (db / p).rmdir()
  out = tmp_path / "c.h5"
  with pytest.raises(InputError, match="4CH missing for all"):
    convert_camus(db, out, size=32, views=["4CH"])
  assert not out.exists()
  rep = convert_camus(db, out, size=32)            # default views: absent ones skipped
  assert rep.converted == ["patient0002/2CH"]
  with pytest.raises(InputError, match="unknown view"):
    convert_camus(db, out, size=32, views=["3CH"])
  with pytest.raises(InputError, match="patient0009"):
    convert_camus(db, out, size=32, patients=["patient0009"])


def test_cli_convert_and_skip_bad(db, tmp_path):
  bad = db / "patient0003" / "patient0003_4CH_ES.nii.gz"
  bad.write_bytes(bad.read_bytes()[:40])
  out = tmp_path / "c.h5"
  cmd = [sys.executable, str(REPO / "experiments" / "convert_camus.py"), f"--camus_dir={db}",
         f"--out={out}", "--size=32", "--skip_bad"]
  r = subprocess.run(cmd, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert "2 views converted" in r.stdout and "1 bad patients" in r.stdout
  assert "patient0003_4CH_ES.nii.gz" in r.stdout
  assert "convert: 3/3 patients" in r.stderr and "patient/s" in r.stderr   # progress with rate
  assert hdf5.list_keys(out) == ["patient0001/4CH", "patient0002/2CH"]


# ---------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------

CAMUS = camus_dir()


@pytest.mark.camus
@pytest.mark.skipif(not CAMUS.is_dir(), reason=f"CAMUS data not found at {CAMUS} "
                    "(set ECHO_ODE_CAMUS_DIR)")
def test_real_camus_three_patients(tmp_path):
  names = [p.name for p in camus.find_patients(CAMUS)[:3]]
  out = tmp_path / "camus.h5"
  rep = convert_camus(CAMUS, out, size=64, patients=names)
  assert rep.converted == [f"{n}/4CH" for n in names] and not rep.bad
  with h5py.File(out) as f:
    assert f.attrs["size"] == 64
  for n in names:
    seq = hdf5.read_sequence(out, f"{n}/4CH")
    src = camus.read_view(CAMUS / "database_nifti" / n if (CAMUS / "database_nifti").is_dir()
                          else CAMUS / n, "4CH")
    assert seq.img.shape == (2, 64, 64) and seq.img.dtype == np.float32
    assert seq.gt.shape == (2, 64, 64) and seq.gt.dtype == np.uint8
    assert 0 <= seq.img.min() and seq.img.max() <= 1 and seq.img.max() > 0.5
    a = seq.attrs
    assert a["ed_index"] == 0 and a["es_index"] == 1
    sp = np.asarray(a["source_voxelspacing"])
    shape = np.asarray(a["source_shape"])
    np.testing.assert_array_equal(shape, src.img.shape[1:])
    np.testing.assert_allclose(a["voxelspacing"], [np.max(sp * shape) / 64] * 2, rtol=1e-6)
    np.testing.assert_allclose(sp * shape / a["content_shape"], a["voxelspacing"],
                               rtol=0.5 / a["content_shape"].min() + 1e-9)
    for t in range(2):
      assert set(np.unique(seq.gt[t])) == {0, 1, 2, 3}
      rows = lambda k: np.nonzero(seq.gt[t] == k)[0]
      assert rows(1).mean() < rows(3).mean()
    # Back to the source grid: same shape; Dice of the LV vs the original mask.
    back = to_source(seq.gt, a)
    assert back.shape == src.gt.shape
    for k in (1, 2, 3):
      x, y = back[0] == k, src.gt[0] == k
      assert 2 * (x & y).sum() / (x.sum() + y.sum()) > 0.85


def test_bad_size_and_directory_out_are_one_line_errors(db, tmp_path):
  with pytest.raises(InputError, match="--size must be >= 8, got 4"):
    convert_camus(db, tmp_path / "x.h5", size=4)
  (tmp_path / "dir.h5").mkdir()
  with pytest.raises(InputError) as e:
    convert_camus(db, tmp_path / "dir.h5", size=32)
  assert "is a directory" in str(e.value) and "\n" not in str(e.value)


def test_a_failed_run_keeps_its_commits_and_a_rerun_adds_the_rest(db, tmp_path):
  bad = fakes.patient_edes(db, "patient0009")[0]
  (bad / "patient0009_4CH_ES.nii.gz").write_bytes(b"not a nifti")
  out = tmp_path / "camus.h5"
  with pytest.raises(InputError, match="patient0009_4CH_ES"):
    convert_camus(db, out, size=32, commit_every_s=0.0)     # a commit after every patient
  kept = hdf5.list_keys(out)
  assert [k.split("/")[0] for k in kept] == ["patient0001", "patient0002", "patient0003"]
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
  fakes.patient_edes(db, "patient0009")                      # the file repaired
  rep = convert_camus(db, out, size=32)
  assert rep.converted == ["patient0009/4CH"] and sorted(rep.existing) == kept
  whole = tmp_path / "whole.h5"
  convert_camus(db, whole, size=32)
  with h5py.File(out) as a, h5py.File(whole) as b:            # the same as one clean run
    assert hdf5.list_keys(out) == hdf5.list_keys(whole)
    for k in hdf5.list_keys(out):
      np.testing.assert_array_equal(a[k]["img"][...], b[k]["img"][...])
      np.testing.assert_array_equal(a[k]["gt"][...], b[k]["gt"][...])


def test_one_converter_per_output(db, tmp_path):
  from echo_ode_jax._atomic import exclusive
  out = tmp_path / "camus.h5"
  with exclusive(out, "converting into"):                    # as another process would
    with pytest.raises(InputError, match="another process is converting"):
      convert_camus(db, out, size=32)
  convert_camus(db, out, size=32)                            # free again
  assert sorted(p.name for p in tmp_path.iterdir()) == ["camus.h5", "database_nifti"]  # no lock


def test_sigterm_in_a_cli_removes_the_temporary_file(tmp_path):
  script = tmp_path / "slow.py"
  script.write_text(
      "import os, signal, sys, time\n"
      "signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the test runner's may be inherited\n"
      "from absl import app\n"
      "from echo_ode_jax._atomic import atomic_path\n"
      "from echo_ode_jax.cli import run_cli\n"
      "def main(argv):\n"
      f"  with atomic_path({str(tmp_path / 'out.h5')!r}) as tmp:\n"
      "    open(tmp, 'w').write('partial')\n"
      "    os.kill(os.getpid(), signal.SIGTERM)\n"
      "    time.sleep(60)\n"
      "app.run(run_cli(main))\n")
  env = dict(os.environ, ECHO_ODE_JIT_CACHE="off")
  r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 143, r.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.py"]
