"""The CAMUS converter under faults: a full disk, stale temporaries, unreadable
folders and files, read-only outputs, bad cfgs and masks, a second source."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import camus_fakes as fakes
from echo_ode_jax import _atomic
from echo_ode_jax.data import camus, hdf5
from echo_ode_jax.data.convert import convert_camus
from echo_ode_jax.errors import InputError, OutputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path):
  root = tmp_path / "db"
  for i in (1, 2, 3):
    fakes.patient_2023(root, f"patient000{i}", seed=i, h=40, w=40, frames=5)
  return root


def _one_line(e, *words):
  msg = str(e.value if hasattr(e, "value") else e)
  assert "\n" not in msg, msg
  for w in words:
    assert str(w) in msg, msg
  return msg


def _no_space_after(monkeypatch, folder: Path, limit: int, err=errno.ENOSPC):
  """Makes os.pwrite into files under `folder` fail once `limit` bytes are written."""
  real = os.pwrite
  written = [0]

  def pwrite(fd, data, offset):
    if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
      if written[0] + len(data) > limit:
        raise OSError(err, os.strerror(err))
      written[0] += len(data)
    return real(fd, data, offset)

  monkeypatch.setattr(os, "pwrite", pwrite)


def _leftovers(folder: Path):
  return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_disk_full_is_one_line_and_leaves_no_temporary(db, tmp_path, monkeypatch):
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  out = out_dir / "c.h5"
  _no_space_after(monkeypatch, out_dir, 30_000)
  with pytest.raises(OutputError) as e:
    convert_camus(db, out, size=32)
  _one_line(e, out, "no space left on device")
  assert not out.exists() and _leftovers(out_dir) == []
  # With one patient committed, a full disk keeps it and the output stays readable.
  monkeypatch.undo()
  convert_camus(db, out, size=32, patients=["1"])
  before = out.read_bytes()
  _no_space_after(monkeypatch, out_dir, len(before) + 5_000)
  with pytest.raises(OutputError):
    convert_camus(db, out, size=32)
  assert out.read_bytes() == before and _leftovers(out_dir) == []
  monkeypatch.undo()
  assert convert_camus(db, out, size=32).converted == ["patient0002/4CH", "patient0003/4CH"]


def limited_file_size(n: int, argv: list[str]) -> list[str]:
  """A command running `argv` (a Python script and its args) with files limited
  to n bytes: a write past it fails with EFBIG (Python ignores SIGXFSZ)."""
  return [sys.executable, "-c",
          "import os, resource, sys; "
          f"resource.setrlimit(resource.RLIMIT_FSIZE, ({n}, {n})); "
          "os.execv(sys.executable, [sys.executable] + sys.argv[1:])", *argv]


def test_cli_file_size_limit_is_one_line_not_a_crash(db, tmp_path):
  """A real failed write (EFBIG under RLIMIT_FSIZE, as a full disk gives ENOSPC):
  the HDF5 library never sees it, so the CLI exits 2 with one line."""
  out = tmp_path / "out" / "c.h5"
  r = subprocess.run(limited_file_size(40_000, [
      str(REPO / "experiments" / "convert_camus.py"), f"--camus_dir={db}", f"--out={out}",
      "--size=64"]), capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and str(out) in err[0] and "file too large" in err[0].lower()
  assert sorted(p.name for p in out.parent.iterdir()) == []


def test_stale_temporaries_of_a_killed_run_are_removed(db, tmp_path):
  out = tmp_path / "c.h5"
  stale = tmp_path / ".c.h5.k1ll3d.tmp"
  stale.write_bytes(b"\0" * 1000)
  other = tmp_path / ".other.h5.abc.tmp"          # another output's: not touched
  other.write_bytes(b"x")
  rep = convert_camus(db, out, size=32)
  assert len(rep.converted) == 3 and not stale.exists() and other.exists()
  assert _leftovers(tmp_path) == [".other.h5.abc.tmp"]   # no lock file either


def test_read_only_output_folder_is_one_line(db, tmp_path, monkeypatch):
  ro = tmp_path / "ro"
  ro.mkdir()
  real = os.open

  def no_write(path, flags, *a, **kw):
    if str(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real(path, flags, *a, **kw)

  monkeypatch.setattr(os, "open", no_write)
  for skip_bad in (False, True):
    with pytest.raises(OutputError) as e:
      convert_camus(db, ro / "c.h5", size=32, skip_bad=skip_bad)
    _one_line(e, ro / "c.h5", "permission denied")
  assert list(ro.iterdir()) == []


def test_unreadable_patient_folder_is_a_bad_patient(db, tmp_path, monkeypatch):
  locked = db / "patient0002"
  real = os.stat

  def stat(path, *a, **kw):
    if str(path).startswith(str(locked) + os.sep):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real(path, *a, **kw)

  monkeypatch.setattr(os, "stat", stat)
  out = tmp_path / "c.h5"
  with pytest.raises(InputError) as e:
    convert_camus(db, out, size=32)
  _one_line(e, locked, "cannot read patient folder", "Permission denied")
  for views in (None, ["4CH"]):
    out = tmp_path / f"c{views}.h5"
    rep = convert_camus(db, out, size=32, views=views, skip_bad=True)
    assert list(rep.bad) == ["patient0002"] and "cannot read patient folder" in rep.bad[
        "patient0002"]
    assert hdf5.list_keys(out) == ["patient0001/4CH", "patient0003/4CH"]


def test_unreadable_image_is_not_called_corrupt(db, monkeypatch):
  import builtins
  target = db / "patient0001" / "patient0001_4CH_half_sequence.nii.gz"
  real = builtins.open

  def deny(file, *a, **kw):
    if str(file) == str(target):
      raise PermissionError(errno.EACCES, "Permission denied", str(file))
    return real(file, *a, **kw)

  monkeypatch.setattr(builtins, "open", deny)
  with pytest.raises(InputError) as e:
    camus.read_view(db / "patient0001", "4CH")
  msg = _one_line(e, target, "Permission denied")
  assert "corrupt" not in msg


@pytest.mark.parametrize("fields,words", [
    (dict(ED=1, ES=5, NbFrame=4), "ES=5 exceeds NbFrame=4"),
    (dict(ED=1, ES=5, NbFrame=5, Status="bad"), "status"),
    (dict(ED=1, ES=5, NbFrame=5, img=3), "img"),
    (dict(ED=1, ES=5, NbFrame=5, loss_total=1.0), "loss_total"),
])
def test_bad_cfg_names_the_cfg(db, tmp_path, fields, words):
  cfg = fakes.write_cfg(db / "patient0002" / "Info_4CH.cfg", **fields)
  with pytest.raises(InputError) as e:
    convert_camus(db, tmp_path / "c.h5", size=32)
  _one_line(e, cfg, words)
  rep = convert_camus(db, tmp_path / "c.h5", size=32, skip_bad=True)
  assert list(rep.bad) == ["patient0002"]


@pytest.mark.parametrize("mask,words", [
    (lambda gt: np.zeros_like(gt[0]), "mask is empty"),
    (lambda gt: np.where(gt[0] == 1, 2, gt[0]).astype(np.uint8), "no LV cavity"),
])
def test_empty_ed_mask_is_bad_input(tmp_path, mask, words):
  root = tmp_path / "db"
  d, _, gt = fakes.patient_2023(root, "patient0001", h=40, w=40, frames=5, half_gt=False)
  bad = d / "patient0001_4CH_ED_gt.nii.gz"
  fakes.write_nifti(bad, mask(gt))
  with pytest.raises(InputError) as e:
    convert_camus(root, tmp_path / "c.h5", size=32)
  _one_line(e, bad, words)
  # The same in a mask sequence: the frame is named.
  seq_gt = gt.copy()
  seq_gt[2] = 0
  fakes.write_nifti(d / "patient0001_4CH_half_sequence_gt.nii.gz", seq_gt)
  with pytest.raises(InputError) as e:
    camus.read_view(d, "4CH")
  _one_line(e, "half_sequence_gt", "mask frame 2 is empty")


def test_rerun_from_another_source_folder_is_refused(db, tmp_path):
  out = tmp_path / "c.h5"
  convert_camus(db, out, size=32, patients=["1"])
  other = tmp_path / "other"
  fakes.patient_2023(other, "patient0001", seed=9, h=40, w=40, frames=5)
  fakes.patient_2023(other, "patient0007", seed=7, h=40, w=40, frames=5)
  before = out.read_bytes()
  with pytest.raises(InputError) as e:
    convert_camus(other, out, size=32)
  _one_line(e, out, "patient0001/4CH was converted from", str(db.resolve() / "patient0001"))
  assert out.read_bytes() == before
  # Other patients from another folder may be added; the same folder reruns as before.
  assert convert_camus(other, out, size=32, patients=["7"]).converted == ["patient0007/4CH"]
  assert convert_camus(db, out, size=32).existing == ["patient0001/4CH"]
  with h5py.File(out) as f:
    assert hdf5.attr_value(f["patient0007/4CH"].attrs["source_folder"]) == str(
        (other / "patient0007").resolve())
