"""benchmarks/registration_quality.py and semisynthetic_table.py: their scoring,
pair extraction, grids and files, on small synthetic data (no fit, no ANTs)."""
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from absl import flags

from echo_ode_jax import metrics, tables
from echo_ode_jax.data import hdf5, synthetic

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
  """Imports a benchmark script; its absl flags are dropped again (the two
  scripts define flags of the same names, and only their functions are tested)."""
  sys.path.insert(0, str(BENCH))
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for n in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, n)
  return mod


rq = _load("registration_quality")
quick = _load("_quick")
st = _load("semisynthetic_table")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Three 6-frame synthetic sequences, ES at frame 4 (frame 5 after ES)."""
  path = tmp_path_factory.mktemp("rq") / "data.h5"
  with h5py.File(path, "w") as f:
    hdf5.set_root_attrs(f, 32)
    for i in range(3):
      s = synthetic.make_sequence(i, size=32, num_frames=6)[0]
      s.attrs["es_index"] = 4
      hdf5.write_sequence(f, s)
  return str(path)


def test_pairs_hold_the_ed_and_es_frames_of_the_selected_split(data, tmp_path):
  keys = hdf5.list_keys(data)
  splits = tmp_path / "splits.json"
  splits.write_text(json.dumps({"valid": [keys[2].split("/")[0], keys[0].split("/")[0]],
                                "train": [keys[1].split("/")[0]]}))
  sel = rq.select_keys(data, str(splits), "valid", None)
  assert sel == sorted([keys[0], keys[2]])
  assert rq.select_keys(data, None, "valid", 2) == keys[:2]
  pairs = str(tmp_path / "pairs.h5")
  rq.write_pairs(data, sel, pairs)
  for k in sel:
    src, p = hdf5.read_sequence(data, k), hdf5.read_sequence(pairs, k)
    np.testing.assert_array_equal(p.img, src.img[[0, 4]])
    np.testing.assert_array_equal(p.gt, src.gt[[0, 4]])
    assert p.attrs["ed_index"] == 0 and p.attrs["es_index"] == 1
    assert list(p.attrs["pair_source_frames"]) == [0, 4]


def test_pair_scores_against_hand_computed_masks():
  """Two squares: Dice, HD and area EF worked out by hand."""
  gt = np.zeros((2, 20, 20), np.uint8)
  gt[0, 2:12, 2:12] = 1          # ED: 10 x 10
  gt[1, 2:10, 2:12] = 1          # ES: 8 x 10 -> area EF 20 %
  pred = gt.copy()
  pred[1] = 0
  pred[1, 2:8, 2:12] = 1         # 6 x 10 -> area EF 40 %
  s = rq.pair_scores(pred, gt, (0.5, 0.5))
  assert s["dice_endo"] == pytest.approx(2 * 60 / (60 + 80))
  assert s["dice_epi"] == pytest.approx(2 * 60 / (60 + 80))     # no myocardium: epi = endo
  assert s["hd_endo"] == pytest.approx(2 * 0.5)                   # boundary rows 7 vs 9
  assert s["gt_ef_area"] == pytest.approx(20.0)
  assert s["ef_area"] == pytest.approx(40.0) and s["ef_err"] == pytest.approx(20.0)
  same = rq.pair_scores(gt, gt, (1.0, 1.0))
  assert same["dice_endo"] == 1 and same["hd_endo"] == 0 and same["ef_err"] == 0


def test_grid_rows_are_the_union_of_the_grids():
  rows = rq.grid_rows("|lambda_sim=1,10|lambda_ncc=1;ncc_window=5|lambda_sim=10")
  assert rows == [{}, {"lambda_sim": 1.0}, {"lambda_sim": 10.0},
                  {"lambda_ncc": 1.0, "ncc_window": 5}]
  assert rq.grid_rows("") == [{}]


def test_row_files_keep_their_names_for_the_same_config(tmp_path):
  """An Echo-ODE row's file: pred_echo_<overrides>_<size>_<config digest>.h5; a
  file of the same size and config whose overrides were spelt otherwise (an
  earlier version's grid keys) is that row's file."""
  from echo_ode_jax.fit import FitConfig
  cfg = FitConfig(steps=300).replace(**{"model.use_spade": False})
  diff = {"model.use_spade": False, "steps": 300}
  digest = hashlib.sha1(json.dumps(diff, sort_keys=True).encode()).hexdigest()[:8]
  row = {"model.use_spade": False}
  path = rq.row_file(str(tmp_path), row, cfg, 64)
  assert Path(path).name == f"pred_echo_model.use_spade-false_64_{digest}.h5"
  old = tmp_path / f"pred_echo_spade-false_64_{digest}.h5"
  old.write_bytes(b"")
  assert rq.row_file(str(tmp_path), row, cfg, 64) == str(old)
  assert Path(rq.row_file(str(tmp_path), row, cfg, 128)).name.endswith(f"_128_{digest}.h5")
  other = cfg.replace(steps=301)
  assert rq.row_file(str(tmp_path), row, other, 64) != str(old)


def test_copy_rows_files_and_figure(data, tmp_path):
  """The copy-m_0 row scored from its file equals Dice of gt ED vs gt ES computed
  directly; the table and the worst-patients figure are written."""
  keys = hdf5.list_keys(data)
  pairs = str(tmp_path / "pairs.h5")
  rq.write_pairs(data, keys, pairs)
  path = str(tmp_path / "pred_copy.h5")
  rq.copy_method(pairs, keys, path)
  rq.copy_method(pairs, keys, path)            # resumable: nothing left to do
  rows = rq.score(pairs, keys, "copy", path)
  for r, k in zip(rows, keys):
    gt = hdf5.read_sequence(data, k).gt
    assert r["status"] == "ok"
    assert r["dice_endo"] == pytest.approx(metrics.dice(gt[0] == 1, gt[4] == 1))
  s = rq.summarize(rows)
  assert s["n"] == 3 and s["failed"] == 0
  assert s["dice_endo"][0] == pytest.approx(np.mean([r["dice_endo"] for r in rows]))
  assert "| copy |" in rq.table_markdown({"copy": s})
  png = rq.worst_figure(pairs, {"copy": path}, rows, "copy", 2, str(tmp_path / "w.png"))
  assert Path(png).stat().st_size > 1000


def test_semisynthetic_table_label_files_and_subset(data, tmp_path):
  sub = st.subset(data, 2, str(tmp_path / "sub.h5"))
  assert hdf5.list_keys(sub) == hdf5.list_keys(data)[:2]
  assert st.subset(data, None, str(tmp_path / "x.h5")) == data
  gt_file = tables.label_file(sub, str(tmp_path / "gt.h5"))
  copy = tables.label_file(sub, str(tmp_path / "copy.h5"),
                           lambda g: np.repeat(g[:1], g.shape[0], 0))
  rows_gt = metrics.evaluate_files(sub, gt_file)
  rows_copy = metrics.evaluate_files(sub, copy)
  assert all(r["mdice"] == 1.0 for r in rows_gt)
  for r, k in zip(rows_copy, hdf5.list_keys(sub)):
    gt = hdf5.read_sequence(sub, k).gt
    want = np.mean([metrics.dice(gt[0] == 1, g == 1) for g in gt])
    assert r["dice_endo"] == pytest.approx(want)


def test_semisynthetic_bidirectional_rows_from_an_identity_flow(tmp_path):
  """With phi_t = identity the bidirectional labels are argmax of
  (1 - t_k) onehot(m_0) + t_k onehot(m_ES), t_k = k / 3: frames 0 and 1 are m_0,
  frames 2 and 3 m_ES, worked out by hand; the fit's attrs are carried over."""
  h = w = 16
  m0 = np.zeros((h, w), np.uint8)
  m0[4:12, 4:12] = 1
  m_es = np.zeros((h, w), np.uint8)
  m_es[6:10, 5:11] = 1
  m_es[2:4, 2:14] = 2
  grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)
  fit_h5, keys_h5 = tmp_path / "fit.h5", tmp_path / "keys.h5"
  with h5py.File(fit_h5, "w") as f, h5py.File(keys_h5, "w") as g:
    f.attrs["format_version"] = g.attrs["format_version"] = hdf5.FORMAT_VERSION
    a = f.require_group("p1/4CH")
    a.create_dataset("flow", data=np.repeat(grid[None].astype(np.float32), 4, 0))
    a.create_dataset("pred", data=np.zeros((4, h, w), np.uint8))
    a.attrs.update({"status": "ok", "folding_fraction": 0.0})
    # the keyframe file holds one frame after ES (frame 4): ES is the flow's last
    g.require_group("p1/4CH").create_dataset(
        "pred", data=np.stack([m0, m0, m0, m_es, np.zeros_like(m0)]))
  out = st.relabel_file(str(fit_h5), str(keys_h5), str(tmp_path / "b.h5"), "bidirectional")
  with h5py.File(out, "r") as f:
    pred = f["p1/4CH/pred"][()]
    assert f["p1/4CH"].attrs["status"] == "ok"
  np.testing.assert_array_equal(pred[0], m0)
  np.testing.assert_array_equal(pred[1], m0)
  np.testing.assert_array_equal(pred[2], m_es)
  np.testing.assert_array_equal(pred[3], m_es)
  # consensus of (m0, m0, m0, m_es) under identity maps: m0, the majority, everywhere
  out = st.relabel_file(str(fit_h5), str(keys_h5), str(tmp_path / "c.h5"), "consensus")
  with h5py.File(out, "r") as f:
    np.testing.assert_array_equal(f["p1/4CH/pred"][()], np.repeat(m0[None], 4, 0))


