"""Reports: JSON / CSV / Markdown writers, summaries and the paper's tables.

A *report* is three files in one folder::

  metrics.csv    one row per (method, sequence): every metric of
                 `metrics.evaluate_sequence`, plus the row's config columns
  summary.json   {method: {"summary": metrics.summarize(...), ...extra}}
  table.md       the paper's Table I layout (or Table II / ablation layouts)
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from echo_ode_jax import metrics
from echo_ode_jax._atomic import atomic_path
from echo_ode_jax.errors import InputError, OutputError
from echo_ode_jax.overrides import format_value


def _jsonable(x):
  """Non-finite floats -> None, numpy -> Python, recursively (strict JSON)."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_json(path: str | os.PathLike, obj) -> str:
  """Writes strict JSON (nan / inf as null) atomically."""
  path = os.fspath(path)
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(_jsonable(obj), f, indent=1, sort_keys=False, allow_nan=False)
  return path


def read_json(path: str | os.PathLike):
  path = os.fspath(path)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise InputError(path, "file does not exist") from None
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(path, f"not valid JSON ({e})") from None


_FIRST = ("method", "key", "status", "reason")


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> str:
  """Writes dict rows as CSV (union of columns, first-seen order), atomically.

  Lists (notes) are joined with "; ", None as empty, floats with repr precision.
  """
  cols: list[str] = [c for c in _FIRST if any(c in r for r in rows)]
  for r in rows:
    cols.extend(k for k in r if k not in cols)
  path = os.fspath(path)
  with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for r in rows:
      cells = []
      for c in cols:
        v = r.get(c)
        if isinstance(v, (list, tuple)):
          v = "; ".join(str(x) for x in v)
        elif v is None:
          v = ""
        elif isinstance(v, np.generic):
          v = v.item()
        cells.append(v)
      w.writerow(cells)
  return path


def write_report(out_dir: str | os.PathLike, results: Mapping[str, Sequence[dict]],
                 extra: Mapping[str, Mapping[str, Any]] | None = None,
                 table: str | None = None, csv_columns: Mapping[str, Mapping] | None = None
                 ) -> dict[str, Any]:
  """Writes metrics.csv, summary.json and table.md for several methods.

  Args:
    results: method name -> per-sequence rows (`metrics.evaluate_files`).
    extra: method name -> more entries for its summary.json record (config, ...).
    table: the Markdown table (default: `metrics.table_markdown` of the summaries).
    csv_columns: method name -> constant columns added to its CSV rows.

  Returns:
    {method: summary} (`metrics.summarize`).
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  summaries = {name: metrics.summarize(rows) for name, rows in results.items()}
  csv_rows = []
  for name, rows in results.items():
    const = dict((csv_columns or {}).get(name, {}))
    csv_rows.extend({"method": name, **r, **const} for r in rows)
  write_csv(os.path.join(out_dir, "metrics.csv"), csv_rows)
  record = {name: {"summary": s, **dict((extra or {}).get(name, {}))}
            for name, s in summaries.items()}
  write_json(os.path.join(out_dir, "summary.json"), record)
  table = metrics.table_markdown(summaries) if table is None else table
  with atomic_path(os.path.join(out_dir, "table.md")) as tmp, open(tmp, "w") as f:
    f.write(table)
  return summaries


def check_out_dir(out: str) -> None:
  """--out must be a folder, or a path where one can be made (checked before any work)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise InputError(out, "exists and is not a folder; --out names the folder the report "
                     "goes to")
  parent = os.path.abspath(out)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise InputError(out, f"{parent} is not a folder")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise OutputError(out, f"cannot write in {parent}: permission denied")


def method_names(preds: Sequence[str], names: Sequence[str] | None) -> list[str]:
  """One unique name per prediction file (default: the file names without .h5).

  Raises:
    InputError: a different number of names and files, or a repeated name.
  """
  if names:
    if len(names) != len(preds):
      raise InputError(None, f"--name: {len(names)} names for {len(preds)} --pred files")
    out = [n.strip() for n in names]
  else:
    out = [os.path.splitext(os.path.basename(p))[0] for p in preds]
  if len(set(out)) != len(out):
    raise InputError(None, f"method names must be unique, got {out}")
  return out


