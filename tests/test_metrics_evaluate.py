"""evaluate_sequence / evaluate_files / summarize / table_markdown on synthetic files."""
import math

import h5py
import numpy as np
import pytest

from echo_ode_jax import metrics
from echo_ode_jax.errors import InputError

SPACING = (0.5, 0.5)


def _frame(shape, a, b, shift_c=0.0):
  """Half-ellipse LV (apex up, mm), myocardium open at the base, LA below."""
  r, c = np.meshgrid(np.arange(shape[0]) * SPACING[0], np.arange(shape[1]) * SPACING[1],
                     indexing="ij")
  s, w = 40.0 - r, c - 20.0 - shift_c
  lv = (s >= 0) & ((s / a) ** 2 + (w / b) ** 2 <= 1)
  epi = (s >= 0) & ((s / (a + 4)) ** 2 + (w / (b + 4)) ** 2 <= 1)
  la = (s < 0) & (s > -10) & (np.abs(w) < b)
  return np.where(lv, 1, np.where(epi, 2, np.where(la, 3, 0))).astype(np.uint8)


def _sequence(n=6, shape=(100, 80), shift_c=0.0):
  return np.stack([_frame(shape, 30.0 - 6.0 * t / (n - 1), 10.0 - 2.0 * t / (n - 1), shift_c)
                   for t in range(n)])


def _identity_flow(t, h, w):
  r, c = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                     indexing="ij")
  return np.broadcast_to(np.stack([r, c], -1), (t, h, w, 2)).copy()


def _attrs(n):
  return {"voxelspacing": np.array(SPACING), "ed_index": 0, "es_index": n - 1}


def test_evaluate_sequence_perfect_prediction():
  gt = _sequence()
  gt[2] = 255
  pred = _sequence()
  flow = _identity_flow(*pred.shape)
  row = metrics.evaluate_sequence(pred, gt, _attrs(len(pred)), flow=flow)
  assert row["status"] == "ok" and row["n_annotated"] == 5
  for k in ("dice_endo", "dice_epi", "dice_myo", "mdice"):
    assert row[k] == 1.0
  assert row["ef_area_err"] == 0.0 and row["ef_simpson_err"] == 0.0
  # ED/ES half ellipses: area EF = 1 - (24*8)/(30*10), volume EF = 1 - (24*64)/(30*100).
  assert row["ef_area"] == pytest.approx(100 * (1 - 24 * 8 / 300), abs=1.0)
  assert row["ef_simpson"] == pytest.approx(100 * (1 - 24 * 64 / 3000), abs=2.0)
  assert row["fold_frac"] == 0.0 and row["jdet_min"] == pytest.approx(1.0)
  assert math.isfinite(row["hd"]) and row["hd_pairs"] == 5
  assert row["gt_hd_pairs"] == 3  # (0, 1), (3, 4), (4, 5)
  assert row["gt_temporal_error"] is None  # gt frame 2 is not annotated


def test_evaluate_sequence_pools_ensemble_members_maps():
  """(K, T, h, w, 2) members' maps (a labels-fused ensemble): the Jacobian
  statistics pool every member's pixels. The identity (det 1) and a
  reflection of the rows (det -1 everywhere, all folded) give half the
  pixels folded, min -1, mean 0."""
  pred = _sequence()
  ident = _identity_flow(*pred.shape)
  mirror = ident.copy()
  mirror[..., 0] = pred.shape[1] - 1 - mirror[..., 0]
  row = metrics.evaluate_sequence(pred, pred, _attrs(len(pred)), flow=np.stack([ident, mirror]))
  assert row["fold_frac"] == pytest.approx(0.5)
  assert row["jdet_min"] == pytest.approx(-1.0) and row["jdet_mean"] == pytest.approx(0.0)
  with pytest.raises(ValueError, match="flow shape"):
    metrics.evaluate_sequence(pred, pred, _attrs(len(pred)), flow=np.stack([ident[:-1]] * 2))


def test_evaluate_sequence_shifted_prediction_hd_and_dice():
  gt = _sequence()
  pred = gt.copy()
  pred[3] = np.roll(gt[3], 4, axis=1)  # one frame moved by 4 px = 2 mm sideways
  row = metrics.evaluate_sequence(pred, gt, _attrs(len(gt)))
  p3, g3 = pred[3] == 1, gt[3] == 1
  d3 = 2 * np.sum(p3 & g3) / (np.sum(p3) + np.sum(g3))     # the other frames: 1
  assert d3 < 0.99
  assert row["dice_endo"] == pytest.approx((len(gt) - 1 + d3) / len(gt), rel=1e-9)
  assert row["hd_endo"] > row["gt_hd_endo"]
  assert row["temporal_error"] and row["tc_epi_center_x"] > 0
  assert row["gt_temporal_error"] is False
  assert math.isnan(row["fold_frac"])


def test_evaluate_sequence_rejects_bad_input():
  seq = _sequence()
  with pytest.raises(ValueError, match="shape"):
    metrics.evaluate_sequence(seq, seq[:3], _attrs(len(seq)))
  with pytest.raises(ValueError, match="voxelspacing"):
    metrics.evaluate_sequence(seq, seq, {})
  with pytest.raises(ValueError, match="es_index"):
    metrics.evaluate_sequence(seq, seq, {**_attrs(len(seq)), "es_index": 99})


