"""CAMUS readers: both official layouts, orientation, and every kind of bad input."""
import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import camus_fakes as fakes
from conftest import camus_dir
from echo_ode_jax.data import camus
from echo_ode_jax.errors import InputError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Good input
# ---------------------------------------------------------------------------


def test_read_2023_half_sequence(tmp_path):
  d, img, gt = fakes.patient_2023(tmp_path, "patient0001", spacing=(0.2, 0.3))
  v = camus.read_view(d, "4CH")
  assert v.kind == "half_sequence" and v.patient == "patient0001" and v.view == "4CH"
  # NIfTI stores (x, y, t): the reader returns (t, y, x), i.e. what the writer was given.
  np.testing.assert_array_equal(v.img, img)
  np.testing.assert_array_equal(v.gt, gt)
  assert v.spacing == (0.2, 0.3)
  assert v.info == {"ed": 1, "es": 6, "nbframe": 6, "sex": "F", "age": 62,
                    "imagequality": "Good", "ef": 55, "framerate": 30}


def test_read_2023_without_gt_sequence_uses_ed_es_masks(tmp_path):
  d, img, gt = fakes.patient_2023(tmp_path, "patient0001", half_gt=False)
  v = camus.read_view(d, "4CH")
  np.testing.assert_array_equal(v.gt[0], gt[0])
  np.testing.assert_array_equal(v.gt[-1], gt[-1])
  assert np.all(v.gt[1:-1] == 255)


def test_read_2019_sequence_sliced_ed_to_es(tmp_path):
  d, img, gt = fakes.patient_2019(tmp_path, "patient0002", frames=8, ed=2, es=6)
  v = camus.read_view(d, "2CH")
  assert v.kind == "sequence"
  np.testing.assert_array_equal(v.img, img[1:6])           # 1-based ED=2 .. ES=6
  np.testing.assert_array_equal(v.gt[0], gt[1])
  np.testing.assert_array_equal(v.gt[-1], gt[5])
  assert np.all(v.gt[1:-1] == 255)                         # frames without masks
  assert v.spacing == pytest.approx((0.154, 0.308))        # anisotropic: rows, cols
  assert v.info["lvef"] == 50.0 and v.info["ed"] == 2 and v.info["es"] == 6
  assert camus.read_view(d, "4CH") is None


def test_read_ed_es_only(tmp_path):
  d, img, gt = fakes.patient_edes(tmp_path, "patient0003")
  v = camus.read_view(d, "4CH")
  assert v.kind == "ed_es" and v.info == {}
  np.testing.assert_array_equal(v.img, img)
  np.testing.assert_array_equal(v.gt, gt)
  assert v.spacing == (0.308, 0.308)
  assert camus.available_views(d) == ["4CH"]


def test_read_cfg_types(tmp_path):
  p = fakes.write_cfg(tmp_path / "Info_4CH.cfg", ED=1, ES=18, Sex="F", EF=55.5,
                      ImageQuality="Poor")
  assert camus.read_cfg(p) == {"ed": 1, "es": 18, "sex": "F", "ef": 55.5,
                               "imagequality": "Poor"}


def test_read_cfg_windows_bom_and_crlf(tmp_path):
  p = tmp_path / "Info_4CH.cfg"
  p.write_bytes(b"\xef\xbb\xbfED: 3\r\nES: 12\r\n")     # Notepad's "UTF-8"
  assert camus.read_cfg(p) == {"ed": 3, "es": 12}


def test_read_cfg_duplicate_key_is_an_error(tmp_path):
  p = tmp_path / "Info_4CH.cfg"
  p.write_text("ED: 3\nES: 12\ned: 5\n")
  _raises(lambda: camus.read_cfg(p), p, "line 3: ed given twice")


@pytest.mark.parametrize("layout", ["flat", "database_nifti", "training"])
def test_find_patients_layouts(tmp_path, layout):
  base = tmp_path if layout == "flat" else tmp_path / layout
  for pid in ("patient0002", "patient0001"):
    (base / pid).mkdir(parents=True)
  (base / "notapatient").mkdir()
  found = camus.find_patients(tmp_path)
  assert [p.name for p in found] == ["patient0001", "patient0002"]
  if layout != "flat":
    assert [p.name for p in camus.find_patients(base)] == ["patient0001", "patient0002"]


def test_find_patients_2019_training_and_testing(tmp_path):
  (tmp_path / "training" / "patient0001").mkdir(parents=True)
  (tmp_path / "testing" / "patient0451").mkdir(parents=True)
  assert [p.name for p in camus.find_patients(tmp_path)] == ["patient0001", "patient0451"]


# ---------------------------------------------------------------------------
# Bad input: one InputError naming the file and the problem
# ---------------------------------------------------------------------------


