"""Ablation grids: parsing (hand-expanded), types, bad keys; resumable rows."""
import csv
import json
import os

import h5py
import numpy as np
import pytest

from echo_ode_jax import experiment
from echo_ode_jax.data import hdf5, synthetic
from echo_ode_jax.errors import InputError
from echo_ode_jax.fit import FitConfig


def test_grid_expands_to_the_cartesian_product_last_key_fastest():
  rows = experiment.parse_grid("lambda_ef=0,1;spade=true,false;solver=euler,heun")
  expect = [
      {"lambda_ef": 0.0, "spade": True, "solver": "euler"},
      {"lambda_ef": 0.0, "spade": True, "solver": "heun"},
      {"lambda_ef": 0.0, "spade": False, "solver": "euler"},
      {"lambda_ef": 0.0, "spade": False, "solver": "heun"},
      {"lambda_ef": 1.0, "spade": True, "solver": "euler"},
      {"lambda_ef": 1.0, "spade": True, "solver": "heun"},
      {"lambda_ef": 1.0, "spade": False, "solver": "euler"},
      {"lambda_ef": 1.0, "spade": False, "solver": "heun"},
  ]
  assert rows == expect
  assert all(type(r["lambda_ef"]) is float and type(r["spade"]) is bool for r in rows)
  assert list(rows[0]) == ["lambda_ef", "spade", "solver"]
  assert experiment.parse_grid("") == [{}]
  assert experiment.parse_grid(" steps = 5 ; dt=0.05 ") == [{"steps": 5, "dt": 0.05}]


def test_grid_values_take_the_field_type():
  (r,) = experiment.parse_grid("steps=7;lr=1e-3;pe=no;enc_channels=8-16-16-16;"
                               "model.spade_hidden=4;compute_dtype=bfloat16")
  assert r == {"steps": 7, "lr": 0.001, "pe": False, "enc_channels": (8, 16, 16, 16),
               "model.spade_hidden": 4, "compute_dtype": "bfloat16"}
  assert type(r["steps"]) is int
  cfg = experiment.apply_overrides(FitConfig(), r)
  assert (cfg.steps, cfg.lr, cfg.model.use_pe, cfg.model.enc_channels, cfg.model.spade_hidden,
          cfg.model.compute_dtype) == (7, 0.001, False, (8, 16, 16, 16), 4, "bfloat16")
  assert cfg.model.use_spade and cfg.lambda_ef == FitConfig().lambda_ef  # untouched


def test_aliases_map_to_model_fields():
  rows = experiment.parse_grid("spade=false;channels=8")
  cfg = experiment.apply_overrides(FitConfig(), rows[0])
  assert cfg.model.use_spade is False
  assert cfg.model.enc_channels == (8, 16, 16, 16)
  assert cfg.model.dec_channels == (16, 16, 16, 16, 16, 8, 8)
  # The paper's network is channels=16.
  paper = experiment.apply_overrides(FitConfig(), {"channels": 16})
  assert paper.model == FitConfig().model


@pytest.mark.parametrize("spec, words", [
    ("foo=1", ["unknown key 'foo'", "lambda_ef"]),
    ("lambda_ef=0;lambda_ef=1", ["given twice"]),
    ("spade=true;model.use_spade=false", ["given twice"]),
    ("steps=1.5", ["steps='1.5'", "int"]),
    ("spade=maybe", ["true or false"]),
    ("conv_impl=native", ["unknown key 'conv_impl'"]),      # how, not what: not a setting
    ("solver=rk9", ["unknown solver"]),
    ("dt=0", ["> 0"]),
    ("lambda_ef=", ["no values"]),
    ("lambda_ef", ["not key=v1,v2"]),
    ("model=1", ["unknown key 'model'"]),
])
def test_bad_grids_are_one_line_errors(spec, words):
  with pytest.raises(InputError) as e:
    experiment.parse_grid(spec)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("--grid: ")
  for w in words:
    assert w in msg


def test_base_config_and_row_ids():
  base = experiment.base_config("steps=3;lr=0.005")
  assert (base.steps, base.lr) == (3, 0.005)
  with pytest.raises(InputError, match="one value per key"):
    experiment.base_config("steps=3,4")
  o = {"lambda_ef": 0.0, "spade": True}
  a = experiment.row_id(o, experiment.apply_overrides(base, o))
  b = experiment.row_id(o, experiment.apply_overrides(FitConfig(), o))
  assert a.startswith("lambda_ef-0.0_spade-true_") and a != b   # other base -> other row
  assert experiment.row_label(o) == "lambda_ef=0.0 spade=true"


