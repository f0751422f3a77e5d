"""Config overrides and ablation grids: parsing (hand-expanded), types, bad keys,
the --config flag; resumable rows and tables."""
import csv
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from echo_ode_jax import fit, overrides, tables
from echo_ode_jax.data import hdf5, synthetic
from echo_ode_jax.errors import InputError
from echo_ode_jax.fit import FitConfig
from echo_ode_jax.segmenters import train

ROOT = Path(__file__).resolve().parents[1]


def test_grid_expands_to_the_cartesian_product_last_key_fastest():
  rows = overrides.parse_grid("lambda_ef=0,1;model.use_spade=true,false;solver=euler,heun")
  expect = [
      {"lambda_ef": 0.0, "model.use_spade": True, "solver": "euler"},
      {"lambda_ef": 0.0, "model.use_spade": True, "solver": "heun"},
      {"lambda_ef": 0.0, "model.use_spade": False, "solver": "euler"},
      {"lambda_ef": 0.0, "model.use_spade": False, "solver": "heun"},
      {"lambda_ef": 1.0, "model.use_spade": True, "solver": "euler"},
      {"lambda_ef": 1.0, "model.use_spade": True, "solver": "heun"},
      {"lambda_ef": 1.0, "model.use_spade": False, "solver": "euler"},
      {"lambda_ef": 1.0, "model.use_spade": False, "solver": "heun"},
  ]
  assert rows == expect
  assert all(type(r["lambda_ef"]) is float and type(r["model.use_spade"]) is bool for r in rows)
  assert list(rows[0]) == ["lambda_ef", "model.use_spade", "solver"]
  assert overrides.parse_grid("") == [{}]
  assert overrides.parse_grid(" steps = 5 ; dt=0.05 ") == [{"steps": 5, "dt": 0.05}]


def test_grid_values_take_the_field_type():
  (r,) = overrides.parse_grid("steps=7;lr=1e-3;model.use_pe=no;model.enc_channels=8-16-16-16;"
                              "model.spade_hidden=4;model.compute_dtype=bfloat16")
  assert r == {"steps": 7, "lr": 0.001, "model.use_pe": False,
               "model.enc_channels": (8, 16, 16, 16), "model.spade_hidden": 4,
               "model.compute_dtype": "bfloat16"}
  assert type(r["steps"]) is int
  cfg = overrides.apply_overrides(FitConfig(), r)
  assert (cfg.steps, cfg.lr, cfg.model.use_pe, cfg.model.enc_channels, cfg.model.spade_hidden,
          cfg.model.compute_dtype) == (7, 0.001, False, (8, 16, 16, 16), 4, "bfloat16")
  assert cfg.model.use_spade and cfg.lambda_ef == FitConfig().lambda_ef  # untouched
  # A tuple also in --config's form (commas inside parentheses are not value separators).
  rows = overrides.parse_grid("model.dec_channels=(4,4,4,4,4,2,2),8-8-8-8-8-4-4")
  assert rows == [{"model.dec_channels": (4, 4, 4, 4, 4, 2, 2)},
                  {"model.dec_channels": (8, 8, 8, 8, 8, 4, 4)}]
  # An Optional field takes "none" or a value of its inner type.
  rows = overrides.parse_grid("clip_norm=none,2")
  assert rows == [{"clip_norm": None}, {"clip_norm": 2.0}]
  assert type(rows[1]["clip_norm"]) is float
  assert overrides.apply_overrides(FitConfig(), rows[0]).clip_norm is None
  assert [overrides.parse_typed(bool | None, t) for t in ("off", "true", "none")] == [
      False, True, None]
  with pytest.raises(ValueError, match="true or false or none"):
    overrides.parse_typed(bool | None, "2")
  assert overrides.parse_typed(int | None, "7") == 7


def test_channels_sets_both_widths():
  rows = overrides.parse_grid("model.use_spade=false;channels=8")
  cfg = overrides.apply_overrides(FitConfig(), rows[0])
  assert cfg.model.use_spade is False
  assert cfg.model.enc_channels == (8, 16, 16, 16)
  assert cfg.model.dec_channels == (16, 16, 16, 16, 16, 8, 8)
  # The paper's network is channels=16.
  paper = overrides.apply_overrides(FitConfig(), {"channels": 16})
  assert paper.model == FitConfig().model


