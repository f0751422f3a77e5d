"""Tables I and II and ablation grids, as resumable stages.

Each stage leaves a file; a rerun skips finished stages (:func:`stage`,
:func:`fit_stage`) and resumes an interrupted fit inside `runner.fit_file`.
Used by experiments/run_table1.py, run_table2.py, ablate.py, the demo and the
quality benchmarks; the reports they write are `reports.write_report`'s.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import h5py
import numpy as np
from absl import logging

from echo_ode_jax import metrics, overrides, plots, runner
from echo_ode_jax._atomic import atomic_h5, check_writes
from echo_ode_jax._progress import Progress
from echo_ode_jax.data import hdf5
from echo_ode_jax.errors import InputError
from echo_ode_jax.fit import FitConfig
from echo_ode_jax.reports import (ablation_markdown, cell, evaluate_cached, read_json,
                                  read_summaries, table2_markdown, write_json, write_report)
from echo_ode_jax.segmenters import predict, train


def all_keys_done(out: str, keys: Sequence[str]) -> bool:
  """Whether the results file `out` exists and holds every key."""
  if not os.path.exists(out):
    return False
  try:
    have = set(hdf5.list_keys(out))
  except InputError:
    return False
  return set(keys) <= have


def stage(path: str, fn: Callable[[], Any], what: str) -> bool:
  """Runs `fn` unless `path` exists (a finished stage). Returns whether it ran."""
  if os.path.exists(path):
    logging.info("%s: done already (%s)", what, path)
    return False
  logging.info("%s -> %s", what, path)
  fn()
  if not os.path.exists(path):
    raise RuntimeError(f"{what}: stage finished without writing {path}")
  return True


def label_file(data: str, path: str,
               frames_of: Callable[[np.ndarray], np.ndarray] = lambda gt: gt) -> str:
  """A prediction file at `path` whose pred is frames_of(gt) for every sequence of
  `data` (default: the ground truth itself, unannotated frames included, as a
  reference row of a table). An existing file holding the same sequences is
  kept (a finished stage); one holding others is an InputError. Written
  atomically (:func:`echo_ode_jax._atomic.atomic_h5`). Returns path."""
  if os.path.exists(path):
    if hdf5.list_keys(path) != hdf5.list_keys(data):
      raise InputError(path, f"holds other sequences than {data}; delete it to rebuild")
    return path
  with atomic_h5(path) as f:
    f.attrs["format_version"] = hdf5.FORMAT_VERSION
    for seq in hdf5.iter_sequences(data):
      f.require_group(seq.key).create_dataset("pred", data=frames_of(seq.gt),
                                              compression="gzip")
      check_writes(f)      # a full disk stops here
  return path


def mean_fit_seconds(results_h5: str) -> float:
  """Mean of the `seconds` attr over the sequences of a fit results file (nan if none)."""
  secs = []
  with h5py.File(results_h5, "r") as f:
    for k in hdf5.list_keys(results_h5):
      if "seconds" in f[k].attrs:
        secs.append(float(f[k].attrs["seconds"]))
  return float(np.mean(secs)) if secs else float("nan")


def find_row(rows_dir: str, rid: str, cfg: FitConfig) -> str:
  """The folder of a grid row: `rows_dir`/`rid`, or an existing row folder whose
  config.json holds the same FitConfig (written under another key spelling or
  by a version whose FitConfig had other fields; `overrides.same_config`)."""
  path = os.path.join(rows_dir, rid)
  if os.path.exists(path) or not os.path.isdir(rows_dir):
    return path
  for name in sorted(os.listdir(rows_dir)):
    cfg_path = os.path.join(rows_dir, name, "config.json")
    if not os.path.exists(cfg_path):
      continue
    try:
      saved = read_json(cfg_path).get("config")
    except (InputError, AttributeError):
      continue
    if isinstance(saved, dict) and overrides.same_config(saved, cfg):
      logging.info("grid row %s: resuming %s (the same config)", rid, name)
      return os.path.join(rows_dir, name)
  return path


def run_ablation(data: str, out: str, grid: str, base: FitConfig = FitConfig(),
                 init: str = "gt", guide: str = "gt", segmentation: str | None = None,
                 patients: Sequence[str] | None = None, batch_size: int = 8,
                 size: int | None = None, fit_fn: Callable | None = None
                 ) -> dict[str, Any]:
  """Fits every grid row on the same sequences, evaluates them, writes one report.

  Layout of `out`: rows/<row id>/{config.json, results.h5, eval.json} per row
  (`overrides.row_id`, or an earlier row of the same config, :func:`find_row`;
  a row with eval.json is finished and skipped on a rerun; an interrupted fit
  resumes inside runner.fit_file), and the report (metrics.csv with the row's
  overrides as columns, summary.json with each row's full config, table.md).

  Args:
    grid: the rows (`overrides.parse_grid`: "lambda_ef=0,1;model.use_spade=true,false").
    base: the config every row's overrides apply to.
    fit_fn: the fitter (default `runner.fit_file`; tests pass a stub).

  Returns:
    {"rows": [{"label", "id", "overrides", "ran"}], "table": markdown}.
  """
  fit_fn = fit_fn or runner.fit_file
  grid_rows = overrides.parse_grid(grid)
  keys = hdf5.list_keys(data)
  if patients:
    keys = [k for k in keys if k.split("/")[0] in set(patients) or k in set(patients)]
  results, extra, const, table_rows, done = {}, {}, {}, [], []
  prog = Progress(len(grid_rows), "ablation", "row", min_interval_s=0.0)
  for i, row in enumerate(grid_rows):
    cfg = overrides.apply_overrides(base, row)
    label = overrides.row_label(row)
    rdir = find_row(os.path.join(out, "rows"), overrides.row_id(row, cfg), cfg)
    rid = os.path.basename(rdir)
    os.makedirs(rdir, exist_ok=True)
    row_cfg = {"overrides": row, "config": json.loads(cfg.to_json()), "init": init,
               "guide": guide, "size": size, "data": os.path.basename(data),
               "segmentation": os.path.basename(segmentation) if segmentation else "",
               "patients": sorted(patients) if patients else None}
    cfg_path = os.path.join(rdir, "config.json")
    res_h5 = os.path.join(rdir, "results.h5")
    ev = os.path.join(rdir, "eval.json")
    if os.path.exists(ev) and os.path.exists(cfg_path):
      # The config is compared by the row's id; the overrides' spelling may differ.
      diff = runner.dict_diff(read_json(cfg_path), row_cfg, {"config", "overrides"})
      if diff:
        raise InputError(cfg_path, "this row's results were made with other settings: "
                         + ", ".join(diff) + "; use another --out")
    write_json(cfg_path, row_cfg)
    ran = False
    if not os.path.exists(ev):
      logging.info("ablation row %d/%d: %s", i + 1, len(grid_rows), label)
      fit_fn(data, res_h5, cfg, init=init, guide=guide, segmentation=segmentation,
             patients=patients, batch_size=batch_size, size=size, save_flow=True)
      rows = metrics.evaluate_files(data, res_h5, keys)
      write_json(ev, {"rows": rows, "fit_seconds": mean_fit_seconds(res_h5)})
      ran = True
    else:
      logging.info("ablation row %d/%d: %s done already", i + 1, len(grid_rows), label)
    e = read_json(ev)
    results[label] = e["rows"]
    extra[label] = {"overrides": row, "config": json.loads(cfg.to_json()), "id": rid}
    const[label] = {f"grid_{k}": overrides.format_value(v) for k, v in row.items()}
    sec = e.get("fit_seconds")
    table_rows.append((row, metrics.summarize(e["rows"]),
                       float("nan") if sec is None else sec))
    done.append({"label": label, "id": rid, "overrides": row, "ran": ran})
    prog.update(1, extra=f"{label}: mDice {cell(table_rows[-1][1], 'mdice', 3)}")
  table = ablation_markdown(table_rows)
  write_report(out, results, extra, table, const)
  return {"rows": done, "table": table}


SEGMENTER_NAMES = {"unet": "U-Net", "enet": "ENet", "deeplabv3": "DeepLabv3"}


def segmenter_label(name: str) -> str:
  return SEGMENTER_NAMES.get(name, name)


def echo_ode_label(segmenter: str) -> str:
  return f"Echo-ODE ({segmenter_label(segmenter)})"


def predict_stage(data: str, checkpoints: str, segmenter: str, out_h5: str,
                  which: str = "best") -> str:
  """Per-frame predictions of the trained `segmenter` (workdir checkpoints/<name>)."""
  workdir = os.path.join(checkpoints, segmenter)
  if not os.path.exists(os.path.join(workdir, train.CONFIG_FILE)):
    raise InputError(workdir, f"no trained {segmenter} here (config.json missing); train it "
                     f"with experiments/train_segmenter.py --model={segmenter} "
                     f"--workdir={workdir}")

  def run():
    state = train.load_model_state(workdir, which)
    predict.write_predictions(state, data, out_h5)

  stage(out_h5, run, f"predict {segmenter}")
  return out_h5


def fit_stage(data: str, out_h5: str, cfg: FitConfig, init: str, guide: str,
              segmentation: str | None, batch_size: int = 8, size: int | None = None,
              save_flow: bool = True, fit_fn: Callable | None = None) -> str:
  """runner.fit_file unless `out_h5` already holds every sequence of `data`."""
  fit_fn = fit_fn or runner.fit_file
  keys = hdf5.list_keys(data)
  if all_keys_done(out_h5, keys):
    runner.check_resume(out_h5, keys, cfg,
                        runner.run_meta(init, guide, data, segmentation, size))
    logging.info("fit -> %s: done already", out_h5)
    return out_h5
  fit_fn(data, out_h5, cfg, init=init, guide=guide, segmentation=segmentation,
         batch_size=batch_size, size=size, save_flow=save_flow)
  return out_h5


def run_table(data: str, out: str, segmenters: Sequence[str], checkpoints: str,
              init: str, cfg: FitConfig = FitConfig(), baselines: bool = True,
              reference: str | None = None, batch_size: int = 8, size: int | None = None,
              figures: bool = False, which: str = "best", fit_fn: Callable | None = None
              ) -> dict[str, Any]:
  """Table I (init="segmenter", with the 2D baselines) or Table II (init="gt").

  Stages, each leaving a file that a rerun skips:
    <out>/<seg>/pred.h5                 the 2D segmenter on every frame
    <out>/<seg>/echo_ode_init-<init>.h5 Echo-ODE, guide = the segmenter's ES
                                        (and ED) prediction, m_0 = its ED
                                        prediction or the gt ED mask
    <out>/<seg>/*.eval.json             cached evaluations
  then the report in <out>/table1 or <out>/table2 (write_report layout).

  Args:
    reference: a Table I summary.json; its "Echo-ODE (<seg>)" rows are the
      differences' reference in Table II (default <out>/table1/summary.json
      when it exists).
  """
  if init not in ("segmenter", "gt"):
    raise ValueError(f"init must be 'segmenter' or 'gt', got {init!r}")
  unknown = [s for s in segmenters if s not in SEGMENTER_NAMES]
  if unknown:
    raise InputError(None, f"--segmenters: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(SEGMENTER_NAMES)}")
  hdf5.list_keys(data)  # InputError early for a bad data file
  results, preds, extra = {}, {}, {}
  for seg in segmenters:
    sdir = os.path.join(out, seg)
    os.makedirs(sdir, exist_ok=True)
    pred = predict_stage(data, checkpoints, seg, os.path.join(sdir, "pred.h5"), which)
    if baselines:
      name = segmenter_label(seg)
      results[name] = evaluate_cached(data, pred, os.path.join(sdir, "pred.eval.json"))
      preds[name] = pred
      extra[name] = {"method": "2D", "segmenter": seg, "pred": os.path.relpath(pred, out)}
    fit_h5 = os.path.join(sdir, f"echo_ode_init-{init}.h5")
    fit_stage(data, fit_h5, cfg, init, "segmenter", pred, batch_size, size, True, fit_fn)
    name = echo_ode_label(seg) + (" init gt" if init == "gt" else "")
    results[name] = evaluate_cached(data, fit_h5, fit_h5[:-3] + ".eval.json")
    preds[name] = fit_h5
    extra[name] = {"method": "echo-ode", "segmenter": seg, "init": init, "guide": "segmenter",
                   "config": json.loads(cfg.to_json()), "pred": os.path.relpath(fit_h5, out)}
  report_dir = os.path.join(out, "table1" if init == "segmenter" else "table2")
  if init == "gt":
    ref_path = reference or os.path.join(out, "table1", "summary.json")
    refs = read_summaries(ref_path) if (reference or os.path.exists(ref_path)) else {}
    summaries = {n: metrics.summarize(r) for n, r in results.items()}
    table = table2_markdown(
        summaries, {n: refs.get(echo_ode_label(extra[n]["segmenter"])) for n in summaries})
    if not refs:
      table += "\n(no Table I summary found: differences omitted)\n"
  else:
    table = None
  summaries = write_report(report_dir, results, extra, table)
  figs = plots.write_figures(data, preds, report_dir) if figures else []
  with open(os.path.join(report_dir, "table.md")) as f:
    table_md = f.read()
  return {"summaries": summaries, "table": table_md, "report": report_dir, "figures": figs}