# ---------------------------------------------------------------------------
# Resume, with a stub fitter (no JAX fit): pred = gt shifted by lambda_ef pixels.


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  path = tmp_path_factory.mktemp("abl") / "data.h5"
  synthetic.make_dataset(path, 2, size=32, seed=3, num_frames=4, store_flow=False,
                         progress=False)
  return str(path)


class StubFit:
  def __init__(self):
    self.calls = []

  def __call__(self, data, out, cfg, **kw):
    self.calls.append((os.path.basename(os.path.dirname(out)), kw))
    shift = int(round(cfg.lambda_ef))
    with h5py.File(out, "w") as f:
      for key in hdf5.list_keys(data):
        seq = hdf5.read_sequence(data, key)
        g = f.require_group(key)
        g.create_dataset("pred", data=np.roll(seq.gt, shift, axis=2))
        g.attrs["status"] = "ok"
        g.attrs["seconds"] = 2.0 + shift
    return {}


def test_ablation_rows_resume_and_table(data, tmp_path):
  out = str(tmp_path / "abl")
  stub = StubFit()
  res = experiment.run_ablation(data, out, "lambda_ef=0,3", FitConfig(steps=2),
                                fit_fn=stub, batch_size=1)
  assert len(stub.calls) == 2 and [r["ran"] for r in res["rows"]] == [True, True]
  assert stub.calls[0][1]["save_flow"] is True and stub.calls[0][1]["batch_size"] == 1
  table = res["table"].strip().splitlines()
  assert len(table) == 4 and table[0].startswith("| lambda_ef | HD (mm)")
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
  assert [c[0] for c in cells] == ["0.0", "3.0"]
  assert float(cells[0][3]) == 1.0                                  # mDice of the identity
  # mDice of the 3-px shift: mean over sequences of (endo + epi) / 2, each the
  # mean over frames of the numpy Dice (the table rounds to 3 decimals).
  def dice(p, g):
    return 2 * np.sum(p & g) / (np.sum(p) + np.sum(g))
  want = []
  for key in hdf5.list_keys(data):
    gt = hdf5.read_sequence(data, key).gt
    pr = np.roll(gt, 3, axis=2)
    endo = np.mean([dice(p == 1, g == 1) for p, g in zip(pr, gt)])
    epi = np.mean([dice(np.isin(p, (1, 2)), np.isin(g, (1, 2))) for p, g in zip(pr, gt)])
    want.append((endo + epi) / 2)
  assert float(cells[1][3]) == pytest.approx(np.mean(want), abs=6e-4)
  assert [c[-2] for c in cells] == ["2.0", "5.0"]                   # s / seq from the attrs
  summ = json.load(open(os.path.join(out, "summary.json")))
  assert summ["lambda_ef=0.0"]["config"]["lambda_ef"] == 0.0
  assert summ["lambda_ef=3.0"]["config"]["steps"] == 2
  with open(os.path.join(out, "metrics.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["grid_lambda_ef"]) for r in rows] == [
      ("lambda_ef=0.0", "0.0")] * 2 + [("lambda_ef=3.0", "3.0")] * 2

  # Rerun: nothing is refitted, the same table comes back.
  res2 = experiment.run_ablation(data, out, "lambda_ef=0,3", FitConfig(steps=2), fit_fn=stub)
  assert len(stub.calls) == 2 and not any(r["ran"] for r in res2["rows"])
  assert res2["table"] == res["table"]

  # A grown grid fits only the new row; an unfinished row (no eval.json) is redone.
  os.remove(os.path.join(out, "rows", res["rows"][0]["id"], "eval.json"))
  res3 = experiment.run_ablation(data, out, "lambda_ef=0,3,1", FitConfig(steps=2), fit_fn=stub)
  assert [r["ran"] for r in res3["rows"]] == [True, False, True]
  assert len(stub.calls) == 4

  # Another base config is another row (no stale reuse).
  experiment.run_ablation(data, out, "lambda_ef=0", FitConfig(steps=3), fit_fn=stub)
  assert len(stub.calls) == 5

  # The same row asked for with other run settings is refused, not relabelled.
  for kw, words in [(dict(guide="none"), "guide='gt' (now 'none')"),
                    (dict(patients=["synth0000"]), "patients=None (now ['synth0000'])"),
                    (dict(size=16), "size=None (now 16)")]:
    with pytest.raises(InputError) as e:
      experiment.run_ablation(data, out, "lambda_ef=0", FitConfig(steps=2), fit_fn=stub, **kw)
    assert words in str(e.value) and "config.json" in str(e.value) and "\n" not in str(e.value)
  assert len(stub.calls) == 5
  with open(os.path.join(out, "rows", res["rows"][0]["id"], "config.json")) as f:
    assert json.load(f)["guide"] == "gt"          # the row's record is left as it was


# ---------------------------------------------------------------------------
# Tables I and II (run_table): a real tiny U-Net, a stub fitter.


class StubTableFit:
  """pred = the segmenter's prediction (init="segmenter") or the ground truth (init="gt")."""

  def __init__(self):
    self.calls = []

  def __call__(self, data, out, cfg, init, guide, segmentation, **kw):
    self.calls.append((init, guide, os.path.basename(segmentation)))
    with h5py.File(out, "w") as f:
      for key in hdf5.list_keys(data):
        lab = (hdf5.read_sequence(data, key).gt if init == "gt"
               else hdf5.read_labels(segmentation, key))
        g = f.require_group(key)
        g.create_dataset("pred", data=lab)
        g.attrs["status"] = "ok"
    return {}


def test_tables_resume_and_report_differences(data, tmp_path):
  from echo_ode_jax.segmenters import train
  ckpt = tmp_path / "ckpt"
  train.train(train.TrainConfig(model="unet", model_kwargs={"widths": [4, 8]}, size=32,
                                epochs=1, batch_size=4, augment=False), data, ckpt / "unet")
  out = str(tmp_path / "tables")
  stub = StubTableFit()
  r1 = experiment.run_table(data, out, ["unet"], str(ckpt), "segmenter", FitConfig(steps=1),
                            fit_fn=stub, figures=True)
  assert stub.calls == [("segmenter", "segmenter", "pred.h5")]
  s1 = r1["summaries"]
  assert list(s1) == ["U-Net", "Echo-ODE (U-Net)"]
  assert s1["U-Net"]["mdice"] == pytest.approx(s1["Echo-ODE (U-Net)"]["mdice"])
  for f in ("metrics.csv", "summary.json", "table.md", "fig2_contours.png"):
    assert os.path.getsize(os.path.join(out, "table1", f)) > 0
  pred_mtime = os.stat(os.path.join(out, "unet", "pred.h5")).st_mtime_ns

  r2 = experiment.run_table(data, out, ["unet"], str(ckpt), "gt", FitConfig(steps=1),
                            baselines=False, fit_fn=stub)
  assert stub.calls[-1] == ("gt", "segmenter", "pred.h5")
  s2 = r2["summaries"]["Echo-ODE (U-Net) init gt"]
  assert s2["mdice"] == 1.0
  # Table II: value (difference to the Table I Echo-ODE row).
  ref = s1["Echo-ODE (U-Net)"]
  line = r2["table"].strip().splitlines()[2]
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[0] == "Echo-ODE (U-Net) init gt"
  assert cells[3] == f"1.000 ({1.0 - ref['mdice']:+.3f})"
  assert cells[4] == f"1.000 ({1.0 - ref['dice_endo']:+.3f})"

  # Reruns: nothing is predicted or fitted again.
  n = len(stub.calls)
  experiment.run_table(data, out, ["unet"], str(ckpt), "segmenter", FitConfig(steps=1),
                       fit_fn=stub)
  experiment.run_table(data, out, ["unet"], str(ckpt), "gt", FitConfig(steps=1),
                       baselines=False, fit_fn=stub)
  assert len(stub.calls) == n
  assert os.stat(os.path.join(out, "unet", "pred.h5")).st_mtime_ns == pred_mtime

  with pytest.raises(InputError, match="no trained enet"):
    experiment.run_table(data, out, ["enet"], str(ckpt), "segmenter", fit_fn=stub)
  with pytest.raises(InputError, match="unknown vgg"):
    experiment.run_table(data, out, ["vgg"], str(ckpt), "segmenter", fit_fn=stub)


def test_ablate_cli_rejects_an_unknown_key_in_one_line(data, tmp_path):
  import subprocess
  import sys
  from pathlib import Path
  root = Path(__file__).resolve().parents[1]
  r = subprocess.run([sys.executable, str(root / "experiments" / "ablate.py"), f"--data={data}",
                      f"--out={tmp_path}", "--grid=spade=true,false;colour=red"],
                     capture_output=True, text=True, cwd=root, timeout=300)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("error: --grid: unknown key 'colour'")
  assert not (tmp_path / "rows").exists()


def test_config_digest_hashes_only_the_settings_that_differ_from_the_defaults():
  import hashlib
  import json as _json
  from echo_ode_jax import fit as _fit
  want = lambda d: hashlib.sha1(_json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
  assert experiment.config_digest(_fit.FitConfig()) == want({})
  assert experiment.config_digest(_fit.FitConfig(lr=0.02, steps=300)) == want(
      {"lr": 0.02, "steps": 300})
  cfg = _fit.FitConfig().replace(**{"model.use_pe": False})
  assert experiment.config_digest(cfg) == want({"model.use_pe": False})
