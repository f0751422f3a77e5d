"""runner.fit_file and experiments/fit_sequences.py under faults: corrupt results,
a full disk, two runs on one output, bad settings and bad inputs. The fit itself
is replaced by a stand-in (the masks of m_0 on every frame): these tests are
about the file handling around it."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from echo_ode_jax import _atomic, fit, runner
from echo_ode_jax.data import hdf5, synthetic
from echo_ode_jax.errors import InputError, OutputError

from test_fit import TINY_CFG

REPO = Path(__file__).resolve().parents[1]


def _stand_in(calls):
  def fit_batch(seqs, cfg, keys=None, mesh=None, progress=False):
    calls.append(len(seqs))
    out = []
    for s in seqs:
      t = int(s["es_index"]) + 1
      m0 = s["m0"].argmax(-1).astype(np.uint8)
      out.append(fit.FitResult(masks=np.repeat(m0[None], t, 0),
                               phi=np.zeros((t,) + m0.shape + (2,), np.float32), history={},
                               final={"loss": 0.0}, folding_fraction=0.0, seconds=0.0))
    return out
  return fit_batch


@pytest.fixture
def calls(monkeypatch):
  c = []
  monkeypatch.setattr(fit, "fit_batch", _stand_in(c))
  return c


def _seq(i, **attrs):
  s = synthetic.make_sequence(i, size=32, num_frames=4)[0]
  return hdf5.Sequence(f"p{i}", "4CH", s.img, s.gt, {**s.attrs, **attrs})


def _data(path, seqs):
  with h5py.File(path, "w") as f:
    hdf5.set_root_attrs(f, 32)
    for s in seqs:
      hdf5.write_sequence(f, s)
  return str(path)


@pytest.fixture
def data(tmp_path):
  return _data(tmp_path / "data.h5", [_seq(i) for i in range(3)])


def _one_line(e, *words):
  msg = str(e.value)
  assert "\n" not in msg, msg
  for w in words:
    assert str(w) in msg, msg
  return msg


def test_corrupt_out_is_one_line_before_any_fit(data, tmp_path, calls):
  out = tmp_path / "r.h5"
  out.write_text("garbage\n")
  for _ in range(2):                                # the rerun says the same
    with pytest.raises(InputError) as e:
      runner.fit_file(data, str(out), TINY_CFG, guide="gt", batch_size=2)
    _one_line(e, out, "not a readable HDF5 file", "move it aside or delete it")
  assert calls == [] and out.read_text() == "garbage\n"


def test_corrupt_part_is_set_aside_and_its_sequences_refitted(data, tmp_path, calls, caplog):
  out = str(tmp_path / "r.h5")
  runner.fit_file(data, out, TINY_CFG, guide="gt", batch_size=2, merge_results=False)
  parts = sorted(Path(runner.parts_dir(out)).glob("*.h5"))
  assert len(parts) == 2 and calls == [2, 1]
  lost = hdf5.list_keys(parts[0])
  parts[0].write_bytes(b"garbage")
  res = runner.fit_file(data, out, TINY_CFG, guide="gt", batch_size=2)
  assert sorted(res["fitted"]) == lost and len(res["skipped"]) == 3 - len(lost)
  assert hdf5.list_keys(out) == hdf5.list_keys(data)
  assert sorted(p.name for p in Path(runner.parts_dir(out)).iterdir()) == [
      parts[0].name + ".corrupt"]
  assert any("moved to" in r.getMessage() and parts[0].name in r.getMessage()
             for r in caplog.records)


def test_merge_sets_a_corrupt_part_aside_instead_of_crashing(data, tmp_path, calls):
  out = str(tmp_path / "r.h5")
  runner.fit_file(data, out, TINY_CFG, guide="gt", batch_size=1, merge_results=False)
  parts = sorted(Path(runner.parts_dir(out)).glob("*.h5"))
  bad_keys = hdf5.list_keys(parts[1])
  parts[1].write_bytes(b"\x89HDF garbage")
  assert runner.merge(out) == 2
  assert hdf5.list_keys(out) == sorted(set(hdf5.list_keys(data)) - set(bad_keys))
  assert (parts[1].parent / (parts[1].name + ".corrupt")).exists()


def test_a_part_damaged_inside_is_one_line_at_merge(data, tmp_path, calls, monkeypatch):
  out = str(tmp_path / "r.h5")
  runner.fit_file(data, out, TINY_CFG, guide="gt", batch_size=3, merge_results=False)
  part = next(Path(runner.parts_dir(out)).glob("*.h5"))

  def damaged(self, *a, **kw):
    raise OSError("Can't read data (inflate() failed)")

  monkeypatch.setattr(h5py.Group, "copy", damaged)
  with pytest.raises(InputError) as e:
    runner.merge(out)
  _one_line(e, part, "cannot be merged", "inflate() failed")
  assert not Path(out).exists() and part.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5", "r.h5.parts"]


def _no_space_after(monkeypatch, folder, limit):
  real = os.pwrite
  written = [0]

  def pwrite(fd, data, offset):
    if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
      if written[0] + len(data) > limit:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      written[0] += len(data)
    return real(fd, data, offset)

  monkeypatch.setattr(os, "pwrite", pwrite)


def test_disk_full_is_one_line_keeps_finished_parts_and_resumes(data, tmp_path, calls,
                                                               monkeypatch):
  out = tmp_path / "o" / "r.h5"
  out.parent.mkdir()
  _no_space_after(monkeypatch, out.parent, 14_000)   # the first part fits, not the second
  with pytest.raises(OutputError) as e:
    runner.fit_file(data, str(out), TINY_CFG, guide="gt", batch_size=1)
  _one_line(e, "r.h5.parts", "no space left on device")
  kept = sorted(Path(runner.parts_dir(str(out))).iterdir())
  assert [p.suffix for p in kept] == [".h5"] and not out.exists()   # no temporary file
  assert sorted(p.name for p in out.parent.iterdir()) == ["r.h5.parts"]   # nor lock
  monkeypatch.undo()                                 # space again
  monkeypatch.setattr(fit, "fit_batch", _stand_in(calls))
  calls.clear()
  res = runner.fit_file(data, str(out), TINY_CFG, guide="gt", batch_size=1)
  assert calls == [1, 1] and len(res["skipped"]) == 1
  assert hdf5.list_keys(str(out)) == hdf5.list_keys(data)


def test_stale_temporaries_are_removed_on_the_next_run(data, tmp_path, calls):
  out = tmp_path / "r.h5"
  pdir = Path(runner.parts_dir(str(out)))
  pdir.mkdir()
  stale = [tmp_path / ".r.h5.dead01.tmp", pdir / ".part-p0-0123456789ab.h5.dead02.tmp"]
  for p in stale:
    p.write_bytes(b"\0" * 100)
  runner.fit_file(data, str(out), TINY_CFG, guide="gt", batch_size=3)
  assert not any(p.exists() for p in stale)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5", "r.h5"]


def test_one_run_per_out_unless_several_processes_share_it(data, tmp_path, calls):
  out = str(tmp_path / "r.h5")
  with runner.run_lock(out):                       # as another fit_sequences.py would
    with pytest.raises(InputError) as e:
      runner.fit_file(data, out, TINY_CFG, guide="gt")
    _one_line(e, out, "another process is fitting into this file")
  assert calls == []
  # The processes of one multi-process run share it; two process 0s do not.
  with runner.run_lock(out, 1, 2):
    runner.fit_file(data, out, TINY_CFG, guide="gt", process_index=0, process_count=2,
                    merge_results=False)
    with runner.run_lock(out, 0, 2):
      pass
    with pytest.raises(InputError, match="another process"):
      runner.fit_file(data, out, TINY_CFG, guide="gt", process_index=1, process_count=2,
                      merge_results=False)
    with pytest.raises(InputError, match="another process"):
      runner.fit_file(data, out, TINY_CFG, guide="gt")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5", "r.h5.parts"]


def test_read_only_out_folder_fails_before_fitting(data, tmp_path, calls, monkeypatch):
  ro = tmp_path / "ro"
  ro.mkdir()
  real = os.open

  def no_write(path, flags, *a, **kw):
    if str(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real(path, flags, *a, **kw)

  monkeypatch.setattr(os, "open", no_write)
  with pytest.raises(OutputError) as e:
    runner.fit_file(data, str(ro / "r.h5"), TINY_CFG, guide="gt", skip_bad=True)
  _one_line(e, ro / "r.h5", "permission denied")
  assert calls == []


@pytest.mark.parametrize("kw,words", [
    (dict(batch_size=-1), "batch_size must be an integer >= 1, got -1"),
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(size=7), "size must be >= 16"),
    (dict(size=-4), "size must be >= 16"),
    (dict(init="pred"), "init must be one of"),
    (dict(process_index=2, process_count=2), "process_index must be in 0..1"),
])
def test_bad_run_settings_are_refused_before_any_work(data, tmp_path, calls, kw, words):
  out = tmp_path / "r.h5"
  with pytest.raises(InputError) as e:
    runner.fit_file(data, str(out), TINY_CFG, guide="gt", **kw)
  _one_line(e, words)
  assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


@pytest.mark.parametrize("kw,words", [
    (dict(steps=0), "FitConfig.steps must be an integer >= 1, got 0"),
    (dict(dt=0.0), "FitConfig.dt must be a finite number > 0"),
    (dict(dt=-0.1), "FitConfig.dt must be a finite number > 0"),
    (dict(lr=float("nan")), "FitConfig.lr"),
    (dict(sigma=-1.0), "FitConfig.sigma"),
    (dict(jdet_margin=-0.1), "FitConfig.jdet_margin must be a finite number >= 0"),
    (dict(jdet_margin=1.0), "FitConfig.jdet_margin must be below 1"),
    (dict(clip_norm=0.0), "FitConfig.clip_norm"),
    (dict(solver="rk9"), "FitConfig.solver"),
    (dict(t_bucket=0), "FitConfig.t_bucket"),
])
def test_bad_fit_config_is_refused(kw, words):
  with pytest.raises(ValueError) as e:
    fit.FitConfig(**kw)
  _one_line(e, words)


def test_cli_bad_flag_is_one_line_before_any_work(data, tmp_path):
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "fit_sequences.py"),
                      f"--data={data}", f"--out={tmp_path / 'r.h5'}", "--guide=gt",
                      "--config.dt=0"],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert lines == ["error: --config.dt must be a finite number > 0, got 0.0"], r.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


def _bad_cases():
  s = synthetic.make_sequence(9, size=32, num_frames=4)[0]
  gt7 = s.gt.copy()
  gt7[1, 3, 3] = 7
  mixed = s.gt.copy()
  mixed[2, :4] = 255
  empty = s.gt.copy()
  empty[0] = 0
  return [
      ("2d img", dict(img=s.img[0], gt=None), {}, "img must be (T, H, W)"),
      ("es_index 2.5", {}, dict(es_index=2.5), "es_index must be an integer, got 2.5"),
      ("es_index text", {}, dict(es_index="last"), "es_index must be an integer"),
      ("tiny frames", dict(img=s.img[:, :8, :8], gt=s.gt[:, :8, :8]), {},
       "frames of 8x8 pixels are too small"),
      ("img x255", dict(img=s.img * 255), {}, "img values span"),
      ("gt label 7 mid-sequence", dict(gt=gt7), {}, "gt has labels outside 0..3 and 255: [7]"),
      ("gt frame half annotated", dict(gt=mixed), {}, "gt frame 2 mixes 255"),
      ("empty ED mask", dict(gt=empty), {}, "ED frame 0 has no LV cavity"),
      ("float gt", dict(gt=s.gt.astype(np.float32) + 0.25), {}, "gt has dtype float32"),
  ]


@pytest.mark.parametrize("name,arrays,attrs,words", _bad_cases(), ids=[c[0] for c in
                                                                       _bad_cases()])
def test_bad_input_names_the_file_and_skip_bad_skips_it(tmp_path, calls, name, arrays, attrs,
                                                        words):
  s = synthetic.make_sequence(9, size=32, num_frames=4)[0]
  bad = hdf5.Sequence("bad", "4CH", arrays.get("img", s.img), arrays.get("gt", s.gt),
                      {**s.attrs, **attrs})
  path = tmp_path / "data.h5"
  with h5py.File(path, "w") as f:
    hdf5.write_sequence(f, _seq(0))
    if "gt" in arrays and arrays["gt"] is not None and arrays["gt"].dtype != np.uint8:
      bad_gt = arrays["gt"]
      hdf5.write_sequence(f, hdf5.Sequence("bad", "4CH", bad.img, None, bad.attrs))
      f["bad/4CH"].create_dataset("gt", data=bad_gt)
    else:
      hdf5.write_sequence(f, bad)
  with pytest.raises(InputError) as e:
    runner.fit_file(str(path), str(tmp_path / "r.h5"), TINY_CFG, guide="gt")
  _one_line(e, path, "bad/4CH", words)
  res = runner.fit_file(str(path), str(tmp_path / "r.h5"), TINY_CFG, guide="gt",
                        skip_bad=True)
  assert res["fitted"] == ["p0/4CH"] and len(res["bad"]) == 1 and words in res["bad"][0]


def test_a_bad_segmentation_label_names_the_segmentation_file(data, tmp_path, calls):
  seg = tmp_path / "seg.h5"
  with h5py.File(data) as d, h5py.File(seg, "w") as f:
    for k in hdf5.list_keys(data):
      pred = d[k]["gt"][...].copy()
      if k == "p1/4CH":
        pred[0, 5, 5] = 7
      f.create_dataset(f"{k}/pred", data=pred)
  with pytest.raises(InputError) as e:
    runner.fit_file(data, str(tmp_path / "r.h5"), TINY_CFG, guide="segmenter",
                    segmentation=str(seg))
  msg = _one_line(e, "p1/4CH", "labels outside 0..3: [7]")
  assert msg.startswith(str(seg)) and "data.h5" not in msg