def read_summaries(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """{method: summary} from a summary.json written by :func:`write_report`."""
  d = read_json(path)
  if not isinstance(d, dict) or not all(isinstance(v, dict) and "summary" in v
                                        for v in d.values()):
    raise InputError(path, 'expected {method: {"summary": {...}}}')
  return {k: v["summary"] for k, v in d.items()}


def _isnum(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def cell(s, name, digits, ref=None, sd=None, scale=1.0):
  v = s.get(name)
  if not _isnum(v):
    return "–"
  txt = f"{v * scale:.{digits}f}"
  if ref is not None and _isnum(ref.get(name)):
    txt += f" ({(v - ref[name]) * scale:+.{digits}f})"
  if sd is not None and _isnum(s.get(sd)):
    txt += f" ± {s[sd] * scale:.{digits}f}"
  return txt


def table2_markdown(summaries: Mapping[str, Mapping[str, Any]],
                    references: Mapping[str, Mapping[str, Any] | None] | None = None,
                    label: str = "Segmentator") -> str:
  """The paper's Table II layout: value (difference to the reference row) ± sd.

  Args:
    summaries: row name -> summary (`metrics.summarize`).
    references: row name -> the summary it is compared with (e.g. the Table I
      row with the segmenter's initial mask), or None for no difference.
  """
  head = [label, "HD (mm)", "Temp. Error", "mDice", "Dice endo", "Dice epi",
          "EF MAE area (%)", "EF MAE Simpson (%)", "Failed"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + [":-:"] * (len(head) - 1)) + "|"]
  for name, s in summaries.items():
    ref = (references or {}).get(name)
    te = f"{s.get('temporal_errors', 0)} / {s.get('n_ok', 0)}"
    if ref is not None and "temporal_errors" in ref:
      te += f" ({s.get('temporal_errors', 0) - ref['temporal_errors']:+d})"
    cells = [name, cell(s, "hd_mean", 1, ref, "hd_sd"), te,
             cell(s, "mdice", 3, ref), cell(s, "dice_endo", 3, ref),
             cell(s, "dice_epi", 3, ref),
             cell(s, "ef_area_mae", 1, ref, "ef_area_sd"),
             cell(s, "ef_simpson_mae", 1, ref, "ef_simpson_sd"),
             f"{s.get('n_failed', 0) + s.get('n_missing', 0)} / {s.get('n_sequences', 0)}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def ablation_markdown(rows: Sequence[tuple[Mapping[str, Any], Mapping[str, Any], float]]
                      ) -> str:
  """One line per grid row: its overrides, then the Table I metrics and fit time.

  Args:
    rows: (overrides, summary, mean fit seconds per sequence) per grid row.
  """
  keys: list[str] = []
  for o, _, _ in rows:
    keys.extend(k for k in o if k not in keys)
  head = keys + ["HD (mm)", "Temp. Error", "mDice", "Dice endo", "Dice epi",
                 "EF MAE area (%)", "fold (%)", "s / seq", "Failed"]
  lines = ["| " + " | ".join(head or ["row"]) + " |",
           "|" + "|".join([":-:"] * len(head)) + "|"]
  for o, s, sec in rows:
    cells = [format_value(o[k]) if k in o else "" for k in keys] + [
        cell(s, "hd_mean", 1, None, "hd_sd"),
        f"{s.get('temporal_errors', 0)} / {s.get('n_ok', 0)}",
        cell(s, "mdice", 3), cell(s, "dice_endo", 3), cell(s, "dice_epi", 3),
        cell(s, "ef_area_mae", 1, None, "ef_area_sd"),
        cell(s, "fold_frac_mean", 3, scale=100.0),
        f"{sec:.1f}" if _isnum(sec) else "–",
        f"{s.get('n_failed', 0) + s.get('n_missing', 0)} / {s.get('n_sequences', 0)}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"



def _stamp(path: str) -> list:
  st = os.stat(path)
  return [int(st.st_size), int(st.st_mtime_ns)]


def evaluate_cached(data: str, pred: str, cache: str) -> list[dict[str, Any]]:
  """`metrics.evaluate_files(data, pred)`, cached in the JSON file `cache`.

  The cache is reused only while both files keep their size and mtime.
  """
  stamp = {"data": _stamp(data) if os.path.exists(data) else None,
           "pred": _stamp(pred) if os.path.exists(pred) else None}
  if os.path.exists(cache):
    try:
      c = read_json(cache)
      if c.get("stamp") == stamp:
        logging.info("evaluation of %s: cached in %s", pred, cache)
        return c["rows"]
    except (InputError, AttributeError, KeyError):
      pass
  rows = metrics.evaluate_files(data, pred)
  write_json(cache, {"stamp": stamp, "rows": rows})
  return rows
