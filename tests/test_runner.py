"""File-level fitting: results layout, resume after an interruption, bad input."""
import h5py
import numpy as np
import pytest

from echo_ode_jax import fit, runner
from echo_ode_jax.data import hdf5, synthetic
from echo_ode_jax.errors import InputError

from test_fit import TINY_CFG


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("runner") / "data.h5"
  with h5py.File(path, "w") as f:
    hdf5.set_root_attrs(f, 32)
    for i, n in enumerate((6, 5, 7, 6, 6)):
      hdf5.write_sequence(f, synthetic.make_sequence(i, size=32, num_frames=n)[0])
  return str(path)


def test_resume_after_interruption_fits_each_sequence_once(data_file, tmp_path, monkeypatch):
  out = str(tmp_path / "res.h5")
  calls = []
  real = fit.fit_batch

  def flaky(seqs, cfg, **kw):
    if calls:                      # the second batch is "killed"
      raise KeyboardInterrupt
    calls.append(len(seqs))
    return real(seqs, cfg, **kw)

  monkeypatch.setattr(fit, "fit_batch", flaky)
  with pytest.raises(KeyboardInterrupt):
    runner.fit_file(data_file, out, TINY_CFG, guide="gt", batch_size=4)
  first = runner.finished_keys(out)
  assert len(first) == 4 and not (tmp_path / "res.h5").exists()   # parts only, not merged

  fitted_later = []
  def counting(seqs, cfg, **kw):
    fitted_later.append(len(seqs))
    return real(seqs, cfg, **kw)
  monkeypatch.setattr(fit, "fit_batch", counting)
  res = runner.fit_file(data_file, out, TINY_CFG, guide="gt", batch_size=4, save_flow=True)
  assert fitted_later == [1] and len(res["skipped"]) == 4
  keys = hdf5.list_keys(out)
  assert keys == hdf5.list_keys(data_file)
  assert not (tmp_path / "res.h5.parts").exists()
  with h5py.File(out) as f, h5py.File(data_file) as d:
    for k in keys:
      g = f[k]
      assert g["pred"].shape == d[k]["img"].shape and g["pred"].dtype == np.uint8
      assert g.attrs["status"] == "ok"
      np.testing.assert_array_equal(g["pred"][0], d[k]["gt"][0])   # phi_0 = id
  # A third run has nothing left to do.
  fitted_later.clear()
  res = runner.fit_file(data_file, out, TINY_CFG, guide="gt", batch_size=4)
  assert fitted_later == [] and len(res["skipped"]) == 5


def test_bad_input_is_one_line_naming_the_file(data_file, tmp_path):
  bad = str(tmp_path / "bad.h5")
  with h5py.File(bad, "w") as f:
    s = synthetic.make_sequence(0, size=32, num_frames=4)[0]
    hdf5.write_sequence(f, hdf5.Sequence("nomask", "4CH", s.img, None, s.attrs))
    one = dict(s.attrs, es_index=0)
    hdf5.write_sequence(f, hdf5.Sequence("short", "4CH", s.img[:1], s.gt[:1], one))
  for key, what in (("nomask/4CH", "no gt mask"), ("short/4CH", "at least 2 frames")):
    with pytest.raises(InputError) as e:
      runner.load_inputs(bad, key, init="gt", guide="gt")
    assert what in str(e.value) and "bad.h5" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(InputError, match="segmentation file"):
    runner.load_inputs(data_file, "synth0000/4CH", init="gt", guide="segmenter")
  with pytest.raises(InputError, match="patients not found"):
    runner.fit_file(data_file, str(tmp_path / "x.h5"), TINY_CFG, patients=["nobody"])
  res = runner.fit_file(bad, str(tmp_path / "y.h5"), TINY_CFG, guide="gt", skip_bad=True)
  assert len(res["bad"]) == 2 and res["fitted"] == []