def _write_files(tmp_path):
  data, pred = tmp_path / "data.h5", tmp_path / "pred.h5"
  gt = _sequence()
  with h5py.File(data, "w") as f:
    for key in ("p1/4CH", "p2/4CH", "p3/4CH"):
      g = f.create_group(key)
      g["img"] = np.zeros(gt.shape, np.float32)
      g["gt"] = gt
      for k, v in _attrs(len(gt)).items():
        g.attrs[k] = v
  with h5py.File(pred, "w") as f:
    f["p1/4CH/pred"] = gt
    f["p1/4CH/flow"] = _identity_flow(*gt.shape)
    g = f.create_group("p2/4CH")
    g.attrs["status"] = "failed"
    g.attrs["reason"] = "nan loss"
    f["p9/4CH/pred"] = gt  # not in the data file: ignored
  return data, pred


def test_evaluate_files_counts_failed_and_missing(tmp_path):
  data, pred = _write_files(tmp_path)
  rows = metrics.evaluate_files(data, pred)
  assert [(r["key"], r["status"]) for r in rows] == [
      ("p1/4CH", "ok"), ("p2/4CH", "failed"), ("p3/4CH", "missing")]
  assert rows[0]["mdice"] == 1.0 and rows[0]["fold_frac"] == 0.0
  assert rows[1]["reason"] == "nan loss"
  s = metrics.summarize(rows)
  assert (s["n_sequences"], s["n_ok"], s["n_failed"], s["n_missing"]) == (3, 1, 1, 1)
  assert s["failed_keys"] == ["p2/4CH", "p3/4CH"]
  assert s["ef_area_mae"] == 0.0 and s["mdice"] == 1.0
  table = metrics.table_markdown({"Echo-ODE": s})
  lines = table.strip().splitlines()
  assert len(lines) == 6 and "HD (mm)" in lines[0] and "Temp. Error" in lines[0]
  assert lines[2].startswith("| Echo-ODE |") and lines[2].rstrip().endswith("| 2 / 3 |")
  # Below the table: which sequences failed or are missing, and why.
  assert lines[3:] == ["", "Failed or missing sequences:",
                       "- Echo-ODE: p2/4CH (failed: nan loss); p3/4CH (missing: no pred group)"]
  only = metrics.evaluate_files(data, pred, keys=["p1/4CH"])
  assert len(only) == 1 and only[0]["status"] == "ok"


def test_evaluate_files_errors(tmp_path):
  data, pred = _write_files(tmp_path)
  with pytest.raises(InputError, match="does not exist"):
    metrics.evaluate_files(tmp_path / "nope.h5", pred)
  with pytest.raises(InputError, match="no group"):
    metrics.evaluate_files(data, pred, keys=["p7/4CH"])
  with h5py.File(pred, "a") as f:
    del f["p1/4CH/pred"]
    f["p1/4CH/pred"] = np.zeros((2, 5, 5), np.uint8)
  with pytest.raises(InputError, match="p1/4CH: pred shape"):
    metrics.evaluate_files(data, pred)


def test_summarize_hand_computed():
  rows = [
      {"key": "a", "status": "ok", "hd": 1.0, "ef_area_err": 1.0, "temporal_error": True,
       "mdice": 0.9},
      {"key": "b", "status": "ok", "hd": 2.0, "ef_area_err": 3.0, "temporal_error": False,
       "mdice": 0.8},
      {"key": "c", "status": "ok", "hd": 3.0, "ef_area_err": float("nan"),
       "temporal_error": True, "mdice": 0.7},
      {"key": "d", "status": "ok", "hd": float("inf"), "temporal_error": False},
      {"key": "e", "status": "failed"},
  ]
  s = metrics.summarize(rows)
  assert s["hd_mean"] == pytest.approx(2.0) and s["hd_sd"] == pytest.approx(1.0)
  assert s["hd_n"] == 3 and s["hd_nonfinite"] == 1
  assert s["ef_area_mae"] == pytest.approx(2.0) and s["ef_area_sd"] == pytest.approx(math.sqrt(2))
  assert s["ef_area_n"] == 2 and s["ef_area_undefined"] == 2   # c: nan, d: none
  assert s["temporal_errors"] == 2 and s["n_failed"] == 1 and s["n_ok"] == 4
  assert s["mdice"] == pytest.approx(0.8)
  row = metrics.table_markdown({"m": s}).splitlines()[2]
  assert "2.0 ± 1.0 (1 inf)" in row and "2 / 4" in row and "0.800" in row
  assert "| 2.0 ± 1.4 (2 n/a) |" in row                 # EF left out, and said so


def test_evaluate_sequence_on_synthetic_ground_truth():
  synthetic = pytest.importorskip("echo_ode_jax.data.synthetic")
  seq, phi = synthetic.make_sequence(1, size=96)
  row = metrics.evaluate_sequence(seq.gt, seq.gt, seq.attrs, flow=phi)
  # The generator sets the LV-area EF analytically; the true maps never fold.
  assert row["ef_area"] == pytest.approx(100 * seq.attrs["ef_true"], abs=1.5)
  assert row["fold_frac"] == 0.0 and row["jdet_min"] > 0
  assert row["mdice"] == 1.0 and row["hd"] == pytest.approx(row["gt_hd"])
