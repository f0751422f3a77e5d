"""Evaluation of bad predictions and ground truths: one clear error, or a failed
row with its reason, never a silently wrong number."""
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from echo_ode_jax import metrics
from echo_ode_jax.errors import InputError

from test_metrics_evaluate import _attrs, _sequence

REPO = Path(__file__).resolve().parents[1]


def _files(tmp_path, preds, gt=None):
  """data.h5 with one sequence per key of `preds` (gt: _sequence() unless given), pred.h5."""
  gt = _sequence() if gt is None else gt
  data, pred = tmp_path / "data.h5", tmp_path / "pred.h5"
  with h5py.File(data, "w") as f:
    for key in preds:
      g = f.create_group(key)
      g["img"] = np.zeros(gt.shape, np.float32)
      g["gt"] = gt
      for k, v in _attrs(len(gt)).items():
        g.attrs[k] = v
  with h5py.File(pred, "w") as f:
    for key, p in preds.items():
      f[f"{key}/pred"] = p
  return data, pred


def test_an_empty_prediction_is_a_failed_row_not_an_hd_of_zero(tmp_path):
  good = _sequence()
  data, pred = _files(tmp_path, {"a/4CH": good, "b/4CH": np.zeros_like(good)})
  rows = metrics.evaluate_files(data, pred)
  assert [r["status"] for r in rows] == ["ok", "failed"]
  assert rows[1]["reason"] == "pred has no LV cavity (label 1) in any frame"
  s = metrics.summarize(rows)
  assert s["hd_n"] == 1 and s["hd_mean"] == pytest.approx(rows[0]["hd"]) and rows[0]["hd"] > 0
  table = metrics.table_markdown({"m": s})
  assert "| 1 / 2 |" in table
  assert "- m: b/4CH (failed: pred has no LV cavity (label 1) in any frame)" in table


def test_an_undefined_ef_is_counted_in_the_table(tmp_path):
  p = _sequence()
  p[0][p[0] == 1] = 2                         # no LV at ED: EF undefined, HD inf
  data, pred = _files(tmp_path, {"a/4CH": _sequence(), "b/4CH": p})
  s = metrics.summarize(metrics.evaluate_files(data, pred))
  assert s["n_ok"] == 2 and s["ef_area_n"] == 1 and s["ef_area_undefined"] == 1
  assert s["ef_simpson_undefined"] == 1
  row = metrics.table_markdown({"m": s}).splitlines()[2]
  assert row.count("0.0 ± 0.0 (1 n/a)") == 2 and "(1 inf)" in row


@pytest.mark.parametrize("name,pred,words", [
    ("label 7", lambda p: np.where(p == 3, 7, p).astype(np.uint8),
     "pred has labels outside 0..3: [7]"),
    ("label 255", lambda p: np.where(p == 3, 255, p).astype(np.uint8),
     "pred has labels outside 0..3: [255]"),
    ("probabilities", lambda p: p.astype(np.float32) * 0.3, "pred has dtype float32"),
    ("integer floats", lambda p: p.astype(np.float64), "pred has dtype float64"),
    ("negative", lambda p: p.astype(np.int16) - 1, "pred has values outside 0..255"),
])
def test_a_pred_that_is_not_labels_is_an_error_naming_it(tmp_path, name, pred, words):
  data, path = _files(tmp_path, {"a/4CH": _sequence(), "b/4CH": pred(_sequence())})
  with pytest.raises(InputError) as e:
    metrics.evaluate_files(data, path)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"{path}: b/4CH: ") and words in msg, msg


@pytest.mark.parametrize("name,edit,words", [
    ("label 7 in a middle frame", lambda g: g[2].__setitem__((0, 0), 7),
     "gt has labels outside 0..3 and 255 (not annotated): [7]"),
    ("a half-annotated frame", lambda g: g[3].__setitem__(slice(0, 5), 255),
     "gt frame 3 mixes 255"),
    ("an annotated frame without LV", lambda g: g[1].__setitem__(g[1] == 1, 2),
     "gt frame 1 has no LV cavity"),
])
def test_a_bad_ground_truth_is_an_error_naming_the_data_file(tmp_path, name, edit, words):
  gt = _sequence()
  edit(gt)
  data, path = _files(tmp_path, {"a/4CH": _sequence()}, gt=gt)
  with pytest.raises(InputError) as e:
    metrics.evaluate_files(data, path)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"{data}: a/4CH: ") and words in msg, msg


def test_cli_out_naming_a_file_is_one_line(tmp_path):
  data, pred = _files(tmp_path, {"a/4CH": _sequence()})
  out = tmp_path / "report.txt"
  out.write_text("keep me")
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "evaluate.py"),
                      f"--data={data}", f"--pred={pred}", f"--out={out}"],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and str(out) in err[0] and "not a folder" in err[0]
  assert out.read_text() == "keep me"