@pytest.mark.parametrize("argv, steps", [
    ([], 300),                                       # --quick's steps
    (["--config.steps=7"], 7),                       # an explicit override wins
    (["--config=CONFIGS/coarse_to_fine.py:64"], 50),  # a named setting keeps its steps
    (["--config=CONFIGS/coarse_to_fine.py:64", "--config.steps=9"], 9),
])
def test_quick_sets_the_steps_unless_a_setting_gives_them(argv, steps):
  from ml_collections import config_flags
  from echo_ode_jax import overrides
  configs = str(Path(overrides.DEFAULT_CONFIG_FILE).parent)
  argv = ["prog", "--quick", *(a.replace("CONFIGS", configs) for a in argv)]
  fv = flags.FlagValues()
  on = flags.DEFINE_boolean("quick", False, "", flag_values=fv)
  config = config_flags.DEFINE_config_file("config", overrides.DEFAULT_CONFIG_FILE,
                                           flag_values=fv, sys_argv=argv)
  fv(argv)
  assert quick.fit_config(on, config, fv).steps == steps


def test_paired_rows_against_hand_computed_differences():
  """Echo-ODE minus the reference, patient by patient: a failed patient of either
  is left out; for the EF error (lower is better) "better" counts the patients
  where Echo-ODE's error is lower."""
  def row(m, k, endo, epi, ef, status="ok"):
    return {"method": m, "key": k, "status": status, "dice_endo": endo, "dice_epi": epi,
            "ef_err": ef}
  rows = [row("E", "p1", 0.91, 0.95, 2.0), row("R", "p1", 0.90, 0.94, 4.0),
          row("E", "p2", 0.82, 0.93, 9.0), row("R", "p2", 0.80, 0.95, 5.0),
          row("E", "p3", 0.73, 0.90, 1.0), row("R", "p3", 0.70, 0.91, 3.0),
          row("E", "p4", 0.10, 0.10, 50.0, "failed"), row("R", "p4", 0.88, 0.93, 1.0)]
  of = lambda m: [r for r in rows if r["method"] == m]
  d = metrics.compare_rows(of("E"), of("R"), [c[0] for c in rq.PAIRED])
  assert d["dice_endo"]["n"] == 3 and d["dice_endo"]["mean"] == pytest.approx(0.02)
  assert d["dice_epi"]["mean"] == pytest.approx((0.01 - 0.02 - 0.01) / 3)
  assert d["ef_err"]["mean"] == pytest.approx((-2 + 4 - 2) / 3)
  assert (d["ef_err"]["a_better"], d["ef_err"]["b_better"]) == (1, 2)
  md = metrics.paired_markdown({"E": ("R", d)}, rq.PAIRED)
  cells = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
  assert cells[:2] == ["E", "R"] and cells[-1] == "3"
  assert cells[2].startswith("+0.020 [") and cells[2].endswith("(3 better, 0 worse)")
  assert cells[4].endswith("(2 better, 1 worse)")      # EF: lower error is better