@pytest.mark.parametrize("spec, words", [
    ("foo=1", ["unknown key 'foo'", "lambda_ef", "model.use_spade"]),
    ("use_spade=false", ["unknown key 'use_spade'", "did you mean model.use_spade?"]),
    ("lambda_ef=0;lambda_ef=1", ["given twice"]),
    ("model.use_spade=true; model.use_spade =false", ["given twice"]),
    ("steps=1.5", ["steps='1.5'", "int"]),
    ("model.use_spade=maybe", ["true or false"]),
    ("model.conv_impl=native", ["unknown key 'model.conv_impl'"]),   # how, not what: not a setting
    ("clip_norm=big", ["clip_norm='big'", "float"]),
    ("model.enc_channels=a-b", ["integers separated by '-'"]),
    ("solver=rk9", ["solver=rk9", "--config.solver must be one of euler"]),
    ("dt=0", ["dt=0.0", "> 0"]),
    ("model.compute_dtype=float16", ["float32, bfloat16"]),
    ("model.spade_time=late", ["--config.model.spade_time must be one of hidden, gain"]),
    ("channels=0", [">= 1"]),
    ("lambda_ef=", ["no values"]),
    ("lambda_ef", ["not key=v1,v2"]),
    ("model=1", ["unknown key 'model'"]),
])
def test_bad_grids_are_one_line_errors(spec, words):
  with pytest.raises(InputError) as e:
    overrides.parse_grid(spec)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("--grid: ")
  for w in words:
    assert w in msg


def test_base_config_and_row_ids():
  base = overrides.base_config("steps=3;lr=0.005")
  assert (base.steps, base.lr) == (3, 0.005)
  with pytest.raises(InputError, match="one value per key"):
    overrides.base_config("steps=3,4")
  o = {"lambda_ef": 0.0, "model.use_spade": True}
  a = overrides.row_id(o, overrides.apply_overrides(base, o))
  b = overrides.row_id(o, overrides.apply_overrides(FitConfig(), o))
  assert a.startswith("lambda_ef-0.0_model.use_spade-true_") and a != b   # other base -> other row
  assert overrides.row_label(o) == "lambda_ef=0.0 model.use_spade=true"
  # The id of a row: its overrides, then the first 8 hex digits of the SHA-1 of
  # the full config's JSON (the same FitConfig keeps the same folder).
  cfg = FitConfig(steps=2, lambda_ef=3.0)
  digest = hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
  assert overrides.row_id({"lambda_ef": 3.0}, cfg) == f"lambda_ef-3.0_{digest.hexdigest()[:8]}"


def _parse_config_flag(argv):
  """The --config flag of the scripts, parsed from `argv` in its own FlagValues."""
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", overrides.DEFAULT_CONFIG_FILE,
                                           flag_values=fv, sys_argv=["prog", *argv])
  fv(["prog", *argv])
  return overrides.fit_config(holder.value), dict(fv["config"].override_values)


def test_config_flag_overrides_every_kind_of_field():
  cfg, given = _parse_config_flag(["--config.lr=0.03", "--config.steps=7",
                                   "--config.clip_norm=none", "--config.model.use_spade=false",
                                   "--config.model.enc_channels=(8,16,16,16)",
                                   "--config.solver=heun"])
  want = FitConfig(lr=0.03, steps=7, clip_norm=None, solver="heun").replace(
      **{"model.use_spade": False, "model.enc_channels": (8, 16, 16, 16)})
  assert cfg == want
  assert set(given) == {"lr", "steps", "clip_norm", "model.use_spade", "model.enc_channels",
                        "solver"}
  # The grid syntax with the same keys gives the same config.
  assert cfg == overrides.base_config("lr=0.03;steps=7;clip_norm=none;model.use_spade=false;"
                                      "model.enc_channels=8-16-16-16;solver=heun")
  assert _parse_config_flag([])[0] == FitConfig()
  cfg, _ = _parse_config_flag(["--config.clip_norm=2"])
  assert cfg.clip_norm == 2.0 and type(cfg.clip_norm) is float
  # A get_config() file of one's own, then overrides.
  cfg, _ = _parse_config_flag([f"--config={overrides.DEFAULT_CONFIG_FILE}", "--config.seed=5"])
  assert cfg == FitConfig(seed=5)
  # The paper's setting (section IV) is one named file away.
  paper = os.path.join(os.path.dirname(overrides.DEFAULT_CONFIG_FILE), "paper.py")
  cfg, _ = _parse_config_flag([f"--config={paper}", "--config.steps=5"])
  assert (cfg.lambda_ncc, cfg.lr, cfg.lr_decay, cfg.clip_norm, cfg.keep_best, cfg.lambda_jdet,
          cfg.lambda_smt, cfg.steps) == (0.0, 0.01, "constant", None, False, 1.0, 0.0, 5)