def _raises(fn, path, *words):
  with pytest.raises(InputError) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith(str(path)), msg
  for w in words:
    assert w in msg, msg
  return msg


def test_truncated_nifti(tmp_path):
  d, _, _ = fakes.patient_2023(tmp_path, "patient0001")
  p = d / "patient0001_4CH_half_sequence.nii.gz"
  data = p.read_bytes()
  p.write_bytes(data[: len(data) // 2])
  _raises(lambda: camus.read_view(d, "4CH"), p, "truncated or corrupt")


def test_corrupt_nifti_header(tmp_path):
  d, _, _ = fakes.patient_edes(tmp_path, "patient0001")
  p = d / "patient0001_4CH_ES_gt.nii.gz"
  p.write_bytes(gzip.compress(b"not a nifti file at all" * 10))
  _raises(lambda: camus.read_view(d, "4CH"), p, "cannot read image")


def test_truncated_mhd_raw(tmp_path):
  d, _, _ = fakes.patient_2019(tmp_path, "patient0002")
  raw = d / "patient0002_2CH_sequence.raw"
  raw.write_bytes(raw.read_bytes()[:100])
  _raises(lambda: camus.read_view(d, "2CH"), d / "patient0002_2CH_sequence.mhd",
          "truncated or corrupt")


def test_cfg_missing_with_sequence(tmp_path):
  d, _, _ = fakes.patient_2019(tmp_path, "patient0002")
  (d / "Info_2CH.cfg").unlink()
  _raises(lambda: camus.read_view(d, "2CH"), d / "Info_2CH.cfg", "cfg missing")


def test_cfg_without_es(tmp_path):
  d, _, _ = fakes.patient_2023(tmp_path, "patient0001")
  fakes.write_cfg(d / "Info_4CH.cfg", ED=1, NbFrame=6)
  _raises(lambda: camus.read_view(d, "4CH"), d / "Info_4CH.cfg", "lacks ES")


def test_cfg_garbage_line(tmp_path):
  d, _, _ = fakes.patient_2023(tmp_path, "patient0001")
  (d / "Info_4CH.cfg").write_text("ED: 1\nthis is not a field\n")
  _raises(lambda: camus.read_view(d, "4CH"), d / "Info_4CH.cfg", "line 2")


def test_es_outside_2019_sequence(tmp_path):
  d, _, _ = fakes.patient_2019(tmp_path, "patient0002", frames=8, ed=2, es=6)
  fakes.write_cfg(d / "Info_2CH.cfg", ED=2, ES=12)
  _raises(lambda: camus.read_view(d, "2CH"), d / "Info_2CH.cfg", "outside", "8 frames")


def test_ed_es_not_matching_half_sequence(tmp_path):
  d, _, _ = fakes.patient_2023(tmp_path, "patient0001", frames=6)
  fakes.write_cfg(d / "Info_4CH.cfg", ED=1, ES=9)
  _raises(lambda: camus.read_view(d, "4CH"), d / "Info_4CH.cfg", "do not match")


def test_es_before_ed(tmp_path):
  d, _, _ = fakes.patient_2019(tmp_path, "patient0002")
  fakes.write_cfg(d / "Info_2CH.cfg", ED=5, ES=3)
  _raises(lambda: camus.read_view(d, "2CH"), d / "Info_2CH.cfg", "not after ED")


def test_image_mask_shape_mismatch(tmp_path):
  d, _, gt = fakes.patient_edes(tmp_path, "patient0001")
  p = fakes.write_nifti(d / "patient0001_4CH_ED_gt.nii.gz", gt[0][:-2])
  _raises(lambda: camus.read_view(d, "4CH"), p, "shape")


def test_sequence_mask_shape_mismatch(tmp_path):
  d, _, gt = fakes.patient_2023(tmp_path, "patient0001")
  p = fakes.write_nifti(d / "patient0001_4CH_half_sequence_gt.nii.gz", gt[:-1])
  _raises(lambda: camus.read_view(d, "4CH"), p, "shape")


def test_non_finite_image(tmp_path):
  d, img, _ = fakes.patient_edes(tmp_path, "patient0001")
  bad = img[0].astype(np.float32)
  bad[3, 4] = np.nan
  p = fakes.write_nifti(d / "patient0001_4CH_ED.nii.gz", bad)
  _raises(lambda: camus.read_view(d, "4CH"), p, "non-finite")


def test_constant_image(tmp_path):
  d, img, _ = fakes.patient_edes(tmp_path, "patient0001")
  p = fakes.write_nifti(d / "patient0001_4CH_ES.nii.gz", np.full_like(img[1], 7))
  _raises(lambda: camus.read_view(d, "4CH"), p, "constant")


def test_labels_outside_range(tmp_path):
  d, _, gt = fakes.patient_edes(tmp_path, "patient0001")
  bad = gt[1].copy()
  bad[0, 0] = 5
  p = fakes.write_nifti(d / "patient0001_4CH_ES_gt.nii.gz", bad)
  _raises(lambda: camus.read_view(d, "4CH"), p, "labels outside", "[5]")


def test_mhd_labels_outside_range(tmp_path):
  d, _, gt = fakes.patient_2019(tmp_path, "patient0002")
  bad = gt[1].copy()
  bad[2, 2] = 4
  p = fakes.write_mhd(d / "patient0002_2CH_ED_gt.mhd", bad, (0.154, 0.308))
  _raises(lambda: camus.read_view(d, "2CH"), p, "labels outside", "[4]")


def test_missing_es_image(tmp_path):
  d, _, _ = fakes.patient_edes(tmp_path, "patient0001")
  (d / "patient0001_4CH_ES.nii.gz").unlink()
  _raises(lambda: camus.read_view(d, "4CH"), d / "patient0001_4CH_ES.nii.gz", "missing")


def test_empty_directory(tmp_path):
  _raises(lambda: camus.find_patients(tmp_path), tmp_path, "empty directory")
  _raises(lambda: camus.find_patients(tmp_path / "nope"), tmp_path / "nope", "does not exist")
  (tmp_path / "stuff").mkdir()
  _raises(lambda: camus.find_patients(tmp_path), tmp_path, "no patient folders")


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
  d, _, gt = fakes.patient_edes(tmp_path / "db", "patient0001")
  bad = gt[0].copy()
  bad[1, 1] = 9
  fakes.write_nifti(d / "patient0001_4CH_ED_gt.nii.gz", bad)
  out = tmp_path / "out.h5"
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "convert_camus.py"),
                      f"--camus_dir={tmp_path / 'db'}", f"--out={out}", "--size=32"],
                     capture_output=True, text=True)
  assert r.returncode == 2
  assert "Traceback" not in r.stderr
  err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "patient0001_4CH_ED_gt.nii.gz" in err[0] and "labels" in err[0]
  assert not out.exists()


