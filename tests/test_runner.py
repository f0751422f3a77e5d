"""File-level fitting: results layout, resume after an interruption, bad input."""
import h5py
import numpy as np
import pytest

from echo_ode_jax import fit, metrics, overrides, runner, tables
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


@pytest.fixture(scope="module")
def seg_files(tmp_path_factory):
  """A sequence with one frame after ES, and a segmentation differing from its gt."""
  d = tmp_path_factory.mktemp("sources")
  s = synthetic.make_sequence(7, size=32, num_frames=6)[0]
  attrs = dict(s.attrs, es_index=4)            # frame 5 comes after ES
  pred = np.roll(s.gt, 3, axis=2)              # a "segmenter" 3 px to the right
  with h5py.File(d / "data.h5", "w") as f:
    hdf5.set_root_attrs(f, 32)
    hdf5.write_sequence(f, hdf5.Sequence("p", "4CH", s.img, s.gt, attrs))
  with h5py.File(d / "seg.h5", "w") as f:
    f.create_dataset("p/4CH/pred", data=pred)
  return str(d / "data.h5"), str(d / "seg.h5"), s, pred


def test_load_inputs_takes_each_mask_from_its_source(seg_files):
  data, seg, s, pred = seg_files
  a = runner.load_inputs(data, "p/4CH", init="gt", guide="segmenter", segmentation=seg)
  np.testing.assert_array_equal(a.images, s.img[:5])       # ED .. ES only
  np.testing.assert_array_equal(a.m0, s.gt[0])
  np.testing.assert_array_equal(a.guide_es, pred[4])
  np.testing.assert_array_equal(a.guide_ed, pred[0])
  b = runner.load_inputs(data, "p/4CH", init="segmenter", guide="gt", segmentation=seg)
  np.testing.assert_array_equal(b.m0, pred[0])
  np.testing.assert_array_equal(b.guide_es, s.gt[4])
  np.testing.assert_array_equal(b.guide_ed, s.gt[0])
  c = runner.load_inputs(data, "p/4CH", init="gt", guide="none")
  assert c.guide_es is None and c.guide_ed is None
  # Upsampling x2 with pixel centres aligned is nearest-neighbour repetition.
  up = runner.load_inputs(data, "p/4CH", init="gt", guide="gt", size=64)
  np.testing.assert_array_equal(up.m0, np.repeat(np.repeat(s.gt[0], 2, 0), 2, 1))
  np.testing.assert_array_equal(up.guide_es, np.repeat(np.repeat(s.gt[4], 2, 0), 2, 1))
  assert up.images.shape == (5, 64, 64) and up.data_shape == (32, 32)


@pytest.mark.parametrize("data_grid_masks", [True, False])
def test_fit_at_another_size_writes_pred_on_the_data_grid(seg_files, tmp_path,
                                                          data_grid_masks):
  """--size=16 on 32^2 data, ES before the last frame: pred has the ED..ES frames
  on the data grid, flow stays on the fitted grid, and phi_0 is the identity:
  pred[0] is the data's own ED mask when m_0 is warped on the data grid, the
  nearest-upsampled 16^2 mask otherwise."""
  data, _, s, _ = seg_files
  out = str(tmp_path / "res.h5")
  cfg = TINY_CFG.replace(data_grid_masks=data_grid_masks)
  res = runner.fit_file(data, out, cfg, guide="gt", size=16, save_flow=True)
  assert res["fitted"] == ["p/4CH"]
  m0_16 = runner.load_inputs(data, "p/4CH", size=16).m0
  with h5py.File(out) as f:
    g = f["p/4CH"]
    assert g["pred"].shape == (5, 32, 32) and g.attrs["num_frames"] == 5
    assert g["flow"].shape == (5, 16, 16, 2)
    assert list(g.attrs["fit_size"]) == [16, 16]
    grid = np.stack(np.meshgrid(np.arange(16.0), np.arange(16.0), indexing="ij"), -1)
    np.testing.assert_allclose(g["flow"][0], grid, atol=1e-5)
    want = s.gt[0] if data_grid_masks else np.repeat(np.repeat(m0_16, 2, 0), 2, 1)
    np.testing.assert_array_equal(g["pred"][0], want)
    assert not np.array_equal(s.gt[0], np.repeat(np.repeat(m0_16, 2, 0), 2, 1))
  # Evaluation compares the ED..ES frames (the data has one more).
  row = metrics.evaluate_files(data, out)[0]
  assert row["status"] == "ok" and row["n_frames"] == 5
  with h5py.File(out) as f:
    pred = f["p/4CH/pred"][...]
  dice = [2 * np.sum((p == 1) & (g == 1)) / (np.sum(p == 1) + np.sum(g == 1))
          for p, g in zip(pred, s.gt[:5])]
  assert row["dice_endo"] == pytest.approx(np.mean(dice), rel=1e-6)


