"""Per-sequence evaluation, evaluation of a (data, prediction) file pair, summaries.

A row (one sequence) is a flat dict: "key", "status" ("ok", "failed" or
"missing") and, when ok, the metrics of `evaluate_sequence`. Failed and
missing sequences are kept as rows so that `summarize` counts them.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterable, Sequence

import h5py
import numpy as np

from echo_ode_jax.data import hdf5
from echo_ode_jax.errors import InputError
from echo_ode_jax.metrics._deformation import deformation_quality
from echo_ode_jax.metrics._dice import STRUCTURES, annotated_frames, dice_scores
from echo_ode_jax.metrics._ef import ef_measures
from echo_ode_jax.metrics._hausdorff import temporal_hausdorff
from echo_ode_jax.metrics._temporal import ATTRIBUTES, sequence_temporal_consistency

NAN = float("nan")


def _nan_fields(*names: str) -> dict[str, float]:
  return {n: NAN for n in names}


def evaluate_sequence(pred: np.ndarray, gt: np.ndarray | None, attrs: dict[str, Any],
                      flow: np.ndarray | None = None) -> dict[str, Any]:
  """All metrics of one sequence.

  Args:
    pred: (T, H, W) predicted labels (0 bg, 1 LV, 2 myo, 3 LA).
    gt: (T, H, W) ground truth, 255 on unannotated frames, or None.
    attrs: view attributes; needs "voxelspacing" (row, col) mm per pixel; uses
      "ed_index" / "es_index" (0-based frames of the stored sequence; default
      first and last frame).
    flow: optional (T, h, w, 2) absolute maps phi_t (row, col) in pixels, on
      pred's grid or on the grid the fit ran at; or (K, T, h, w, 2), the maps
      of an ensemble's members whose labels pred fuses (their statistics pooled).

  Returns:
    A flat dict: n_frames, n_annotated; dice_endo, dice_epi, dice_myo, mdice
    (annotated frames); hd_endo, hd_epi, hd (mm, consecutive predicted
    frames), gt_hd_endo, gt_hd_epi, gt_hd (consecutive annotated frames);
    temporal_error (bool), n_inconsistent_frames, tc_<attribute> (share of
    interior frames flagged), gt_temporal_error (None unless every gt frame is
    annotated); ef_area, ef_simpson, edv_ml, esv_ml and their gt_ twins,
    ef_area_err, ef_simpson_err (absolute error, percentage points);
    fold_frac, jdet_min, jdet_mean (nan without flow); notes (list of str
    explaining nan / inf values); status "ok".

  Raises:
    ValueError: on inconsistent shapes or attributes.
  """
  pred = np.asarray(pred)
  if pred.ndim != 3:
    raise ValueError(f"pred must be (T, H, W), got shape {pred.shape}")
  t = pred.shape[0]
  if gt is not None:
    gt = np.asarray(gt)
    if gt.shape != pred.shape:
      raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
  if "voxelspacing" not in attrs:
    raise ValueError("missing attribute 'voxelspacing'")
  spacing = tuple(float(s) for s in np.asarray(attrs["voxelspacing"]).ravel())
  if len(spacing) != 2 or min(spacing) <= 0:
    raise ValueError(f"voxelspacing must be 2 positive numbers, got {spacing}")
  ed = int(attrs.get("ed_index", 0))
  es = int(attrs.get("es_index", t - 1))
  if not (0 <= ed < t and 0 <= es < t):
    raise ValueError(f"ed_index {ed} / es_index {es} outside the {t} stored frames")

  notes: list[str] = []
  row: dict[str, Any] = {"status": "ok", "n_frames": t}

  # Dice.
  if gt is not None:
    row.update(dice_scores(pred, gt))
    if row["n_annotated"] == 0:
      notes.append("dice: no annotated frame")
  else:
    row.update(_nan_fields(*(f"dice_{s}" for s in STRUCTURES), "mdice"))
    row["n_annotated"] = 0
    notes.append("no gt: dice and EF error undefined")

  # Frame-to-frame Hausdorff distance.
  row.update(temporal_hausdorff(pred, spacing))
  if not math.isfinite(row["hd"]) and row["hd_pairs"]:
    notes.append("hd: a structure is empty in some frames but not in the next")
  if gt is not None:
    row.update(temporal_hausdorff(gt, spacing, annotated_only=True, prefix="gt_"))
  else:
    row.update(_nan_fields("gt_hd_endo", "gt_hd_epi", "gt_hd"))
    row["gt_hd_pairs"] = 0

  # Temporal consistency.
  tc = sequence_temporal_consistency(pred, spacing)
  row["temporal_error"] = bool(tc["temporal_error"])
  row["n_inconsistent_frames"] = tc["n_inconsistent_frames"]
  for a in ATTRIBUTES:
    row[f"tc_{a}"] = tc["share"][a]
    if np.isnan(tc["curves"][a]).any():
      notes.append(f"temporal: {a} not measurable in some frames (flagged inconsistent)")
  if t < 3:
    notes.append("temporal: fewer than 3 frames, no interior frame to check")
  row["gt_temporal_error"] = None
  if gt is not None and len(annotated_frames(gt)) == t:
    row["gt_temporal_error"] = bool(sequence_temporal_consistency(gt, spacing)["temporal_error"])

  # Ejection fraction.
  row.update(ef_measures(pred[ed], pred[es], spacing))
  gt_ok = gt is not None and ed in set(annotated_frames(gt)) and es in set(annotated_frames(gt))
  if gt_ok:
    row.update(ef_measures(gt[ed], gt[es], spacing, prefix="gt_"))
  else:
    row.update(_nan_fields("gt_ef_area", "gt_ef_simpson", "gt_edv_ml", "gt_esv_ml"))
    if gt is not None:
      notes.append("ef: gt ED or ES frame not annotated")
  for m in ("area", "simpson"):
    row[f"ef_{m}_err"] = abs(row[f"ef_{m}"] - row[f"gt_ef_{m}"])
    for who in ("", "gt_"):
      if gt_ok or not who:
        if math.isnan(row[f"{who}ef_{m}"]):
          notes.append(f"{who}ef_{m}: LV empty (or, for Simpson, base not found) at ED/ES")

  # Deformation quality.
  if flow is not None:
    flow = np.asarray(flow)
    # The fitted grid may differ from pred's (runner --size); det D phi is the
    # same on both, since the grids differ by an axis-aligned affine map.
    if flow.ndim not in (4, 5) or flow.shape[-4] != pred.shape[0] or flow.shape[-1] != 2:
      raise ValueError(f"flow shape {flow.shape}: expected ({pred.shape[0]}, h, w, 2)")
    row.update(deformation_quality(flow.reshape(-1, *flow.shape[-3:])))
  else:
    row.update(_nan_fields("fold_frac", "jdet_min", "jdet_mean"))
  row["notes"] = notes
  return row


def _status(g: h5py.Group) -> tuple[str | None, str]:
  """(status, reason) from the attrs of a view group or its pred dataset."""
  for obj in (g, g["pred"] if "pred" in g else None):
    if obj is not None and "status" in obj.attrs:
      reason = next((str(hdf5.attr_value(obj.attrs[k])) for k in ("reason", "error", "message")
                     if k in obj.attrs), "")
      return str(hdf5.attr_value(obj.attrs["status"])), reason
  return None, ""


def evaluate_files(data_h5: str | os.PathLike, pred_h5: str | os.PathLike,
                   keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Evaluates every sequence of a prediction file against its data file.

  Args:
    data_h5: the data file (img, gt, attrs) in the project's HDF5 layout.
    pred_h5: prediction / fit file with /<patient>/<view>/pred (and
      optionally flow). A pred with es_index + 1 frames, fewer than the data
      has (a fit spans ED..ES only), is compared with those frames.
    keys: "<patient>/<view>" to evaluate; default every sequence of `data_h5`
      (the evaluation set; predictions for other keys are ignored).

  Returns:
    One row per key, in order: {"key", "status", ...}. status "ok" rows carry
    the metrics of `evaluate_sequence`; "failed" (the group's `status` attr
    is "failed", or the pred has no LV cavity in any frame; "reason" says
    which) and "missing" (no pred group or dataset) rows carry no metrics.

  Raises:
    InputError: unreadable file, a key absent from `data_h5`, a pred that
      does not match its data (shape, attributes), a pred that is not integer
      labels 0..3, or a gt with other labels, half-annotated frames or an
      annotated frame without LV cavity.
  """
  rows = []
  with hdf5.open_h5(data_h5) as df, hdf5.open_h5(pred_h5) as pf:
    for key in (hdf5.group_keys(df) if keys is None else list(keys)):
      if key not in df or not isinstance(df[key], h5py.Group):
        raise InputError(data_h5, f"no group {key!r}")
      if key not in pf or not isinstance(pf[key], h5py.Group):
        rows.append({"key": key, "status": "missing", "reason": "no pred group"})
        continue
      pg = pf[key]
      status, reason = _status(pg)
      if status == "failed":
        rows.append({"key": key, "status": "failed", "reason": reason})
        continue
      if "pred" not in pg:
        rows.append({"key": key, "status": "missing", "reason": "no pred dataset"})
        continue
      dg = df[key]
      attrs = {k: hdf5.attr_value(v) for k, v in dg.attrs.items()}
      gt = hdf5.label_values(dg["gt"], data_h5, key, "gt") if "gt" in dg else None
      pred = hdf5.label_values(pg["pred"], pred_h5, key, "pred")
      hdf5.check_labels(pred, pred_h5, key, "pred", unannotated=False)
      if gt is not None:
        hdf5.check_labels(gt, data_h5, key, "gt", unannotated=True, lv_cavity=True,
                          explain_255=True)
      flow = hdf5.label_maps(pg)
      img_shape = dg["img"].shape if "img" in dg else None
      n_data = img_shape[0] if img_shape else (gt.shape[0] if gt is not None else None)
      es = int(attrs.get("es_index", -1))
      if n_data is not None and pred.ndim == 3 and pred.shape[0] == es + 1 < n_data:
        # A fit covers ED..ES only (runner.fit_file): compare those frames.
        gt = None if gt is None else gt[:es + 1]
        img_shape = None if img_shape is None else (es + 1,) + tuple(img_shape[1:])
      if gt is None and img_shape is not None and tuple(img_shape) != pred.shape:
        raise InputError(pred_h5, f"{key}: pred shape {pred.shape} != img shape {img_shape}")
      try:
        row = evaluate_sequence(pred, gt, attrs, flow)
      except ValueError as e:
        raise InputError(pred_h5, f"{key}: {e}") from None
      empty = _empty_pred(pred)
      if empty:   # scores it would get are meaningless (HD 0), not just undefined
        row = {"status": "failed", "reason": empty}
      rows.append({"key": key, **row})
  return rows


