"""_atomic: fsync before the rename, HDF5 writes through the guard, the lock."""
import errno
import io
import os

import h5py
import numpy as np
import pytest

from echo_ode_jax import _atomic
from echo_ode_jax.errors import InputError, OutputError


def test_atomic_path_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
  calls = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
    return real_fsync(fd)

  def replace(a, b):
    calls.append(("replace", os.fspath(a)))
    return real_replace(a, b)

  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "replace", replace)
  out = tmp_path / "x.txt"
  with _atomic.atomic_path(out) as tmp:
    with open(tmp, "w") as f:
      f.write("data")
  assert out.read_text() == "data"
  i = calls.index(("replace", tmp))
  assert ("fsync", tmp) in calls[:i]                      # the data first
  assert ("fsync", str(tmp_path)) in calls[i + 1:]        # then the rename


def test_atomic_path_no_space_is_an_output_error(tmp_path):
  out = tmp_path / "x.txt"
  with pytest.raises(OutputError) as e:
    with _atomic.atomic_path(out) as tmp:
      open(tmp, "w").write("partial")
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  assert "\n" not in str(e.value) and str(out) in str(e.value)
  assert "no space left on device" in str(e.value)
  assert list(tmp_path.iterdir()) == []


def test_guarded_file_after_a_failed_write_reads_back_what_was_written(tmp_path, monkeypatch):
  """Once writes fail, the guard keeps them in memory: the HDF5 library sees a
  consistent file (its bytes, read through the guard, open as the file written)."""
  path = str(tmp_path / "g.h5")
  real = os.pwrite
  n = [0]

  def pwrite(fd, data, offset):
    n[0] += len(data)
    if n[0] > 6000:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd, data, offset)

  monkeypatch.setattr(os, "pwrite", pwrite)
  rng = np.random.default_rng(0)
  arrays = {f"g{i}/d": rng.random((40, 50)).astype(np.float32) for i in range(12)}
  guard = _atomic.GuardedFile(path, create=True)
  with h5py.File(guard, "w") as f:
    for k, a in arrays.items():
      f.create_dataset(k, data=a, compression="gzip", chunks=(10, 50))
    f.flush()
    del f["g3"]
    for k in list(arrays)[:6]:
      if k != "g3/d":
        np.testing.assert_array_equal(f[k][...], arrays[k])
  assert guard.error is not None and guard.error.errno == errno.ENOSPC
  guard.seek(0)
  image = guard.read()
  guard.close()
  assert os.path.getsize(path) < len(image)              # the disk has only a part
  with h5py.File(io.BytesIO(image), "r") as f:
    assert sorted(f) == sorted(k.split("/")[0] for k in arrays if k != "g3/d")
    for k, a in arrays.items():
      if k != "g3/d":
        np.testing.assert_array_equal(f[k][...], a)


def test_atomic_h5_extends_a_copy_and_stops_at_a_failed_write(tmp_path, monkeypatch):
  out = tmp_path / "x.h5"
  with _atomic.atomic_h5(out) as f:
    f["a"] = np.arange(10)
  with _atomic.atomic_h5(out, "a", copy_existing=True) as f:
    f["b"] = np.ones(3)
  with h5py.File(out) as f:
    assert sorted(f) == ["a", "b"]
  before = out.read_bytes()
  monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(
      OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))))
  reached = []
  with pytest.raises(OutputError, match="quota"):
    with _atomic.atomic_h5(out, "a", copy_existing=True) as f:
      f.create_dataset("c", data=np.zeros(100000))
      f.flush()
      _atomic.check_writes(f)
      reached.append(1)
  assert reached == [] and out.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


def test_exclusive_lock_is_removed_and_shared_holders_coexist(tmp_path):
  out = tmp_path / "r.h5"
  with _atomic.exclusive(out, "fitting into"):
    assert os.path.exists(_atomic.lock_path(out))
    with pytest.raises(InputError, match="another process is fitting into this file"):
      with _atomic.exclusive(out, "fitting into"):
        pass
    with pytest.raises(InputError):
      with _atomic.exclusive(out, "fitting into", shared=True):
        pass
  assert list(tmp_path.iterdir()) == []
  with _atomic.exclusive(out, "fitting into", shared=True):
    with _atomic.exclusive(out, "fitting into", shared=True):
      with pytest.raises(InputError):
        with _atomic.exclusive(out, "fitting into"):
          pass
    assert os.path.exists(_atomic.lock_path(out))          # one holder left
  assert list(tmp_path.iterdir()) == []