def test_labels_fused_ensemble_writes_its_members_maps(seg_files, tmp_path):
  """ensemble_fusion "labels" at --size=16 on 32^2 data: member_flow holds both
  members' maps on the fitted grid, each the identity at ED, and pred (on the
  data grid, fused through them) starts from the data's own ED mask."""
  data, _, s, _ = seg_files
  out = str(tmp_path / "res.h5")
  cfg = TINY_CFG.replace(ensemble=2, ensemble_fusion="labels")
  assert runner.fit_file(data, out, cfg, guide="gt", size=16, save_flow=True)["fitted"]
  with h5py.File(out) as f:
    g = f["p/4CH"]
    assert g["member_flow"].shape == (2, 5, 16, 16, 2) and g["flow"].shape == (5, 16, 16, 2)
    grid = np.stack(np.meshgrid(np.arange(16.0), np.arange(16.0), indexing="ij"), -1)
    np.testing.assert_allclose(g["member_flow"][:, 0], np.stack([grid] * 2), atol=1e-5)
    assert not np.allclose(g["member_flow"][0, -1], g["member_flow"][1, -1])
    np.testing.assert_array_equal(g["pred"][0], s.gt[0])
  row = metrics.evaluate_files(data, out)[0]
  assert row["status"] == "ok" and 0.0 <= row["fold_frac"] < 0.5


def test_rerun_with_other_settings_is_refused_not_mixed(data_file, tmp_path):
  """A finished result is reused only by a rerun with the same settings; a rerun
  that differs in a setting that changes the fit is a one-line error naming it."""
  out = str(tmp_path / "res.h5")
  first = hdf5.list_keys(data_file)[0].split("/")[0]
  runner.fit_file(data_file, out, TINY_CFG, guide="gt", patients=[first], batch_size=1)
  with h5py.File(out) as f:
    stamp = f[hdf5.list_keys(out)[0]]["pred"][...]
  cases = [
      (dict(cfg=TINY_CFG, guide="none"), "guide='gt' (now 'none')"),
      (dict(cfg=TINY_CFG.replace(steps=4), guide="gt"), "steps=3 (now 4)"),
      (dict(cfg=TINY_CFG.replace(model=TINY_CFG.model.replace(use_spade=False)), guide="gt"),
       "model.use_spade=True (now False)"),
      (dict(cfg=TINY_CFG, guide="gt", size=16), "size=0 (now 16)"),
  ]
  for kw, words in cases:
    cfg = kw.pop("cfg")
    with pytest.raises(InputError) as e:
      runner.fit_file(data_file, out, cfg, patients=[first], batch_size=1, **kw)
    msg = str(e.value)
    assert "\n" not in msg and out in msg and words in msg, msg
  # A result written by a version whose config had the flags that only chose how
  # the fit ran (since removed) resumes, and log_every may change.
  import json as _json
  with h5py.File(out, "r+") as f:
    attrs = f[hdf5.list_keys(out)[0]].attrs
    old = _json.loads(attrs["config"])
    old.update(xla_cpu_ynn=True, scan_steps=3)
    old["model"].update(conv_impl="split", fused_norm=False, subpixel_up=False,
                        split_gamma_beta=True, row_sums=False)
    attrs["config"] = _json.dumps(old, sort_keys=True)
  res = runner.fit_file(data_file, out, TINY_CFG.replace(log_every=1),
                        guide="gt", patients=[first], batch_size=1)
  assert res["fitted"] == [] and len(res["skipped"]) == 1
  with h5py.File(out) as f:
    np.testing.assert_array_equal(f[hdf5.list_keys(out)[0]]["pred"][...], stamp)
  # The table stages check the same way when every sequence is done.
  one = str(tmp_path / "one.h5")
  with h5py.File(data_file) as src, h5py.File(one, "w") as dst:
    for a, v in src.attrs.items():
      dst.attrs[a] = v
    src.copy(src[first], dst, name=first)
  out2 = str(tmp_path / "stage.h5")
  runner.fit_file(one, out2, TINY_CFG, guide="gt", batch_size=1)
  tables.fit_stage(one, out2, TINY_CFG, "gt", "gt", None, batch_size=1)   # done: no error
  with pytest.raises(InputError, match="steps=3 \\(now 4\\)"):
    tables.fit_stage(one, out2, TINY_CFG.replace(steps=4), "gt", "gt", None, batch_size=1)


def test_results_from_before_data_grid_masks_count_as_nearest_resized():
  """A result whose config does not record data_grid_masks was written with
  fit-grid masks nearest-resized: a rerun with the default (data-grid masks)
  must not reuse it, one without must."""
  import json as _json
  cfg = fit.FitConfig()
  old = _json.loads(cfg.to_json())
  del old["data_grid_masks"]
  attrs = {"config": _json.dumps(old)}
  assert runner.settings_diff(attrs, cfg, {}) == ["data_grid_masks=False (now True)"]
  assert runner.settings_diff(attrs, cfg.replace(data_grid_masks=False), {}) == []


def test_results_from_before_a_new_field_count_as_its_default():
  """A field added later (jdet_margin) that a saved config lacks was run at its
  default: a rerun at the default reuses the result, one with another value
  does not, in the resume check and in an ablation's row matching alike."""
  import json as _json
  cfg = fit.FitConfig()
  old = _json.loads(cfg.to_json())
  del old["jdet_margin"]
  old["scan_steps"] = 8                     # a field since removed: not compared
  attrs = {"config": _json.dumps(old)}
  assert runner.settings_diff(attrs, cfg, {}) == []
  assert runner.settings_diff(attrs, cfg.replace(jdet_margin=0.1), {}) == [
      "jdet_margin=0.0 (now 0.1)"]
  assert overrides.same_config(old, cfg)
  assert not overrides.same_config(old, cfg.replace(jdet_margin=0.1))