# ---------------------------------------------------------------------------
# Real data (the shared CAMUS copy)
# ---------------------------------------------------------------------------

CAMUS = camus_dir()
needs_camus = pytest.mark.skipif(not CAMUS.is_dir(),
                                 reason=f"CAMUS data not found at {CAMUS} "
                                 "(set ECHO_ODE_CAMUS_DIR)")


@pytest.mark.camus
@needs_camus
def test_real_orientation_lv_above_la():
  patients = camus.find_patients(CAMUS)[:3]
  assert len(patients) == 3
  for d in patients:
    v = camus.read_view(d, "4CH")
    assert v.gt is not None and v.img.shape == v.gt.shape and v.num_frames == 2
    # The raw NIfTI array is (x, y): the reader's rows are its second axis.
    raw = np.asanyarray(nib.load(str(d / f"{d.name}_4CH_ED.nii.gz")).dataobj)
    np.testing.assert_array_equal(v.img[0], raw.T)
    for t in range(2):
      assert set(np.unique(v.gt[t])) <= {0, 1, 2, 3}
      rows = lambda k: np.nonzero(v.gt[t] == k)[0]
      assert rows(1).mean() < rows(3).mean(), d.name      # LV above LA
      assert rows(2).min() < rows(3).min(), d.name        # apex (myocardium) at the top


@pytest.mark.parametrize("layout", ["2023_half_no_gt", "2023_ed_es_only", "2019"])
def test_one_mask_of_the_ed_es_pair_missing_is_an_error(tmp_path, layout):
  if layout == "2019":
    d = fakes.patient_2019(tmp_path, "patient0002")
    d = d[0] if isinstance(d, tuple) else d
    view, gone, kept = "2CH", "patient0002_2CH_ES_gt.mhd", "patient0002_2CH_ED_gt.mhd"
    (d / gone).unlink()
    (d / gone.replace(".mhd", ".raw")).unlink(missing_ok=True)
  else:
    d = fakes.patient_2023(tmp_path, "patient0001", half_gt=False)
    d = d[0] if isinstance(d, tuple) else d
    if layout == "2023_ed_es_only":
      for s in ("half_sequence",):
        (d / f"patient0001_4CH_{s}.nii.gz").unlink()
      (d / "Info_4CH.cfg").unlink(missing_ok=True)
    view, gone, kept = "4CH", "patient0001_4CH_ED_gt.nii.gz", "patient0001_4CH_ES_gt.nii.gz"
    (d / gone).unlink()
  _raises(lambda: camus.read_view(d, view), d / gone, f"missing: {kept} exists but no")
