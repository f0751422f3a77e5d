"""experiments/evaluate.py on a hand-made data / prediction pair with known scores."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from echo_ode_jax import reports

ROOT = Path(__file__).resolve().parents[1]
T, S = 5, 40
SHIFT = 2


def _labels():
  """(T, S, S): an LV rectangle (label 1) shrinking by one row/col per side per frame,
  inside a myocardium frame (label 2) of width 3, and an LA (label 3) below.

  Frame t: LV rows [8+t, 26-t), cols [12+t, 28-t) -> (18-2t) x (16-2t).
  """
  gt = np.zeros((T, S, S), np.uint8)
  for t in range(T):
    r0, r1, c0, c1 = 8 + t, 26 - t, 12 + t, 28 - t
    gt[t, r0 - 3:r1, c0 - 3:c1 + 3] = 2      # open at the bottom: the base
    gt[t, r0:r1, c0:c1] = 1
    gt[t, r1:r1 + 6, c0:c1] = 3
  return gt


def _write(path, key_arrays, dataset, attrs=True):
  with h5py.File(path, "w") as f:
    for key, arr in key_arrays.items():
      g = f.require_group(key)
      g.create_dataset(dataset, data=arr)
      if dataset == "gt":
        g.create_dataset("img", data=(arr > 0).astype(np.float32) * 0.5)
      if attrs:
        g.attrs["voxelspacing"] = np.array([0.5, 0.5])
        g.attrs["ed_index"] = 0
        g.attrs["es_index"] = T - 1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("eval")
  gt = _labels()
  shifted = np.zeros_like(gt)
  shifted[:, :, SHIFT:] = gt[:, :, :-SHIFT]        # every label moved 2 columns right
  _write(d / "data.h5", {"p1/4CH": gt, "p2/4CH": gt}, "gt")
  _write(d / "same.h5", {"p1/4CH": gt, "p2/4CH": gt}, "pred")
  _write(d / "shift.h5", {"p1/4CH": shifted, "p2/4CH": shifted}, "pred")
  return d


def _run(*args):
  return subprocess.run([sys.executable, str(ROOT / "experiments" / "evaluate.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)


def _expected_shift_dice():
  """Dice of a w-wide block against itself moved by SHIFT columns: (w - s) / w, per frame.

  Endo: the LV (16 - 2t wide). Epi: LV + myocardium (22 - 2t wide, 21 - 2t
  high; the LA below does not count).
  """
  endo = np.mean([(16 - 2 * t - SHIFT) / (16 - 2 * t) for t in range(T)])
  epi = np.mean([(22 - 2 * t - SHIFT) / (22 - 2 * t) for t in range(T)])
  return endo, epi


def test_evaluate_cli_identity_and_shift(files, tmp_path):
  out = tmp_path / "report"
  r = _run(f"--data={files / 'data.h5'}", f"--pred={files / 'same.h5'},{files / 'shift.h5'}",
           "--name=identical,shifted", f"--out={out}", "--figures")
  assert r.returncode == 0, r.stderr[-2000:]
  for name in ("metrics.csv", "summary.json", "table.md", "fig2_contours.png",
               "fig3b_lv_length.png"):
    assert os.path.getsize(out / name) > 0, name
  assert not (out / "fig4_deformation.png").exists()   # no stored flow
  summ = reports.read_summaries(out / "summary.json")
  same, shift = summ["identical"], summ["shifted"]
  assert same["n_ok"] == shift["n_ok"] == 2
  assert same["mdice"] == pytest.approx(1.0)
  assert same["dice_endo"] == pytest.approx(1.0)
  assert same["ef_area_mae"] == pytest.approx(0.0, abs=1e-12)
  # Translation changes neither areas nor Simpson volumes: EF error stays 0.
  assert shift["ef_area_mae"] == pytest.approx(0.0, abs=1e-12)
  assert shift["ef_simpson_mae"] == pytest.approx(0.0, abs=1e-9)
  endo, epi = _expected_shift_dice()
  assert shift["dice_endo"] == pytest.approx(endo, abs=1e-9)
  assert shift["dice_epi"] == pytest.approx(epi, abs=1e-9)
  assert shift["mdice"] < 1.0
  # The frame-to-frame HD is translation invariant too.
  assert shift["hd_mean"] == pytest.approx(same["hd_mean"])

  with open(out / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["key"]) for r in rows] == [
      ("identical", "p1/4CH"), ("identical", "p2/4CH"),
      ("shifted", "p1/4CH"), ("shifted", "p2/4CH")]
  assert all(r["status"] == "ok" for r in rows)
  assert float(rows[2]["dice_endo"]) == pytest.approx(endo, abs=1e-9)

  # The Markdown table: a header, a separator and one row per method.
  table = (out / "table.md").read_text().strip().splitlines()
  assert len(table) == 4
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
  head = cells[0]
  assert head[:6] == ["Method", "HD (mm)", "Temp. Error", "mDice", "Dice endo", "Dice epi"]
  assert cells[2][0] == "identical" and float(cells[2][3]) == 1.0
  assert cells[3][0] == "shifted" and float(cells[3][4]) == pytest.approx(endo, abs=5e-4)
  assert cells[2][head.index("EF MAE area (%)")] == "0.0 ± 0.0"
  assert r.stdout.strip().splitlines() == table
  json.loads((out / "summary.json").read_text())   # strict JSON (no NaN)


def test_evaluate_cli_missing_sequence_and_bad_input(files, tmp_path):
  part = files / "part.h5"
  _write(part, {"p1/4CH": _labels()}, "pred")
  out = tmp_path / "r"
  r = _run(f"--data={files / 'data.h5'}", f"--pred={part}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-2000:]
  s = reports.read_summaries(out / "summary.json")["part"]   # default name: file stem
  assert (s["n_ok"], s["n_missing"], s["failed_keys"]) == (1, 1, ["p2/4CH"])

  r = _run(f"--data={files / 'data.h5'}", f"--pred={files / 'nope.h5'}", f"--out={out}")
  assert r.returncode == 2
  err = r.stderr.strip().splitlines()
  assert err[-1].startswith("error: ") and "nope.h5: file does not exist" in err[-1]

  r = _run(f"--data={files / 'data.h5'}", f"--pred={part}", "--name=a,b", f"--out={out}")
  assert r.returncode == 2 and "--name: 2 names for 1 --pred files" in r.stderr


def test_evaluate_cli_splits_restrict_to_one_part(files, tmp_path):
  """--splits/--split: only the valid patients count, so a prediction of just
  them has no missing (failed) sequence; without it, p2 is missing."""
  part = tmp_path / "valid_only.h5"
  _write(part, {"p2/4CH": _labels()}, "pred")
  spl = tmp_path / "splits.json"
  spl.write_text(json.dumps({"train": ["p1"], "valid": ["p2"]}))
  r = _run(f"--data={files / 'data.h5'}", f"--pred={part}", f"--out={tmp_path / 'a'}",
           f"--splits={spl}")
  assert r.returncode == 0, r.stderr[-2000:]
  summ = reports.read_summaries(tmp_path / "a" / "summary.json")["valid_only"]
  assert summ["n_ok"] == 1 and summ["n_missing"] == 0 and summ["dice_endo"] == pytest.approx(1.0)
  r = _run(f"--data={files / 'data.h5'}", f"--pred={part}", f"--out={tmp_path / 'b'}",
           f"--splits={spl}", "--split=train")
  summ = reports.read_summaries(tmp_path / "b" / "summary.json")["valid_only"]
  assert summ["n_ok"] == 0 and summ["n_missing"] == 1
  r = _run(f"--data={files / 'data.h5'}", f"--pred={part}", f"--out={tmp_path / 'c'}",
           f"--splits={tmp_path / 'nope.json'}")
  assert r.returncode != 0 and "nope.json" in r.stderr and "Traceback" not in r.stderr
