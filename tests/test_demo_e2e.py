"""End-to-end smoke test of experiments/demo.py at a tiny size (32^2, 2 sequences)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py

from echo_ode_jax import reports
from echo_ode_jax.data import hdf5

ROOT = Path(__file__).resolve().parents[1]
FILES = ("data.h5", "train_edes.h5", "unet_pred.h5", "echo_ode.h5", "ground_truth.h5",
         "metrics.csv",
         "summary.json", "table.md", "fig2_contours.png", "fig3b_lv_length.png",
         "fig4_deformation.png", "demo_config.json")
ARGS = ["--num=2", "--size=32", "--frames=4", "--steps=2", "--seg_steps=2", "--num_train=4"]


def _demo(out, *extra):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)   # one CPU device, as on the command line
  return subprocess.run([sys.executable, str(ROOT / "experiments" / "demo.py"), *ARGS,
                         f"--out={out}", *extra], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=900)


def _table(text):
  lines = [l for l in text.strip().splitlines() if l.startswith("|")]
  return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


def test_demo_end_to_end(tmp_path):
  out = tmp_path / "demo"
  r = _demo(out)
  assert r.returncode == 0, r.stderr[-3000:]
  for name in FILES:
    assert (out / name).exists() and os.path.getsize(out / name) > 0, name
  rows = _table((out / "table.md").read_text())
  assert rows[0][:6] == ["Method", "HD (mm)", "Temp. Error", "mDice", "Dice endo", "Dice epi"]
  assert [r[0] for r in rows[2:]] == ["ground truth", "U-Net (2D)", "Echo-ODE (U-Net guide)"]
  assert rows[2][3:6] == ["1.000", "1.000", "1.000"]         # the truth scores itself exactly
  for row in rows[2:]:
    assert len(row) == len(rows[0])
    assert row[-1] == "0 / 2"                               # no failed sequence
    assert 0.0 <= float(row[3]) <= 1.0                      # mDice parses
  # Echo-ODE starts from the ED ground truth and phi_0 = id: its ED frame is exact.
  for key in hdf5.list_keys(out / "data.h5"):
    gt = hdf5.read_sequence(out / "data.h5", key).gt
    assert (hdf5.read_labels(out / "echo_ode.h5", key)[0] == gt[0]).all()
  with open(out / "metrics.csv") as f:
    csv_rows = list(csv.DictReader(f))
  assert len(csv_rows) == 6 and {r["status"] for r in csv_rows} == {"ok"}
  summ = reports.read_summaries(out / "summary.json")
  assert summ["Echo-ODE (U-Net guide)"]["n_ok"] == 2
  assert summ["Echo-ODE (U-Net guide)"]["flow_n"] == 2       # flows stored and scored
  for key in hdf5.list_keys(out / "echo_ode.h5"):           # --velocity_stride's default
    with h5py.File(out / "echo_ode.h5", "r") as f:
      assert json.loads(f[key].attrs["config"])["velocity_stride"] == 2
  assert "wall time" in r.stdout and _table(r.stdout) == rows

  # A rerun with the same settings resumes (every stage done); other settings are refused.
  r2 = _demo(out)
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert "done already" in r2.stderr
  r3 = _demo(out, "--seed=1")
  assert r3.returncode == 2 and "other settings" in r3.stderr
  json.loads((out / "demo_config.json").read_text())