@pytest.mark.parametrize("size, levels, coarsest", [(128, 3, 32), (64, 2, 32), (256, 4, 32),
                                                   (96, 2, 48), (40, 1, 40)])
def test_coarse_to_fine_config_starts_from_a_32_pixel_grid(size, levels, coarsest):
  path = os.path.join(os.path.dirname(overrides.DEFAULT_CONFIG_FILE), "coarse_to_fine.py")
  cfg, _ = _parse_config_flag([f"--config={path}:{size}", "--config.seed=3"])
  assert cfg == FitConfig(pyramid_levels=levels, coarse_steps=300, steps=50, seed=3)
  stages = fit.pyramid(cfg)
  assert size // stages[0][0] == coarsest and stages[-1][0] == 1
  assert [c.steps for _, c in stages] == [300] * (levels - 1) + [50]


def test_coarse_to_fine_config_refuses_a_size_that_is_not_a_number():
  from echo_ode_jax.configs import coarse_to_fine
  with pytest.raises(ValueError, match="coarse_to_fine.py:SIZE: SIZE must be the fit grid's side"):
    coarse_to_fine.get_config("big")


@pytest.mark.parametrize("values, words", [
    ({"dt": 0.0}, "--config.dt must be a finite number > 0, got 0.0"),
    ({"model": {"spade_time": "late"}}, "--config.model.spade_time must be one of"),
    ({"colour": "red"}, "--config: unknown field(s) colour"),
    ({"model": {"colour": "red"}}, "--config: unknown field(s) model.colour"),
    ({"clip_norm": "big"}, "--config.clip_norm='big': expected float"),
])
def test_bad_config_values_are_one_line_errors(values, words):
  d = json.loads(FitConfig().to_json())
  for k, v in values.items():
    if isinstance(v, dict):
      d[k].update(v)
    else:
      d[k] = v
  with pytest.raises(InputError) as e:
    overrides.fit_config(d)
  assert words in str(e.value) and "\n" not in str(e.value)


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
  res = tables.run_ablation(data, out, "lambda_ef=0,3", FitConfig(steps=2),
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
  res2 = tables.run_ablation(data, out, "lambda_ef=0,3", FitConfig(steps=2), fit_fn=stub)
  assert len(stub.calls) == 2 and not any(r["ran"] for r in res2["rows"])
  assert res2["table"] == res["table"]

  # A grown grid fits only the new row; an unfinished row (no eval.json) is redone.
  os.remove(os.path.join(out, "rows", res["rows"][0]["id"], "eval.json"))
  res3 = tables.run_ablation(data, out, "lambda_ef=0,3,1", FitConfig(steps=2), fit_fn=stub)
  assert [r["ran"] for r in res3["rows"]] == [True, False, True]
  assert len(stub.calls) == 4

  # Another base config is another row (no stale reuse).
  tables.run_ablation(data, out, "lambda_ef=0", FitConfig(steps=3), fit_fn=stub)
  assert len(stub.calls) == 5

  # The same row asked for with other run settings is refused, not relabelled.
  for kw, words in [(dict(guide="none"), "guide='gt' (now 'none')"),
                    (dict(patients=["synth0000"]), "patients=None (now ['synth0000'])"),
                    (dict(size=16), "size=None (now 16)")]:
    with pytest.raises(InputError) as e:
      tables.run_ablation(data, out, "lambda_ef=0", FitConfig(steps=2), fit_fn=stub, **kw)
    assert words in str(e.value) and "config.json" in str(e.value) and "\n" not in str(e.value)
  assert len(stub.calls) == 5
  with open(os.path.join(out, "rows", res["rows"][0]["id"], "config.json")) as f:
    assert json.load(f)["guide"] == "gt"          # the row's record is left as it was


def test_a_row_of_the_same_config_resumes_under_another_spelling_or_version(data, tmp_path):
  """A finished row whose folder name came from other grid keys (an earlier
  version's "spade") and whose saved config has fields since removed is the row
  of the same FitConfig: reused, not refitted."""
  from echo_ode_jax import metrics
  out = tmp_path / "abl"
  base = FitConfig(steps=2, lambda_ef=0.0)     # the stub's identity
  cfg = base.replace(**{"model.use_spade": False})
  rdir = out / "rows" / "spade-false_0123abcd"
  rdir.mkdir(parents=True)
  saved = json.loads(cfg.to_json())
  saved["retired_setting"] = 7
  saved["model"]["retired_model_setting"] = True
  with open(rdir / "config.json", "w") as f:
    json.dump({"overrides": {"spade": False}, "config": saved, "init": "gt", "guide": "gt",
               "size": None, "data": os.path.basename(data), "segmentation": "",
               "patients": None}, f)
  stub = StubFit()
  stub(data, str(rdir / "results.h5"), cfg)
  with open(rdir / "eval.json", "w") as f:
    json.dump({"rows": metrics.evaluate_files(data, str(rdir / "results.h5")),
               "fit_seconds": 2.0}, f)
  res = tables.run_ablation(data, str(out), "model.use_spade=false", base, fit_fn=stub)
  assert [(r["id"], r["ran"]) for r in res["rows"]] == [("spade-false_0123abcd", False)]
  assert len(stub.calls) == 1
  cells = [c.strip() for c in res["table"].strip().splitlines()[2].strip("|").split("|")]
  assert cells[0] == "false" and float(cells[3]) == 1.0
  # Another config is another row.
  res = tables.run_ablation(data, str(out), "model.use_spade=true", base, fit_fn=stub)
  assert res["rows"][0]["ran"] and res["rows"][0]["id"].startswith("model.use_spade-true_")
  assert len(stub.calls) == 2


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
  ckpt = tmp_path / "ckpt"
  train.train(train.TrainConfig(model="unet", model_kwargs={"widths": [4, 8]}, size=32,
                                epochs=1, batch_size=4, augment=False), data, ckpt / "unet")
  out = str(tmp_path / "tables")
  stub = StubTableFit()
  r1 = tables.run_table(data, out, ["unet"], str(ckpt), "segmenter", FitConfig(steps=1),
                            fit_fn=stub, figures=True)
  assert stub.calls == [("segmenter", "segmenter", "pred.h5")]
  s1 = r1["summaries"]
  assert list(s1) == ["U-Net", "Echo-ODE (U-Net)"]
  assert s1["U-Net"]["mdice"] == pytest.approx(s1["Echo-ODE (U-Net)"]["mdice"])
  for f in ("metrics.csv", "summary.json", "table.md", "fig2_contours.png"):
    assert os.path.getsize(os.path.join(out, "table1", f)) > 0
  pred_mtime = os.stat(os.path.join(out, "unet", "pred.h5")).st_mtime_ns

  r2 = tables.run_table(data, out, ["unet"], str(ckpt), "gt", FitConfig(steps=1),
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
  tables.run_table(data, out, ["unet"], str(ckpt), "segmenter", FitConfig(steps=1),
                       fit_fn=stub)
  tables.run_table(data, out, ["unet"], str(ckpt), "gt", FitConfig(steps=1),
                       baselines=False, fit_fn=stub)
  assert len(stub.calls) == n
  assert os.stat(os.path.join(out, "unet", "pred.h5")).st_mtime_ns == pred_mtime

  with pytest.raises(InputError, match="no trained enet"):
    tables.run_table(data, out, ["enet"], str(ckpt), "segmenter", fit_fn=stub)
  with pytest.raises(InputError, match="unknown vgg"):
    tables.run_table(data, out, ["vgg"], str(ckpt), "segmenter", fit_fn=stub)


def _ablate(*args):
  return subprocess.run([sys.executable, str(ROOT / "experiments" / "ablate.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_ablate_cli_rejects_an_unknown_key_in_one_line(data, tmp_path):
  r = _ablate(f"--data={data}", f"--out={tmp_path}", "--grid=model.use_spade=true,false;colour=red")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("error: --grid: unknown key 'colour'")
  r = _ablate(f"--data={data}", f"--out={tmp_path}", "--grid=lambda_ef=0,1",
              "--config.model.colour=red")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == "error: --config.model.colour: no such config field"
  assert not (tmp_path / "rows").exists()


def test_config_digest_hashes_only_the_settings_that_differ_from_the_defaults():
  want = lambda d: hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
  assert overrides.config_digest(FitConfig()) == want({})
  assert overrides.config_digest(FitConfig(lr=0.02, steps=300)) == want(
      {"lr": 0.02, "steps": 300})
  cfg = FitConfig().replace(**{"model.use_pe": False})
  assert overrides.config_digest(cfg) == want({"model.use_pe": False})