def test_unknown_reference_is_one_line_before_any_work(data, tmp_path):
  import subprocess
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, str(BENCH / "registration_quality.py"), f"--data={data}",
                      f"--out={out}", "--segmenter=", "--reference=ANTs SyNCC"],
                     capture_output=True, text=True, cwd=BENCH.parent, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  err = r.stderr.strip().splitlines()[-1]
  assert err.startswith("error: --reference=ANTs SyNCC: no such method") and "copy m_0" in err
  assert not list(out.glob("pred_*.h5"))


def test_semisynthetic_rows_are_compared_with_their_baseline():
  names = ["ground truth", "copy m_0", "U-Net per frame", "Echo-ODE (U-Net m_0 and guide)",
           "Echo-ODE (U-Net m_0, no guide), consensus", "Echo-ODE (gt m_0, no guide)",
           "Echo-ODE (gt ED + ES masks), bidirectional", "ANTs SyNCC per frame"]
  refs = st.paired_references(names, "U-Net per frame", "ANTs SyNCC per frame")
  assert refs == {"Echo-ODE (U-Net m_0 and guide)": "U-Net per frame",
                  "Echo-ODE (U-Net m_0, no guide), consensus": "U-Net per frame",
                  "Echo-ODE (gt m_0, no guide)": "ANTs SyNCC per frame",
                  "Echo-ODE (gt ED + ES masks), bidirectional": "ANTs SyNCC per frame"}
  assert st.paired_references(names, "U-Net per frame", None) == {
      k: v for k, v in refs.items() if v == "U-Net per frame"}


def test_ants_map_of_a_known_translation_keeps_positions_outside_the_grid():
  """_ants.register_map against a blob moved by (+3, -2) pixels of the small grid,
  placed in a twice finer space (spacing 2): the map is p + (3, -2) everywhere,
  also where that lies outside the grid (rows 45-47 map to 48-50)."""
  pytest.importorskip("ants", reason="antspyx is a benchmark-only dependency (.venv-bench)")
  _ants = _load("_ants")
  yy, xx = np.mgrid[:48, :48].astype(np.float32)
  blob = lambda cy, cx: np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0 ** 2))
  phi = _ants.register_map(blob(24, 24), blob(27, 22), "Translation", full_shape=(96, 96))
  assert phi.shape == (48, 48, 2)
  np.testing.assert_allclose(phi[..., 0] - yy, 3.0, atol=0.05)
  np.testing.assert_allclose(phi[..., 1] - xx, -2.0, atol=0.05)