def _empty_pred(pred: np.ndarray) -> str:
  """The reason a prediction cannot be scored ("" if it can): no LV cavity in
  any frame (its frame-to-frame HD would be 0 and its EF undefined)."""
  if pred.ndim == 3 and pred.shape[0] and not (pred == 1).any():
    return "pred has no LV cavity (label 1) in any frame"
  return ""


def _mean_sd(values: Iterable[Any]) -> tuple[float, float, int]:
  """(mean, sample sd (ddof=1; 0 for one value), n) over the finite values."""
  v = np.array([x for x in values if x is not None], np.float64)
  v = v[np.isfinite(v)]
  if len(v) == 0:
    return NAN, NAN, 0
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Aggregates per-sequence rows (from `evaluate_files` / `evaluate_sequence`).

  Means and sample sds (ddof=1) are over the "ok" sequences with a finite
  value; "<name>_n" gives that number. Sequences whose HD is inf or nan (a
  structure vanishing between frames) are left out of the HD mean and counted
  in "hd_nonfinite".

  Returns:
    {"n_sequences", "n_ok", "n_failed", "n_missing", "failed_keys" (failed and
    missing keys), "failed_reasons" ({key: "status: reason"}); "hd_mean", "hd_sd", "hd_n", "hd_nonfinite", "hd_endo_mean",
    "hd_epi_mean", "gt_hd_mean", "gt_hd_sd"; "temporal_errors" (count of ok
    sequences with a temporal error), "gt_temporal_errors", "tc_<attribute>"
    (mean share of flagged frames); "mdice", "dice_endo", "dice_epi",
    "dice_myo" (means) and their "_sd"; "ef_area_mae", "ef_area_sd",
    "ef_area_n", "ef_simpson_mae", "ef_simpson_sd", "ef_simpson_n",
    "ef_area_undefined", "ef_simpson_undefined" (ok sequences left out of the
    EF means: EF undefined, e.g. an empty LV at ED or ES);
    "fold_frac_mean", "jdet_min" (min over sequences), "jdet_mean_mean",
    "flow_n"}.
  """
  ok = [r for r in rows if r.get("status") == "ok"]
  bad = [r for r in rows if r.get("status") != "ok"]
  s: dict[str, Any] = {
      "n_sequences": len(rows), "n_ok": len(ok),
      "n_failed": sum(r.get("status") == "failed" for r in rows),
      "n_missing": sum(r.get("status") == "missing" for r in rows),
      "failed_keys": [r.get("key") for r in bad],
      "failed_reasons": {str(r.get("key")): f"{r.get('status')}: {r.get('reason') or '?'}"
                         for r in bad},
  }
  col = lambda name: [r.get(name) for r in ok]
  s["hd_mean"], s["hd_sd"], s["hd_n"] = _mean_sd(col("hd"))
  s["hd_nonfinite"] = sum(1 for v in col("hd") if v is None or not math.isfinite(v))
  s["hd_endo_mean"] = _mean_sd(col("hd_endo"))[0]
  s["hd_epi_mean"] = _mean_sd(col("hd_epi"))[0]
  s["gt_hd_mean"], s["gt_hd_sd"], _ = _mean_sd(col("gt_hd"))
  s["temporal_errors"] = sum(bool(v) for v in col("temporal_error"))
  s["gt_temporal_errors"] = sum(v is True for v in col("gt_temporal_error"))
  for a in ATTRIBUTES:
    s[f"tc_{a}"] = _mean_sd(col(f"tc_{a}"))[0]
  for name in ("mdice", "dice_endo", "dice_epi", "dice_myo"):
    s[name], s[f"{name}_sd"], _ = _mean_sd(col(name))
  for m in ("area", "simpson"):
    s[f"ef_{m}_mae"], s[f"ef_{m}_sd"], s[f"ef_{m}_n"] = _mean_sd(col(f"ef_{m}_err"))
    s[f"ef_{m}_undefined"] = sum(1 for v in col(f"ef_{m}_err")
                                 if v is None or not math.isfinite(v))
  s["fold_frac_mean"], _, s["flow_n"] = _mean_sd(col("fold_frac"))
  mins = [v for v in col("jdet_min") if v is not None and math.isfinite(v)]
  s["jdet_min"] = min(mins) if mins else NAN
  s["jdet_mean_mean"] = _mean_sd(col("jdet_mean"))[0]
  return s


def _pm(mean: float, sd: float, digits: int = 1) -> str:
  if mean is None or not math.isfinite(mean):
    return "–"
  return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _num(v: float, digits: int = 3) -> str:
  return f"{v:.{digits}f}" if v is not None and math.isfinite(v) else "–"


def table_markdown(summaries: dict[str, dict[str, Any]]) -> str:
  """A Markdown table in the layout of the paper's Table I, one row per method.

  Columns: HD (mm, mean ± sd; "k inf" notes sequences left out), Temp. Error
  (sequences with a temporal error / sequences evaluated), mDice, Dice endo,
  Dice epi, EF MAE (area and Simpson, percentage points, mean ± sd; "k n/a"
  notes sequences left out, their EF undefined), and Failed (failed or missing
  sequences / all). Below the table, one line per method with failed or
  missing sequences lists them with their reasons.
  """
  head = ["Method", "HD (mm)", "Temp. Error", "mDice", "Dice endo", "Dice epi",
          "EF MAE area (%)", "EF MAE Simpson (%)", "Failed"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":-:"] * (len(head) - 1)) + "|"]
  for name, s in summaries.items():
    hd = _pm(s.get("hd_mean"), s.get("hd_sd"))
    if s.get("hd_nonfinite"):
      hd += f" ({s['hd_nonfinite']} inf)"
    cells = [
        str(name), hd, f"{s.get('temporal_errors', 0)} / {s.get('n_ok', 0)}",
        _num(s.get("mdice")), _num(s.get("dice_endo")), _num(s.get("dice_epi")),
        _pm(s.get("ef_area_mae"), s.get("ef_area_sd")) + _left_out(s, "ef_area_undefined"),
        _pm(s.get("ef_simpson_mae"), s.get("ef_simpson_sd"))
        + _left_out(s, "ef_simpson_undefined"),
        f"{s.get('n_failed', 0) + s.get('n_missing', 0)} / {s.get('n_sequences', 0)}",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  notes = [f"- {name}: " + "; ".join(f"{k} ({why})" for k, why in s["failed_reasons"].items())
           for name, s in summaries.items() if s.get("failed_reasons")]
  if notes:
    lines += ["", "Failed or missing sequences:"] + notes
  return "\n".join(lines) + "\n"


def _left_out(s: dict[str, Any], name: str) -> str:
  return f" ({s[name]} n/a)" if s.get(name) else ""
